"""Sampling as ONNX graphs: the portable standard-ops sampler and the fused decode + sample graph.

* ``sample.onnx`` (``build_sampler_model``): the reference sampler (``larp_rt/sampling.py``) in standard ONNX
  ops (opset 17), for runtimes without the custom op (other ONNX runtimes, ONNX Runtime execution providers the
  custom-op library was not built for). Inputs ``logits`` (R, V) float32 with R = B, or 2B with the null-class
  rows last; per-row ``cfg_scale``, ``temperature``, ``top_k``, ``top_p`` (B,); ``uniform`` (B,) float64, the
  rows' Philox uniforms for this step (``larp_rt.sampling.uniform``: bit operations have no standard op before
  opset 18, and one uniform per row is cheap on the host). Outputs ``tokens`` (B,) int64 and ``logprobs``
  (B,) float64. The computation follows the reference step by step (float32 CFG mix, float64 z, a stable
  (z desc, index asc) order from TopK, sequential float64 CumSum for the top-p cut and the draw); the only
  difference is the float64 exp/log of the runtime vs numpy's (last-bit), so logprobs agree to ~1e-15 and a token
  can differ only if ``u * total`` falls within rounding of a cumulative boundary. A row whose logits are
  non-finite (or whose float32 CFG mix overflows) gets token -1 and logprob NaN (a graph cannot raise; the engine
  does, and checks the parameters against the bounds of ``larp_rt.sampling`` before the run). Float64 keeps it out
  of TensorRT (no double there): TensorRT deployments launch the CUDA kernel beside the plan instead.
* ``decode_sample.onnx`` (``fuse_decode_sample``): the decode step with the custom ``larp_rt::Sample`` op on its
  logits (``liblarp_rt_ort.so``, bit-exact with the reference): one session run per token returns the token ids
  and the new cache entries; the logits never leave the graph. For float32 bundles its attention is the custom
  ``larp_rt::DecodeAttention`` op (one node per layer). It shares the decode graph's external data file when
  there is one (``trace.share_external_data``).

``onnx`` (the export extra) is imported inside the builders, so the I/O constants here import without it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SAMPLER_OPSET", "SAMPLER_INPUTS", "SAMPLE_PARAM_INPUTS", "build_sampler_model", "fuse_decode_sample",
           "pack_matmuls", "FUSED_EXTRA_INPUTS"]

SAMPLER_OPSET = 17
# (name, ONNX element type name) of the per-row inputs, shared by both graphs
SAMPLE_PARAM_INPUTS = [("cfg_scale", "float32"), ("temperature", "float32"), ("top_k", "int64"),
                       ("top_p", "float32")]
SAMPLER_INPUTS = SAMPLE_PARAM_INPUTS + [("uniform", "float64")]
# the Sample op's inputs after the logits, then the fused graph's extra inputs: ``sample_rows`` (R_req,) picks the
# sampler's logits rows out of the step's rows (B_req request rows, then B_req null-class rows when guided)
FUSED_SAMPLE_INPUTS = SAMPLE_PARAM_INPUTS + [("seed", "int64"), ("stream", "int64"), ("sample_step", "int64")]
FUSED_EXTRA_INPUTS = [("sample_rows", "int64")] + FUSED_SAMPLE_INPUTS


class _G:
    """A tiny node builder: every call adds one node and returns its output name."""

    def __init__(self, prefix: str = ""):
        from onnx import helper

        self.h = helper
        self.prefix = prefix
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def const(self, value, dtype) -> str:
        from onnx import numpy_helper

        name = f"{self.prefix}c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def __call__(self, op: str, *inputs: str, outputs: int = 1, **attrs):
        self.n += 1
        outs = [f"{self.prefix}{op.lower()}_{self.n}_{i}" for i in range(outputs)]
        self.nodes.append(self.h.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def graph(self, name: str, output: str):
        """These nodes as an If branch with one (B, V) bool output (outer-scope values are read by name)."""
        from onnx import TensorProto

        out = self.h.make_tensor_value_info(output, TensorProto.BOOL, ["B", "V"])
        return self.h.make_graph(self.nodes, name, [], [out], initializer=self.inits)


def _sampler_nodes(g: _G, logits: str, cfg_scale: str, temperature: str, top_k: str, top_p: str, uniform: str,
                   tokens: str, logprobs: str) -> None:
    from onnx import TensorProto as TP

    i0, i1 = g.const([0], np.int64), g.const([1], np.int64)
    B = g("Shape", cfg_scale)  # (1,)
    R = g("Shape", logits, end=1)  # (1,)
    V = g("Shape", logits, start=1, end=2)  # (1,)
    cond = g("Slice", logits, i0, B, i0)  # rows [0, B)
    uncond = g("Slice", logits, g("Sub", R, B), R, i0)  # rows [R - B, R): == cond when R == B
    # 1. CFG in float32, exactly the reference's (uncond + (cond - uncond) * s where s != 1, else cond)
    s = g("Unsqueeze", cfg_scale, i1)  # (B, 1)
    guided = g("Not", g("Equal", s, g.const(1.0, np.float32)))
    l = g("Where", guided, g("Add", uncond, g("Mul", g("Sub", cond, uncond), s)), cond)  # (B, V)
    # non-finite rows: cond always, uncond where guided -> token -1
    def nonfinite(x):
        return g("Or", g("IsNaN", x), g("IsInf", x))
    bad = g("Or", g("Or", nonfinite(cond), g("And", guided, nonfinite(uncond))), nonfinite(l))  # l: mix overflow
    bad_row = g("Greater", g("ReduceMax", g("Cast", bad, to=TP.FLOAT), axes=[1], keepdims=0),
                g.const(0.0, np.float32))  # (B,)
    # 2. greedy: argmax, first index on ties
    greedy_tok = g("ArgMax", l, axis=1, keepdims=0)
    t = g("Unsqueeze", temperature, i1)  # (B, 1)
    is_greedy = g("Equal", t, g.const(0.0, np.float32))
    t_safe = g("Cast", g("Where", is_greedy, g.const(1.0, np.float32), t), to=TP.DOUBLE)
    z = g("Div", g("Cast", l, to=TP.DOUBLE), t_safe)  # (B, V) float64
    zmax = g("ReduceMax", z, axes=[1], keepdims=1)  # (B, 1)
    w = g("Exp", g("Sub", z, zmax))
    # 3./4. top-k / top-p need the (z desc, index asc) order: a full sort, skipped (an If) when no row filters
    k = g("Unsqueeze", top_k, i1)  # (B, 1); 0 = off
    k_eff = g("Where", g("Or", g("Equal", k, g.const(0, np.int64)), g("Greater", k, V)), V, k)
    p = g("Unsqueeze", top_p, i1)
    filtering = g("Or", g("Less", k_eff, V), g("Less", p, g.const(1.0, np.float32)))  # (B, 1)
    any_filter = g("Cast", g("ReduceMax", g("Cast", filtering, to=TP.INT32), axes=[0, 1], keepdims=0), to=TP.BOOL)
    shape = g("Shape", l)
    arange = g("Range", g.const(0, np.int64), g("Squeeze", V, i0), g.const(1, np.int64))  # (V,)
    idx = g("Expand", g("Unsqueeze", arange, i0), shape)  # (B, V): 0..V-1 in every row

    sub = _G(prefix="f")
    # TopK over all V is stable by spec (lower index first on ties); l/T has the order of l for T > 0
    sorted_idx = sub("TopK", l, V, axis=1, largest=1, sorted=1, outputs=2)[1]  # (B, V) int64
    rank = sub("ScatterElements", idx, sorted_idx, idx, axis=1)  # rank[token] = position in the order
    w_sorted = sub("GatherElements", w, sorted_idx, axis=1)
    in_k = sub("Less", idx, k_eff)  # (B, V) by position in the order
    cum = sub("CumSum", sub("Where", in_k, w_sorted, sub.const(0.0, np.float64)), i1)  # sequential float64
    total_k = sub("Gather", cum, sub("Sub", V, i1), axis=1)  # (B, 1)
    thr = sub("Mul", sub("Cast", p, to=TP.DOUBLE), total_k)
    below = sub("ReduceSum", sub("Cast", sub("And", in_k, sub("Less", cum, thr)), to=TP.INT64), i1, keepdims=1)
    n_p = sub("Min", sub("Add", below, sub.const(1, np.int64)), k_eff)
    n = sub("Where", sub("Less", p, sub.const(1.0, np.float32)), n_p, k_eff)  # (B, 1) tokens kept
    sub.nodes.append(sub.h.make_node("Less", [rank, n], ["keep_sorted"]))
    nofilter = _G(prefix="n")
    nofilter.nodes.append(nofilter.h.make_node("Expand", [nofilter.const(True, np.bool_), shape], ["keep_all"]))
    keep = g("If", any_filter, then_branch=sub.graph("filter", "keep_sorted"),
             else_branch=nofilter.graph("no_filter", "keep_all"))  # (B, V) in index order
    # 5. draw: first kept token whose running (index-order) sum exceeds u * total, else the last kept one
    cw = g("CumSum", g("Where", keep, w, g.const(0.0, np.float64)), i1)
    total = g("Gather", cw, g("Sub", V, i1), axis=1)  # (B, 1)
    x = g("Mul", g("Unsqueeze", uniform, i1), total)
    hit = g("And", keep, g("Greater", cw, x))
    first_hit = g("ArgMax", g("Cast", hit, to=TP.FLOAT), axis=1, keepdims=0)
    any_hit = g("Greater", g("ReduceMax", g("Cast", hit, to=TP.FLOAT), axes=[1], keepdims=0),
                g.const(0.0, np.float32))
    pos1 = g("Cast", g("Add", idx, g.const(1, np.int64)), to=TP.DOUBLE)  # index + 1 (exact)
    last_kept = g("ArgMax", g("Where", keep, pos1, g.const(0.0, np.float64)), axis=1, keepdims=0)
    drawn = g("Where", any_hit, first_hit, last_kept)  # (B,)
    z_t = g("GatherElements", z, g("Unsqueeze", drawn, i1), axis=1)  # (B, 1)
    lp = g("Squeeze", g("Sub", g("Sub", z_t, zmax), g("Log", total)), i1)
    tok = g("Where", g("Squeeze", is_greedy, i1), greedy_tok, drawn)
    lp = g("Where", g("Squeeze", is_greedy, i1), g.const(0.0, np.float64), lp)
    g.nodes.append(g.h.make_node("Where", [bad_row, g.const(-1, np.int64), tok], [tokens]))
    g.nodes.append(g.h.make_node("Where", [bad_row, g.const(np.nan, np.float64), lp], [logprobs]))


def build_sampler_model():
    """The standard-ops sampler as an ``onnx.ModelProto`` (see the module docstring for its I/O)."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    g = _G()
    _sampler_nodes(g, "logits", "cfg_scale", "temperature", "top_k", "top_p", "uniform", "tokens", "logprobs")
    types = {"float32": TP.FLOAT, "int64": TP.INT64, "float64": TP.DOUBLE}
    inputs = [helper.make_tensor_value_info("logits", TP.FLOAT, ["R", "V"])]
    inputs += [helper.make_tensor_value_info(n, types[t], ["B"]) for n, t in SAMPLER_INPUTS]
    outputs = [helper.make_tensor_value_info("tokens", TP.INT64, ["B"]),
               helper.make_tensor_value_info("logprobs", TP.DOUBLE, ["B"])]
    graph = helper.make_graph(g.nodes, "larp_rt_sampler", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SAMPLER_OPSET)],
                              producer_name="larp_rt")
    onnx.checker.check_model(model, full_check=True)
    return model


