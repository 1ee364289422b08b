"""The manifest's typed specs (larp_rt/manifest.py): every manifest the tiny pair exports (float32, the ``fast``
preset, frame prediction, with TensorRT plans) reads into specs and writes back byte for byte; a malformed entry of
each spec is refused naming its key and the fix; ``Bundle`` exposes the specs and ``BundleWriter`` writes them."""

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from larp_rt.export import export_bundle

from larp_rt import Bundle, BundleError
from larp_rt.bundle import BundleWriter, PlanError
from larp_rt.manifest import (
    GeneratorSpec,
    GraphInfo,
    GraphSpec,
    KVCacheSpec,
    ManifestSpec,
    PlanEntry,
    PrefillSpec,
    PriorSpec,
    SamplerSpec,
    TensorRTSpec,
    TensorSpec,
    TokenizerSpec,
)

TINY = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"
HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("manifests")
    tok, gen, fp = TINY / "tokenizer", TINY / "generator", TINY / "fp_generator"
    out = {
        "fp32": export_bundle(tok, gen, root / "fp32", verify=False, printer=_quiet),
        "fast": export_bundle(tok, gen, root / "fast", preset="fast", onnx_only=True, verify=False, printer=_quiet),
    }
    if fp.is_dir():
        out["frame_prediction"] = export_bundle(tok, fp, root / "fp", onnx_only=True, verify=False, printer=_quiet)
    if HAVE_RTX:
        from larp_rt.export import trt_build

        shutil.copytree(out["fp32"], root / "plans")
        trt_build.build_plans(root / "plans", batch="1", printer=_quiet)
        out["plans"] = root / "plans"
    return out


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_every_exported_manifest_round_trips_byte_for_byte(bundles):
    assert {"fp32", "fast"} <= set(bundles)
    for name, path in bundles.items():
        text = (path / "manifest.json").read_text()
        m = json.loads(text)
        spec = ManifestSpec.from_dict(m, "")
        assert spec.to_dict() == m, name
        assert json.dumps(spec.to_dict(), indent=2) + "\n" == text, name  # same keys, same order
        # every part on its own, too
        for key, cls in (("tokenizer", TokenizerSpec), ("generator", GeneratorSpec), ("sampler", SamplerSpec),
                         ("tensorrt", TensorRTSpec)):
            if m.get(key):
                assert cls.from_dict(m[key], key).to_dict() == m[key], (name, key)
        for g, e in m["graphs"].items():
            assert GraphSpec.from_dict(e, f"graphs.{g}", name=g).to_dict() == e
        for p, e in (m.get("plans") or {}).items():
            assert PlanEntry.from_dict(e, f"plans.{p}").to_dict() == e


def test_the_parts_hold_what_the_exporter_wrote(bundles):
    b = Bundle(bundles["fast"])
    assert isinstance(b.kv_cache_spec, KVCacheSpec) and b.kv_cache_spec.dtype == "fp16"
    assert b.kv_cache_spec.attention == "larp_rt::DecodeAttention" and b.kv_cache_spec.max_seq == 64
    assert b.generator_spec.kv_cache is b.kv_cache_spec and b.generator_spec.prefill is None
    assert b.generator_spec.model == b.generator_config and b.tokenizer_spec.model == b.tokenizer_config
    assert b.tokenizer_spec.precision == "int8" and b.tokenizer_spec.quantization["op"] == "MatMulInteger"
    assert isinstance(b.prior_spec, PriorSpec) and b.prior_spec.kv_cache.heads == 4
    assert isinstance(b.sampler, SamplerSpec) and b.sampler.fused == "decode_sample" and b.sampler.fused_matmul is None
    assert b.plans == {} and b.tensorrt is None
    g = b.graph("decode")
    assert isinstance(g, GraphSpec) and GraphInfo is GraphSpec and g.input_names[:2] == ["token", "pos"]
    assert g.inputs[1] == TensorSpec(name="pos", dtype="int64", shape=("B",))
    assert g.inputs[1].to_dict() == {"name": "pos", "dtype": "int64", "shape": ["B"]}
    # the specs write back exactly the manifest's entries
    assert b.kv_cache_spec.to_dict() == b.manifest["generator"]["kv_cache"]
    assert b.prior_spec.to_dict() == b.manifest["tokenizer"]["prior"]
    if "frame_prediction" in bundles:
        fp = Bundle(bundles["frame_prediction"])
        assert fp.generator_spec.prefill == PrefillSpec(graph="prefix_prefill", prefix_tokens=65, separator=1024)


