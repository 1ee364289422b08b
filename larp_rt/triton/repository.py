"""Write a Triton model repository serving one larp_rt bundle (see ``larp_rt.triton``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..bundle import Bundle

MODELS = ("larp_generate", "larp_generate_stream", "larp_encode", "larp_decode", "larp_video")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}

# model.py of every python model: find larp_rt (the config's larp_rt_path parameter), then delegate
_MODEL_PY = '''"""Triton python-backend model written by `larp-rt triton`: {doc}"""

import json
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {{}})
        path = params.get("larp_rt_path", {{}}).get("string_value", "")
        if path and path not in sys.path:
            sys.path.insert(0, path)
        from larp_rt.triton import models

        self.impl = models.{cls}()
        self.impl.initialize(args)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()
'''


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{opt} }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _params(params: dict[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def _config(name: str, *, backend: str | None = None, platform: str | None = None, max_batch: int,
            inputs: list[str], outputs: list[str], instances: int, kind: str, delay_us: int | None,
            params: dict[str, str] | None = None, decoupled: bool = False, default_model: str | None = None,
            gpus: list[int] | None = None) -> str:
    s = f'name: "{name}"\n'
    s += f'backend: "{backend}"\n' if backend else f'platform: "{platform}"\n'
    if default_model:
        s += f'default_model_filename: "{default_model}"\n'
    s += f"max_batch_size: {max_batch}\n"
    s += _io("input", inputs) + _io("output", outputs)
    if max_batch > 0:
        s += "dynamic_batching {\n"
        if delay_us is not None:
            s += f"  max_queue_delay_microseconds: {delay_us}\n"
        s += "}\n"
    gpu = f" gpus: [ {', '.join(map(str, gpus))} ]" if gpus and kind == "gpu" else ""
    s += f"instance_group [ {{ count: {instances} kind: {KINDS[kind]}{gpu} }} ]\n"
    s += "version_policy: { latest: { num_versions: 1 } }\n"
    if decoupled:
        s += "model_transaction_policy { decoupled: true }\n"
    s += _params(params or {})
    return s


_SAMPLING_INPUTS = [
    _tensor("SEED", "TYPE_INT64", [1], True), _tensor("CFG_SCALE", "TYPE_FP32", [1], True),
    _tensor("TEMPERATURE", "TYPE_FP32", [1], True), _tensor("TOP_K", "TYPE_INT32", [1], True),
    _tensor("TOP_P", "TYPE_FP32", [1], True),
]


def write_repository(
    bundle_dir: str | os.PathLike,
    repo_dir: str | os.PathLike,
    *,
    instances: int = 1,
    kind: str = "cpu",
    max_batch: int = 8,
    max_queue_delay_us: int | None = 1000,
    native: bool = False,
    copy_bundle: bool = False,
    force: bool = False,
    threads: int | None = None,
    gpus: list[int] | None = None,
    stream_every: int = 16,
    printer: Callable[[str], None] = print,
) -> Path:
    """Write the repository into ``repo_dir`` (a temporary sibling renamed into place: nothing partial on
    failure). Returns its path. See ``larp_rt.triton`` for the models. Raises ValueError on bad arguments."""
    for name, v, lo in (("instances", instances, 1), ("max_batch", max_batch, 1), ("stream_every", stream_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be 'cpu' or 'gpu', got {kind!r}")
    if max_queue_delay_us is not None and (isinstance(max_queue_delay_us, bool) or
                                           not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0):
        raise ValueError(f"max_queue_delay_us must be an int >= 0 or None, got {max_queue_delay_us!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    bundle = Bundle(bundle_dir, verify=True)  # a broken bundle fails here, before anything is written
    repo = Path(repo_dir).absolute()
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
        if not force:
            raise ValueError(f"{str(repo)!r} exists and is not empty; pass --force to replace it")
    if native and not {"encoder", "decoder"} <= set(bundle.graphs):
        raise ValueError("--native needs the bundle's encoder.onnx and decoder.onnx; this bundle has "
                         f"{', '.join(bundle.graphs) or 'no graphs'} (export it without --onnx-only issues)")
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo.name}.", dir=repo.parent))
    try:
        if copy_bundle:
            shutil.copytree(bundle.path, tmp / "bundle")
            bundle_ref = str(repo / "bundle")
        else:
            bundle_ref = str(bundle.path.absolute())
        written = _write_models(tmp, bundle, bundle_ref, instances=instances, kind=kind, max_batch=max_batch,
                                delay_us=max_queue_delay_us, native=native, threads=threads, gpus=gpus,
                                stream_every=stream_every)
        (tmp / "README.md").write_text(_readme(written, bundle_ref, kind, instances))
        if repo.exists():
            shutil.rmtree(repo)
        os.replace(tmp, repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bundle.generator_config is None:
        printer("the bundle has no generator: wrote larp_encode and larp_decode only")
    if bundle.tokenizer_config is None:
        printer("the bundle has no tokenizer: wrote larp_generate and larp_generate_stream only")
    printer(f"wrote {', '.join(written)} to {repo}")
    return repo


def _write_models(root: Path, bundle: Bundle, bundle_ref: str, *, instances, kind, max_batch, delay_us, native,
                  threads, gpus, stream_every) -> list[str]:
    import larp_rt

    base = {"bundle": bundle_ref, "larp_rt_path": str(Path(larp_rt.__file__).resolve().parent.parent),
            "device": "cuda" if kind == "gpu" else "cpu", "threads": str(threads or 0)}
    common = dict(instances=instances, kind=kind, gpus=gpus)
    written = []

    def python_model(name: str, cls: str, doc: str, cfg: str) -> None:
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(cfg)
        (root / name / "1" / "model.py").write_text(_MODEL_PY.format(cls=cls, doc=doc))
        written.append(name)

    gen, tok = bundle.generator_config, bundle.tokenizer_config
    if gen is not None:
        N = gen.max_seq_len
        outs = [_tensor("TOKENS", "TYPE_INT64", [N]), _tensor("SEED", "TYPE_INT64", [1])]
        ins = [_tensor("CLASS_ID", "TYPE_INT64", [1])] + _SAMPLING_INPUTS
        rows = str(2 * max_batch)  # CFG takes two rows per request
        python_model("larp_generate", "Generate", "class ids + sampling parameters -> tokens + seeds",
                     _config("larp_generate", backend="python", max_batch=max_batch, inputs=ins, outputs=outs,
                             delay_us=delay_us, params={**base, "scheduler_rows": rows}, **common))
        sins = [_tensor("CLASS_ID", "TYPE_INT64", [1])] + _SAMPLING_INPUTS
        souts = outs + [_tensor("STEP", "TYPE_INT32", [1]), _tensor("TOTAL", "TYPE_INT32", [1]),
                        _tensor("TOKEN", "TYPE_INT64", [1])]
        python_model("larp_generate_stream", "GenerateStream",
                     "decoupled: partial tokens every stream_every steps, then tokens + seed",
                     _config("larp_generate_stream", backend="python", max_batch=0,
                             inputs=sins, outputs=souts,
                             delay_us=None, decoupled=True,
                             params={**base, "scheduler_rows": rows, "stream_every": str(stream_every)}, **common))
    if tok is not None:
        C, T, H, W = tok.video_shape
        N = tok.num_tokens
        if native:
            for name, graph, ins, outs in (
                ("larp_encode", "encoder", [_tensor("video", "TYPE_FP32", [C, T, H, W])],
                 [_tensor("indices", "TYPE_INT64", [N]), _tensor("latents", "TYPE_FP32", [N, tok.code_dim])]),
                ("larp_decode", "decoder", [_tensor("indices", "TYPE_INT64", [N])],
                 [_tensor("video", "TYPE_FP32", [C, T, H, W])]),
            ):
                (root / name / "1").mkdir(parents=True)
                src = bundle.graph_path(graph)
                os.symlink(src.absolute(), root / name / "1" / "model.onnx")  # external data resolves beside src
                for extra in sorted(src.parent.glob(src.name + ".data")):
                    os.symlink(extra.absolute(), root / name / "1" / extra.name)
                (root / name / "config.pbtxt").write_text(_config(
                    name, platform="onnxruntime_onnx", max_batch=max_batch, inputs=ins, outputs=outs,
                    delay_us=delay_us, default_model="model.onnx", **common))
                written.append(name)
        else:
            python_model("larp_encode", "Encode", "uint8 frames -> tokens",
                         _config("larp_encode", backend="python", max_batch=max_batch,
                                 inputs=[_tensor("VIDEO", "TYPE_UINT8", [T, H, W, C])],
                                 outputs=[_tensor("TOKENS", "TYPE_INT64", [N])], delay_us=delay_us,
                                 params=base, **common))
            python_model("larp_decode", "Decode", "tokens -> uint8 frames",
                         _config("larp_decode", backend="python", max_batch=max_batch,
                                 inputs=[_tensor("TOKENS", "TYPE_INT64", [N])],
                                 outputs=[_tensor("FRAMES", "TYPE_UINT8", [T, H, W, C])], delay_us=delay_us,
                                 params=base, **common))
    if gen is not None and tok is not None and not native:
        ins = [_tensor("CLASS_ID", "TYPE_INT64", [1])] + _SAMPLING_INPUTS
        outs = [_tensor("FRAMES", "TYPE_UINT8", [T, H, W, C]), _tensor("TOKENS", "TYPE_INT64", [gen.max_seq_len]),
                _tensor("SEED", "TYPE_INT64", [1])]
        python_model("larp_video", "Video", "BLS: larp_generate then larp_decode -> uint8 frames",
                     _config("larp_video", backend="python", max_batch=max_batch, inputs=ins, outputs=outs,
                             delay_us=delay_us, params={"larp_rt_path": base["larp_rt_path"]}, **common))
    return written


def _readme(models: list[str], bundle_ref: str, kind: str, instances: int) -> str:
    return f"""# Triton model repository written by `larp-rt triton`