def fuse_decode_sample(decode_model):
    """The decode graph + ``larp_rt::Sample`` on its logits: a new ModelProto (initializers shared by reference
    when the decode model keeps them as external data, so no weights are duplicated on disk).

    Extra inputs: ``sample_rows`` (R_req,) int64: the step's rows the sampler reads, R_req = B_req (no guidance)
    or 2 B_req (the requests' rows, then their null-class rows; a request without guidance may name its own row
    again, it mixes to exactly its cond logits); ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
    ``stream`` and ``sample_step`` (B_req,): per request, each at its own step. Outputs: ``tokens`` (B_req,) int64,
    ``logprobs`` (B_req,) float64, then the decode graph's ``present_*`` entries (all B rows).
    """
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(decode_model)
    graph = m.graph
    types = {"float32": TP.FLOAT, "int64": TP.INT64}
    for name, t in FUSED_EXTRA_INPUTS:
        dim = "R_req" if name == "sample_rows" else "B_req"
        graph.input.append(helper.make_tensor_value_info(name, types[t], [dim]))
    graph.node.append(helper.make_node("Gather", ["logits", "sample_rows"], ["sample_logits"], axis=0,
                                       name="larp_rt_sample_rows"))
    graph.node.append(helper.make_node(
        "Sample", ["sample_logits"] + [n for n, _ in FUSED_SAMPLE_INPUTS], ["tokens", "logprobs"], domain="larp_rt",
        name="larp_rt_sample"))
    kept = [o for o in graph.output if o.name != "logits"]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("tokens", TP.INT64, ["B_req"]),
                         helper.make_tensor_value_info("logprobs", TP.DOUBLE, ["B_req"])] + kept)
    if not any(o.domain == "larp_rt" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("larp_rt", 1))
    return m