@pytest.mark.skipif(not HAVE_RTX, reason="needs the TensorRT-RTX builder: pip install 'larp_rt[tensorrt]'")
def test_plans_are_typed(bundles):
    b = Bundle(bundles["plans"])
    assert b.plans and all(isinstance(e, PlanEntry) for e in b.plans.values())
    e = b.plans["decode"]
    assert e.flavour == "tensorrt-rtx" and e.buckets == (1,) and e.onnx == "decode.onnx" and e.weights == "embedded"
    assert e.max_of("S") == b.kv_cache_spec.max_seq and e.max_shape("logits") == [1, 1024]
    assert e.file in b.files and b.files[e.file] == e.sha256
    assert b.tensorrt.buckets == (1,) and b.tensorrt.flavour == "tensorrt-rtx" and b.tensorrt.timing_cache is None


def _break(m: dict, path: str, value) -> dict:
    """``m`` with the value at dotted ``path`` replaced (``...`` deletes it)."""
    m = copy.deepcopy(m)
    *head, last = path.split(".")
    d = m
    for k in head:
        d = d[k]
    if value is ...:
        del d[last]
    else:
        d[last] = value
    return m


MALFORMED = [  # (dotted key, bad value, the key the error names)
    ("graphs.decode.file", 3, "graphs.decode.file"),
    ("graphs.decode.inputs", "token", "graphs.decode.inputs"),
    ("graphs.encoder", [], "graphs.encoder"),
    ("generator.kv_cache.max_seq", "64", "generator.kv_cache.max_seq"),
    ("generator.kv_cache.layers", ..., "generator.kv_cache.layers"),
    ("generator.kv_cache", None, "generator.kv_cache"),
    ("generator.config", {"n_layer": "two"}, "generator.config"),
    ("tokenizer.prior.kv_cache.heads", 4.5, "tokenizer.prior.kv_cache.heads"),
    ("tokenizer.prior.graph", ..., "tokenizer.prior.graph"),
    ("tokenizer.prior.codebook_size", True, "tokenizer.prior.codebook_size"),
    ("tokenizer.prior", [1], "tokenizer.prior"),
    ("tokenizer.precision", 8, "tokenizer.precision"),
    ("tokenizer.config", "tiny", "tokenizer.config"),
    ("sampler.packed_matmuls", "9", "sampler.packed_matmuls"),
    ("sampler.fused", 1, "sampler.fused"),
    ("files", ["encoder.onnx"], "files"),
]


