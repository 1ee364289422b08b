"""TensorRT plans built for real with TensorRT-RTX's CPU-only builder (ahead of time, no GPU), and the TensorRT
backend's checks that run before anything is created. Plan execution needs a GPU: see test_trt_gpu.py."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _authors import write_authors_folders
from larp_rt.export import export_bundle, trt_build

from larp_rt import Bundle, BundleError, GeneratorConfig, TokenizerConfig, save_pretrained
from larp_rt.backends import tensorrt as trt_backend
from larp_rt.bundle import PlanError
from larp_rt.models import LARPGenerator, LARPTokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="needs the TensorRT-RTX builder: pip install 'larp_rt[tensorrt]'")
BATCH = "1,2"  # two profiles keep the builds fast; the default is 1,2,4,8,16


def planned(b) -> set[str]:
    """The graphs that get plans: all but the ONNX-only ones."""
    return set(Bundle(b).graphs if not isinstance(b, Bundle) else b.graphs) - set(trt_build.PLAN_EXCLUDED)


def _quiet(_):
    pass


def tiny_pair(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny"))
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    save_pretrained(tok.eval(), root / "tok")
    save_pretrained(gen.eval(), root / "gen")
    return root / "tok", root / "gen"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    tok, gen = tiny_pair(root)
    out = {}
    for prec in ("fp32", "fp16"):
        out[prec] = export_bundle(tok, gen, root / f"b-{prec}", precision=prec, onnx_only=True, verify=False,
                                  printer=_quiet)
    return out


@pytest.fixture(scope="module")
def built(bundles, tmp_path_factory):
    """The fp32 tiny bundle with plans, and the progress lines of its build."""
    dst = tmp_path_factory.mktemp("built") / "b"
    shutil.copytree(bundles["fp32"], dst)
    lines = []
    trt_build.build_plans(dst, batch=BATCH, printer=lines.append)
    return dst, lines


def snapshot(root: Path) -> dict[str, str]:
    """Every file (and directory) under root with its sha256: what "unchanged" means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def norm(lst):  # the plan entry's I/O (JSON dicts) and the graph's (TensorSpecs) as comparable tuples
    dicts = [d if isinstance(d, dict) else d.to_dict() for d in lst]
    return [(d["name"], d["dtype"], [str(x) if isinstance(x, str) else int(x) for x in d["shape"]]) for d in dicts]