def pack_matmuls(model) -> int:
    """Every standard ``MatMul`` of ``model`` whose second input is a 2-D float32 initializer W (K, N) becomes
    ``larp_rt::PackedMatMul`` (attribute ``n`` = N) over W's 32-column panels (``kernels.pack_matmul_weights``:
    one contiguous stream per panel, read at the memory's speed by cpp_ext/csrc/matmul_cpu.cc). The unpacked
    initializers are dropped once nothing reads them. ``model`` must hold its weights (not external references).
    Returns the number of nodes rewritten. A row's result never depends on the other rows of the step (the op
    sums each output in one fixed order), so the fused step stays batch-invariant."""
    import onnx
    from onnx import helper, numpy_helper

    from ..kernels import pack_matmul_weights

    inits = {t.name: t for t in model.graph.initializer}
    packed: dict[str, object] = {}
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        t = inits.get(node.input[1])
        if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"pack_matmuls needs the weights in the model; {t.name!r} is an external reference "
                             "(load the model with its external data)")
        name = f"{t.name}_panels"
        if name not in packed:
            packed[name] = numpy_helper.from_array(pack_matmul_weights(numpy_helper.to_array(t)), name)
        n = int(t.dims[1])
        node.op_type, node.domain = "PackedMatMul", "larp_rt"
        node.input[1] = name
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("n", n))
        count += 1
    used = {i for node in model.graph.node for i in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + list(packed.values()))
    if count and not any(o.domain == "larp_rt" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("larp_rt", 1))
    return count