def _copy_with_manifest(src: Path, dst: Path, manifest: dict) -> Path:
    """A copy of bundle ``src`` at ``dst`` whose manifest.json is ``manifest``."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize(("path", "value", "key"), MALFORMED, ids=[m[0] + "=" + repr(m[1]) for m in MALFORMED])
def test_a_malformed_entry_is_refused_naming_its_key(bundles, tmp_path, path, value, key):
    m = _break(manifest(bundles["fp32"]), path, value)
    with pytest.raises(BundleError, match=rf"manifest key {key.replace('.', '[.]')} .*re-export the bundle"):
        ManifestSpec.from_dict(m, "")
    dst = _copy_with_manifest(bundles["fp32"], tmp_path / "b", m)
    with pytest.raises(BundleError, match=rf"manifest.json'?: manifest key {key.replace('.', '[.]')} "):
        Bundle(dst)  # at load, before any backend


@pytest.mark.skipif(not HAVE_RTX, reason="needs the TensorRT-RTX builder: pip install 'larp_rt[tensorrt]'")
@pytest.mark.parametrize(("path", "value"), [("plans.decode.sha256", ...), ("plans.decode.buckets", "1"),
                                             ("plans.decode.profiles", [3]), ("tensorrt.max_seq", "64")])
def test_a_malformed_plan_entry_names_the_build_command(bundles, tmp_path, path, value):
    m = _break(manifest(bundles["plans"]), path, value)
    with pytest.raises(PlanError, match=r"manifest key (plans|tensorrt)[.]\S+ .*rebuild its plans"):
        ManifestSpec.from_dict(m, "")
    dst = _copy_with_manifest(bundles["plans"], tmp_path / "b", m)
    with pytest.raises(PlanError, match=f"rebuild the plans with `larp-rt build {dst} --trt rtx"):
        Bundle(dst)


def test_specs_built_in_code_write_the_exporters_json(bundles):
    m = manifest(bundles["fp32"])
    kv = m["generator"]["kv_cache"]
    spec = KVCacheSpec(layers=kv["layers"], heads=kv["heads"], head_dim=kv["head_dim"], max_seq=kv["max_seq"],
                       dtype="fp32", attention="standard")
    assert json.dumps(spec.to_dict()) == json.dumps(kv)  # same keys in the same order
    s = m["sampler"]
    built = SamplerSpec(graph="sample", fused="decode_sample", fused_attention=s["fused_attention"],
                        fused_matmul=s["fused_matmul"], packed_matmuls=s["packed_matmuls"], custom_op_domain="larp_rt",
                        custom_op_library="liblarp_rt_ort.so")
    assert json.dumps(built.to_dict()) == json.dumps(s)
    assert SamplerSpec(graph="sample").to_dict() == {"graph": "sample", "fused": None, "fused_attention": None,
                                                     "fused_matmul": None}  # the keys the exporter writes as null
    extra = KVCacheSpec.from_dict({**kv, "future_key": [1, 2]}, "generator.kv_cache")
    assert extra.extra == {"future_key": [1, 2]} and extra.to_dict() == {**kv, "future_key": [1, 2]}


def test_bundle_writer_records_specs(bundles, tmp_path):
    src = Bundle(bundles["fp32"])
    dst = tmp_path / "copy"
    with BundleWriter(dst) as w:
        for g in src.graphs.values():
            for rel in g.files:
                shutil.copyfile(src.path / rel, w.path(rel))
            w.add_graph(g)
        shutil.copyfile(src.path / "codebook.npy", w.path("codebook.npy"))
        w.add_file("codebook.npy")
        m = src.manifest
        w.manifest.update({"precision": "fp32", "created_by": m["created_by"], "tokenizer": None, "generator": None,
                           "checkpoints": {}})
        w.set_tokenizer(TokenizerSpec.from_dict({**m["tokenizer"], "prior": None}, "tokenizer"))
        w.set_prior(src.prior_spec)
        w.set_generator(src.generator_spec)
        w.set_kv_cache(src.kv_cache_spec)
        w.set_sampler(src.sampler)
        w.manifest["default_sampling"] = m["default_sampling"]
        assert w.spec.generator == src.generator_spec
        w.commit()
    b = Bundle(dst)
    assert b.spec.graphs == src.spec.graphs and b.prior_spec == src.prior_spec and b.sampler == src.sampler
    assert b.manifest["tokenizer"] == m["tokenizer"] and b.manifest["generator"] == m["generator"]
    with pytest.raises(BundleError, match="no generator entry yet"):
        BundleWriter(tmp_path / "other").set_kv_cache(src.kv_cache_spec)