Models: {", ".join(models)}. Bundle: `{bundle_ref}` (referenced by the `bundle` parameter of each config.pbtxt;
`larp-rt triton --copy-bundle` copies it into `bundle/`). Instances: {instances} x {kind} per model.

## Start it here (the tritonserver of the nvidia-pytriton wheel)

    python -m larp_rt.triton.server REPO_DIR --http-port 8000 --grpc-port 8001 --metrics-port 8002

(`larp_rt.triton.LocalServer` does the same from Python: it lays out a backend directory with the python stub of
this interpreter's version, puts this interpreter's `LIBDIR` first on `LD_LIBRARY_PATH` and this environment's
`bin/` first on `PATH`.)

## Start it in the NGC Triton container (one GPU, or several)

    docker run --rm --gpus all --shm-size 1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v $PWD:/repo -v {bundle_ref}:{bundle_ref} nvcr.io/nvidia/tritonserver:24.10-py3 \\
        bash -c "pip install larp_rt && tritonserver --model-repository /repo"

* The python models import larp_rt from the `larp_rt_path` parameter of their config.pbtxt (here the folder of the
  machine that wrote the repository); in the container `pip install larp_rt` (or mount the source and edit
  `larp_rt_path`). The container's python3 must be the version larp_rt was installed for.
* Tensors cross the python stub by DLPack, not by the stub's numpy glue, so numpy 2 works in the model's
  environment (the stub's own numpy conversion misreads numpy 2 arrays: `output tensor shape does not match size
  of output`).
* Several GPUs: `larp-rt triton --kind gpu --instances K` puts K instances of each model on every visible GPU
  (`--gpus 0,1` pins them); each instance holds its own Engine and continuous batch.
"""