def test_tiny_fp32_plans_build_with_manifest_entries(built):
    path, lines = built
    b = Bundle(path)  # every plan file listed with its sha256, the bundle still reads
    plans = b.manifest["plans"]
    # sample.onnx (float64) and decode_sample (custom ops) stay ONNX-only
    assert set(plans) == planned(b) == {"encoder", "decoder", "decode"}
    import tensorrt_rtx

    for name, e in plans.items():
        # the I/O TensorRT's network exposes is the ONNX graph's, names, dtypes and symbolic shapes
        assert norm(e["inputs"]) == norm(b.graphs[name].inputs)
        assert norm(e["outputs"]) == norm(b.graphs[name].outputs)
        assert e["flavour"] == "tensorrt-rtx" and e["version"] == tensorrt_rtx.__version__
        assert e["compute_capabilities"] == trt_build.RTX_DEFAULT_CC
        assert e["precision"] == "fp32" and e["strongly_typed"] and e["weights"] == "embedded"
        plan = path / e["file"]
        assert hashlib.sha256(plan.read_bytes()).hexdigest() == e["sha256"] == b.files[e["file"]]
        assert e["onnx_sha256"] == hashlib.sha256((path / e["onnx"]).read_bytes()).hexdigest()
        assert e["size"] == plan.stat().st_size > 0
        assert [p["B"] for p in e["profiles"]] == [[1, 1, 1], [2, 2, 2]]  # one profile per batch bucket
    S = b.kv_cache_spec.max_seq
    assert [p["S"] for p in plans["decode"]["profiles"]] == [[1, S // 2, S]] * 2  # the KV length stays dynamic
    assert b.manifest["tensorrt"]["buckets"] == [1, 2]
    assert sum(1 for line in lines if " MB " in line and " s " in line) == len(plans)  # a line per plan


def test_fp16_plans_and_precision_must_match_the_graphs(bundles, tmp_path):
    dst = tmp_path / "b16"
    shutil.copytree(bundles["fp16"], dst)
    trt_build.build_plans(dst, batch="2", printer=_quiet, graphs=["decode", "decoder"])
    plans = Bundle(dst).manifest["plans"]
    assert set(plans) == {"decode", "decoder"}
    dec = {i["name"]: i["dtype"] for i in plans["decode"]["inputs"]}
    assert dec["past_k_0"] == "float16" and dec["token"] == "int64" and plans["decode"]["precision"] == "fp16"
    before = snapshot(dst)
    with pytest.raises(ValueError, match="strongly typed.*fp16.*--precision fp32"):
        trt_build.build_plans(dst, precision="fp32", printer=_quiet)
    assert snapshot(dst) == before


def test_plans_for_a_bundle_from_the_authors_folder_layout(tmp_path):
    write_authors_folders(tmp_path)
    bundle = export_bundle(tmp_path / "tok", tmp_path / "gen", tmp_path / "b", onnx_only=True, verify=False,
                           printer=_quiet)
    plans = trt_build.build_plans(bundle, batch="1", printer=_quiet)
    b = Bundle(bundle)
    assert set(plans) == planned(b) == {"encoder", "decoder", "decode", "prior", "prior_score"}
    for name, e in plans.items():
        assert norm(e["inputs"]) == norm(b.graphs[name].inputs)


def test_rebuild_replaces_the_old_plans(built, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    old = {e["file"] for e in Bundle(dst).manifest["plans"].values()}
    trt_build.build_plans(dst, batch="4", printer=_quiet, compute_capability="8.6", graphs=["decoder"])
    b = Bundle(dst)
    assert set(b.manifest["plans"]) == {"decoder"} and b.manifest["plans"]["decoder"]["compute_capabilities"] == ["8.6"]
    assert [p.name for p in (dst / "plans").iterdir()] == [Path(b.manifest["plans"]["decoder"]["file"]).name]
    assert not any(f in b.files for f in old - {b.manifest["plans"]["decoder"]["file"]})


def test_a_build_failing_half_way_leaves_the_bundle_unchanged(built, tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)  # with plans already: they must survive too
    # an unparseable decode graph (an op no TensorRT knows), recorded in the manifest so that the bundle reads;
    # decode is the last graph built, so two plans are built before it fails
    m = json.loads((dst / "manifest.json").read_text())
    info = m["graphs"]["decode"]
    ins = [helper.make_tensor_value_info(i["name"], TensorProto.INT64 if i["dtype"] == "int64" else TensorProto.FLOAT,
                                         i["shape"]) for i in info["inputs"]]
    outs = [helper.make_tensor_value_info(o["name"], TensorProto.FLOAT, o["shape"]) for o in info["outputs"]]
    node = helper.make_node("NoSuchOp", [i.name for i in ins], [o.name for o in outs], domain="larp_rt.test")
    model = helper.make_model(helper.make_graph([node], "bad", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("larp_rt.test", 1)])
    onnx.save_model(model, str(dst / "decode.onnx"))
    m["files"]["decode.onnx"] = hashlib.sha256((dst / "decode.onnx").read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    Bundle(dst)
    before = snapshot(dst)
    lines = []
    with pytest.raises(trt_build.PlanBuildError, match="rejected decode.onnx"):
        trt_build.build_plans(dst, batch="1", printer=lines.append)
    assert sum(" MB " in line for line in lines) == 2  # it did fail half-way (encoder, decoder built)
    assert snapshot(dst) == before
    # and a failure while the manifest is swapped in leaves it unchanged as well
    shutil.copyfile(built[0] / "decode.onnx", dst / "decode.onnx")
    m["files"]["decode.onnx"] = hashlib.sha256((dst / "decode.onnx").read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    before = snapshot(dst)

    def boom(path, text):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(trt_build, "_atomic_write", boom)
    with pytest.raises(OSError, match="injected"):
        trt_build.build_plans(dst, batch="1", printer=_quiet, graphs=["decoder"])
    assert snapshot(dst) == before


def test_strip_weights_on_the_cpu_builder_fails_cleanly(built, tmp_path):
    """TensorRT-RTX 1.7.1's CPU-only builder cannot build refittable (weight-stripped) engines: its Myelin
    compiler checks for CUDA. The build says so, and the bundle is unchanged. (The size check runs on a GPU:
    test_trt_gpu.py::test_strip_weights_plans_are_smaller_than_their_weights.)"""
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    before = snapshot(dst)
    with pytest.raises(trt_build.PlanBuildError, match="weight-stripped engines: build with --strip-weights on a "
                                                       "machine with an NVIDIA GPU"):
        trt_build.build_plans(dst, batch="1", strip_weights=True, printer=_quiet, graphs=["decoder"])
    assert snapshot(dst) == before


def test_a_plan_edited_by_one_byte_gets_a_sha256_error(built, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    e = Bundle(dst).manifest["plans"]["decode"]
    p = dst / e["file"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    # the loader names the rebuild, not a re-export: the plan is the bad file, the graphs are fine
    with pytest.raises(PlanError, match=r"plan .*decode-.*was altered \(sha256 mismatch with manifest.json\); rebuild "
                                        rf"the plans with `larp-rt build {dst} --trt rtx --batch 1,2") as ei:
        Bundle(dst)
    assert "re-export" not in str(ei.value) and "larp-rt export" not in str(ei.value)
    with pytest.raises(BundleError, match=r"plan .*decode-.*altered \(sha256.*larp-rt build"):
        trt_backend.check_plans(Bundle(dst, verify=False), trt_backend.machine(probe=False), need_gpu=False)


def test_build_replaces_damaged_or_missing_plans_but_not_damaged_graphs(built, tmp_path):
    """The command a plan error names works: `larp-rt build` rebuilds over an altered or missing plan (it replaces
    them); an altered graph is still refused, naming `larp-rt export`."""
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    plans = Bundle(dst).manifest["plans"]
    (dst / plans["decoder"]["file"]).unlink()
    (dst / plans["decode"]["file"]).write_bytes(b"")
    with pytest.raises(PlanError, match="larp-rt build"):
        Bundle(dst)
    trt_build.build_plans(dst, batch=BATCH, printer=_quiet)
    assert set(Bundle(dst).manifest["plans"]) == planned(dst)  # every file verified again
    graph = dst / "decode.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    before = snapshot(dst)
    with pytest.raises(BundleError, match=r"decode.onnx' was altered.*re-export the bundle \(`larp-rt export ") as ei:
        trt_build.build_plans(dst, batch=BATCH, printer=_quiet)
    assert not isinstance(ei.value, PlanError) and snapshot(dst) == before


def _edit_plans(dst: Path, **fields) -> None:
    m = json.loads((dst / "manifest.json").read_text())
    for e in m["plans"].values():
        e.update(fields)
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))


def test_another_compute_capability_or_version_gets_the_rebuild_message(built, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    import tensorrt_rtx

    ver = tensorrt_rtx.__version__
    rtx_gpu = trt_backend.Machine({"tensorrt-rtx": ver, "tensorrt": None},
                                  ({"index": 0, "name": "NVIDIA GeForce RTX 4090", "cc": "8.9"},))
    assert set(trt_backend.check_plans(Bundle(dst), rtx_gpu)) == planned(dst)  # a suitable machine passes
    hopper = trt_backend.Machine(rtx_gpu.versions, ({"index": 0, "name": "NVIDIA H100", "cc": "9.0"},))
    with pytest.raises(trt_backend.PlanMismatchError) as ei:
        trt_backend.check_plans(Bundle(dst), hopper)
    msg = str(ei.value)
    assert "targets compute capability 8.0, 8.6, 8.9, 12.0" in msg and "NVIDIA H100 (compute capability 9.0)" in msg
    assert f"larp-rt build {dst} --trt rtx --batch 1,2 --compute-capability 9.0" in msg
    _edit_plans(dst, version="1.0.0.1")
    with pytest.raises(trt_backend.PlanMismatchError, match=r"built with tensorrt-rtx 1\.0\.0\.1.*this machine: "
                                                            rf"tensorrt-rtx {ver}.*larp-rt build {dst} --trt rtx"):
        trt_backend.check_plans(Bundle(dst), rtx_gpu)
    # through the Engine: the version is checked before the GPU probe, so the message is the same here
    from larp_rt import Engine

    with pytest.raises(trt_backend.PlanMismatchError, match="rebuild with `larp-rt build"):
        Engine(dst, backend="tensorrt")
    _edit_plans(dst, version=ver, flavour="tensorrt")
    with pytest.raises(trt_backend.PlanMismatchError, match="built with tensorrt .*pip install tensorrt=="):
        trt_backend.check_plans(Bundle(dst), rtx_gpu)


def test_backend_tensorrt_without_a_gpu_is_a_clear_error_in_a_subprocess(built, bundles):
    code = (
        "import sys\n"
        "from larp_rt import Engine\n"
        "from larp_rt.backends.tensorrt import TensorRTUnavailable\n"
        "try:\n"
        f"    Engine({str(built[0])!r}, backend='tensorrt')\n"
        "except TensorRTUnavailable as e:\n"
        "    print('ERROR:', e)\n"
        "assert not [m for m in sys.modules if m.startswith(('tensorrt', 'cuda'))], 'runtime objects were created'\n"
        f"assert Engine({str(built[0])!r}).backend_name == 'onnxruntime'\n"  # auto never picks TensorRT
        "try:\n"
        f"    Engine({str(bundles['fp32'])!r}, backend='tensorrt')\n"
        "except Exception as e:\n"
        "    print('NOPLANS:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LARP_RT_ORT_SPIN": "0"})
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # exits normally, never by a signal
    if trt_backend.probe_gpus()[0]:
        pytest.skip("this machine has a GPU: the no-GPU error cannot be shown here")
    assert "ERROR: backend='tensorrt' needs a usable NVIDIA GPU" in r.stdout and "backend='onnxruntime'" in r.stdout
    assert "NOPLANS:" in r.stdout and f"larp-rt build {bundles['fp32']}" in r.stdout


def test_cli_build_and_bad_arguments(bundles, tmp_path, capsys):
    from larp_rt.cli import main

    dst = tmp_path / "b"
    shutil.copytree(bundles["fp32"], dst)
    before = snapshot(dst)
    for argv, msg in ((["--batch", "2,1"], "increasing order"), (["--batch", "x"], "comma-separated"),
                      (["--compute-capability", "86"], "major.minor"), (["--max-seq", "100000"], "exceeds"),
                      (["--max-seq", "3"], "positions a generation needs"),
                      (["--compute-capability", "6.1"], "cannot target compute capability 6.1")):
        assert main(["build", str(dst), *argv]) == 2
        assert msg in capsys.readouterr().err
        assert snapshot(dst) == before
    assert main(["build", str(dst), "--batch", "1"]) == 0
    assert "decode" in capsys.readouterr().out
    assert set(Bundle(dst).manifest["plans"]) == planned(dst)


def test_a_new_graph_gets_its_profile_from_the_table():
    ranges = trt_build._ranges("decode", {"B", "S"}, 4, 2, {"gen": 64, "prior": 16})
    assert ranges == {"B": [3, 4, 4], "S": [1, 32, 64]}
    with pytest.raises(trt_build.PlanBuildError, match=r"add 'T' : <rule> to PROFILES\['decode'\]".replace(" :", ":")):
        trt_build._ranges("decode", {"B", "T"}, 1, 0, {"gen": 64, "prior": 16})


def test_no_float64_in_plans(built):
    for e in Bundle(built[0]).manifest["plans"].values():
        assert all(d["dtype"] != "float64" for d in e["inputs"] + e["outputs"])
    assert np.dtype("float64").name not in {d["dtype"] for e in Bundle(built[0]).manifest["plans"].values()
                                            for d in e["inputs"] + e["outputs"]}


def test_the_device_kernels_compile_for_every_target():
    """The backend's KV-write / gather kernels (NVRTC source: backends/tensorrt/kv_kernels.cu) compile to PTX for every
    compute capability the plans target; NVRTC runs without a GPU."""
    try:
        ptx = {cc: trt_backend.compile_ptx(cc) for cc in ["7.5", *trt_build.RTX_DEFAULT_CC]}
    except Exception as e:  # no libnvrtc here
        pytest.skip(f"NVRTC is not available: {e}")
    for cc, code in ptx.items():
        text = code.decode(errors="replace")
        assert f".target sm_{cc.replace('.', '')}" in text
        assert all(f".entry {k}" in text for k in ("kv_write2", "kv_write4", "gather_rows", "feed_tokens"))
