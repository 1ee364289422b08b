"""``larp-rt info BUNDLE [--json] [--verify]`` (larp_rt/bundle_info.py), and the TensorRT backend's plan checks that
run before any GPU probe: a damaged or stale plan gets a plan message naming ``larp-rt build`` on any machine."""

import hashlib
import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest
from _authors import write_authors_folders
from larp_rt.export import export_bundle, trt_build

from larp_rt import Bundle, BundleError, Engine
from larp_rt.backends import tensorrt as trt_backend
from larp_rt.bundle import PlanError, build_command
from larp_rt.bundle_info import bundle_info, format_info, is_bundle
from larp_rt.cli import main

RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not RTX, reason="needs the TensorRT-RTX builder: pip install 'larp_rt[tensorrt]'")
NO_GPU_MESSAGE = "needs a usable NVIDIA GPU"  # TensorRTUnavailable's words: never the answer for a bad plan


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The authors'-layout tiny pair: tokenizer with a prior, generator, fused sampler, PyTorch checkpoints."""
    root = tmp_path_factory.mktemp("info")
    write_authors_folders(root)
    return export_bundle(root / "tok", root / "gen", root / "b", verify=False, printer=_quiet)


@pytest.fixture(scope="module")
def planned(bundle, tmp_path_factory) -> Path:
    """The same bundle with TensorRT-RTX plans (one profile: fast)."""
    if not RTX:
        pytest.skip("needs the TensorRT-RTX builder: pip install 'larp_rt[tensorrt]'")
    dst = tmp_path_factory.mktemp("planned") / "b"
    shutil.copytree(bundle, dst)
    trt_build.build_plans(dst, batch="1", printer=_quiet)
    return dst


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def info(capsys, *args) -> tuple[int, str, str]:
    rc = main(["info", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def edit_manifest(path: Path, fn) -> None:
    m = manifest(path)
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2))


def flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def plan_file(path: Path, graph: str) -> Path:
    return path / manifest(path)["plans"][graph]["file"]


# --- what info shows -------------------------------------------------------------------------------------------
def test_info_text_shows_graphs_configs_prior_sampler_and_plans(planned, capsys):
    rc, out, _ = info(capsys, planned)
    assert rc == 0
    m = manifest(planned)
    assert f"bundle {planned}: larp_rt.bundle format version 2, precision fp32" in out
    for name, g in m["graphs"].items():
        assert f"  {name}: {g['file']}, " in out  # every graph with its file
        for d in g["inputs"]:
            shape = "[" + ", ".join(map(str, d["shape"])) + "]"
            assert any(line.split() == ["in", d["name"], d["dtype"], *shape.split()] for line in out.splitlines())
    assert "  decode: decode.onnx, fp32, KV cache fp32, " in out and "  sample: sample.onnx, fp64, " in out
    assert "  encoder: encoder.onnx, fp32, " in out and "KV cache" not in out.split("  encoder: ")[1].split("\n")[0]
    assert "KV cache fp32 (standard attention), 16 slots x 2 layers x 2 heads x 32" in out
    assert "codebook_size=64" in out and "num_classes=5" in out and "lr_mult=50.0" in out  # the three configs
    assert "prior: step graph prior, score graph prior_score, fused step graph prior_fused" in out
    assert "sampler graphs: sample (standard ops, float64); fused decode+sample: decode_sample" in out
    import tensorrt_rtx

    ver = tensorrt_rtx.__version__
    assert f"TensorRT plans (5): TensorRT-RTX {ver}, batch buckets 1, KV length 1..16" in out
    for name, e in m["plans"].items():
        size = (planned / e["file"]).stat().st_size
        assert (f"  {name}: {e['file']}, {size} bytes\n    TensorRT-RTX {ver} (tensorrt-rtx), compute capability "
                "8.0, 8.6, 8.9, 12.0, fp32, weights embedded\n") in out
    assert "    profile 0: B 1..1 (opt 1), S 1..16 (opt 8)" in out  # the decode / prior plans' KV range
    assert "PyTorch checkpoints: tokenizer torch/tokenizer, generator torch/generator" in out
    assert "verified" not in out  # no --verify, no verification


def test_info_json_is_one_document_with_the_manifest_facts(planned, capsys):
    rc, out, _ = info(capsys, planned, "--json")
    assert rc == 0
    doc = json.loads(out)  # one JSON document, nothing else on stdout
    m = manifest(planned)
    assert doc == json.loads(json.dumps(bundle_info(planned)))  # the CLI prints the library's dict
    assert doc["kind"] == "bundle" and doc["format_version"] == 2 and doc["precision"] == "fp32"
    assert set(doc["graphs"]) == set(m["graphs"])
    for name, g in m["graphs"].items():
        assert doc["graphs"][name]["inputs"] == g["inputs"] and doc["graphs"][name]["outputs"] == g["outputs"]
        assert doc["graphs"][name]["bytes"] == (planned / g["file"]).stat().st_size
    assert {n: g["precision"] for n, g in doc["graphs"].items()} == {
        "encoder": "fp32", "decoder": "fp32", "prior": "fp32", "prior_fused": "fp32", "prior_score": "fp32",
        "decode": "fp32", "sample": "fp64", "decode_sample": "fp32"}
    assert doc["graphs"]["decode"]["kv_dtype"] == doc["graphs"]["prior"]["kv_dtype"] == "fp32"
    assert doc["graphs"]["encoder"]["kv_dtype"] is None and doc["kv_cache"]["dtype"] == "fp32"
    assert doc["tokenizer"]["config"] == m["tokenizer"]["config"] and doc["tokenizer"]["precision"] == "fp32"
    assert doc["generator"]["config"] == m["generator"]["config"] and not doc["generator"]["frame_prediction"]
    assert doc["prior"]["graph"] == "prior" and doc["prior"]["kv_cache"]["max_seq"] == 16
    assert doc["sampler"]["graph"] == "sample" and doc["sampler"]["fused"] == "decode_sample"
    import tensorrt_rtx

    assert set(doc["plans"]) == {"encoder", "decoder", "prior", "prior_score", "decode"}
    for e in doc["plans"].values():
        assert e["flavour"] == "tensorrt-rtx" and e["flavour_name"] == "TensorRT-RTX"
        assert e["version"] == tensorrt_rtx.__version__
        assert e["compute_capabilities"] == trt_build.RTX_DEFAULT_CC
        assert e["size"] == (planned / e["file"]).stat().st_size and e["profiles"][0]["B"] == [1, 1, 1]
    assert doc["plans"]["decode"]["profiles"] == [{"B": [1, 1, 1], "S": [1, 8, 16]}]
    assert doc["tensorrt"]["buckets"] == [1] and "verify" not in doc


def test_is_bundle_and_a_checkpoint_keeps_its_info(bundle, capsys):
    assert is_bundle(bundle) and not is_bundle(bundle / "torch" / "generator") and not is_bundle(bundle / "nope")
    rc, out, _ = info(capsys, bundle / "torch" / "generator")
    assert rc == 0 and json.loads(out)["kind"] == "generator"  # the checkpoint's JSON, as before
    rc, out, err = info(capsys, bundle / "torch" / "generator", "--verify")
    assert rc == 2 and "--verify checks a bundle's files" in err and "is no bundle" in err
    rc, _, err = info(capsys, bundle / "nope")
    assert rc == 2 and "does not exist" in err


# --- --verify ----------------------------------------------------------------------------------------------------
def test_verify_a_good_bundle_exits_0(planned, capsys):
    rc, out, err = info(capsys, planned, "--verify")
    m = manifest(planned)
    n_files = len(m["files"]) - len(m["plans"])
    assert rc == 0 and err == ""
    assert out.splitlines()[-1] == f"OK verified {n_files} files, 5 plans: all match manifest.json"
    assert "BAD" not in out
    rc, out, _ = info(capsys, planned, "--verify", "--json")
    v = json.loads(out)["verify"]
    assert rc == 0 and v["ok"] and v["problems"] == [] and (v["files"], v["plans"]) == (n_files, 5)


def test_verify_without_plans(bundle, capsys):
    rc, out, _ = info(capsys, bundle, "--verify")
    assert rc == 0 and "TensorRT plans: none" in out
    assert "note: no TensorRT plans (build them with `larp-rt build" in out
    assert out.splitlines()[-1].startswith("OK verified ") and out.splitlines()[-1].endswith(" files, 0 plans: all "
                                                                                              "match manifest.json")


def test_a_graph_byte_changed_names_the_graph_and_larp_rt_export(planned, tmp_path, capsys):
    dst = copy(planned, tmp_path)
    flip_byte(dst / "decoder.onnx")
    rc, out, err = info(capsys, dst, "--verify")
    assert rc == 1
    assert "BAD decoder.onnx (graph):" in out and f"graph file '{dst / 'decoder.onnx'}' was altered (sha256" in out
    fix = next(line for line in out.splitlines() if line.startswith("  fix: "))
    assert fix.startswith(f"  fix: larp-rt export {dst} --force --tokenizer TOKENIZER_DIR --generator GENERATOR_DIR "
                          "--precision fp32 --tokenizer-precision fp32 --kv-dtype fp32 --opset 17 --fused-sampler")
    assert f"&& larp-rt build {dst} --trt rtx --batch 1" in fix  # the export drops the plans: rebuild them after
    assert out.count("BAD ") == 1  # the decoder plan is not reported on its own: the graph's fix rebuilds it
    assert "decoder.onnx" in err and "1 bad" in err
    rc, out, _ = info(capsys, dst, "--verify", "--json")
    v = json.loads(out)["verify"]
    assert rc == 1 and not v["ok"] and [(p["file"], p["kind"]) for p in v["problems"]] == [("decoder.onnx", "graph")]
    assert v["problems"][0]["fix"][0].startswith("larp-rt export ")
    with pytest.raises(BundleError, match=r"decoder.onnx' was altered \(sha256 mismatch.*`larp-rt export "):
        Bundle(dst)  # the loader names the export too


def test_the_export_fix_command_rewrites_the_bundle(bundle, tmp_path, capsys):
    dst = copy(bundle, tmp_path)
    flip_byte(dst / "encoder.onnx")
    rc, out, _ = info(capsys, dst, "--verify", "--json")
    (problem,) = json.loads(out)["verify"]["problems"]
    assert rc == 1 and problem["file"] == "encoder.onnx" and len(problem["fix"]) == 1  # no plans: nothing to rebuild
    src = bundle.parent  # the folders the bundle was exported from (the fixture's)
    argv = shlex.split(problem["fix"][0].replace("TOKENIZER_DIR", str(src / "tok"))
                       .replace("GENERATOR_DIR", str(src / "gen")))
    assert argv[:2] == ["larp-rt", "export"]
    assert main([*argv[1:], "--no-verify"]) == 0
    capsys.readouterr()
    rc, out, _ = info(capsys, dst, "--verify")
    assert rc == 0 and out.splitlines()[-1].startswith("OK verified")
    graphs = {f: d for f, d in manifest(bundle)["files"].items() if not f.startswith("torch/")}
    assert graphs and {f: manifest(dst)["files"][f] for f in graphs} == graphs  # the same graphs, byte for byte


@needs_rtx
def test_a_damaged_plan_names_the_plan_and_larp_rt_build(planned, tmp_path, capsys):
    dst = copy(planned, tmp_path)
    truncated, flipped = plan_file(dst, "decode"), plan_file(dst, "decoder")
    truncated.write_bytes(truncated.read_bytes()[:4096])
    flip_byte(flipped)
    rc, out, err = info(capsys, dst, "--verify")
    assert rc == 1
    rel_t, rel_f = (str(p.relative_to(dst)) for p in (truncated, flipped))
    assert f"BAD {rel_t} (plan):" in out and "4096 bytes where manifest.json records" in out and "truncated" in out
    assert f"BAD {rel_f} (plan):" in out and f"plan '{flipped}' was altered (sha256 mismatch" in out
    assert out.count(f"  fix: larp-rt build {dst} --trt rtx --batch 1 --compute-capability 8.0,8.6,8.9,12.0\n") == 2
    assert "larp-rt export" not in out and rel_t in err and rel_f in err
    # the Engine refuses it with the plan's message on this machine, GPU or not: through the loader ...
    with pytest.raises(PlanError, match=r"plan .*was altered \(sha256 mismatch.*rebuild the plans with `larp-rt "
                                        f"build {dst} --trt rtx") as ei:
        Engine(dst, backend="tensorrt")
    assert NO_GPU_MESSAGE not in str(ei.value)
    # ... and, trusting the files, through the backend's own checks (the decoder's plan is checked first)
    with pytest.raises(PlanError, match=r"plan '.*decoder-.*' was altered \(sha256 mismatch.*rebuild with `larp-rt "
                                        "build") as ei:
        Engine(dst, backend="tensorrt", verify=False)
    assert NO_GPU_MESSAGE not in str(ei.value)
    # the named command fixes it
    fix = shlex.split(build_command(dst, manifest(dst)))
    assert main(fix[1:]) == 0
    capsys.readouterr()
    rc, out, _ = info(capsys, dst, "--verify")
    assert rc == 0 and out.splitlines()[-1].startswith("OK verified")


@needs_rtx
def test_a_manifest_claiming_another_tensorrt_is_refused_before_any_gpu_probe(planned, tmp_path, capsys, monkeypatch):
    import tensorrt_rtx

    dst = copy(planned, tmp_path)

    def other_version(m):
        for e in m["plans"].values():
            e["version"] = "1.8.0.40"
        m["tensorrt"]["version"] = "1.8.0.40"

    edit_manifest(dst, other_version)
    rc, out, _ = info(capsys, dst, "--verify")
    assert rc == 1 and out.count(" (plan):") == 5
    assert f"was built with tensorrt-rtx 1.8.0.40 for compute capability 8.0, 8.6, 8.9, 12.0; this machine: " \
           f"tensorrt-rtx {tensorrt_rtx.__version__}" in out
    assert (f"was built with tensorrt-rtx {tensorrt_rtx.__version__} by its header, and manifest.json says "
            "1.8.0.40") in out
    assert f"  fix: larp-rt build {dst} --trt rtx --batch 1" in out
    probed = []
    monkeypatch.setattr(trt_backend.device, "probe_gpus", lambda *a, **k: probed.append(1) or ([], "no GPU (test)"))
    with pytest.raises(trt_backend.PlanMismatchError, match="built with tensorrt-rtx 1.8.0.40.*rebuild with `larp-rt "
                                                            f"build {dst} --trt rtx") as ei:
        Engine(dst, backend="tensorrt")
    assert NO_GPU_MESSAGE not in str(ei.value) and probed == []  # refused before the GPU probe


@needs_rtx
def test_a_manifest_claiming_the_other_flavour_is_caught_by_the_header(planned, tmp_path, capsys):
    dst = copy(planned, tmp_path)

    def datacenter(m):
        for e in m["plans"].values():
            e["flavour"] = "tensorrt"

    edit_manifest(dst, datacenter)
    rc, out, _ = info(capsys, dst, "--verify")
    assert rc == 1 and out.count("is a tensorrt-rtx plan by its header, and manifest.json says tensorrt") == 5
    assert f"  fix: larp-rt build {dst} --trt tensorrt --batch 1\n" in out  # datacenter: no --compute-capability
    with pytest.raises(trt_backend.PlanMismatchError, match="built with tensorrt .*rebuild with `larp-rt build") as ei:
        Engine(dst, backend="tensorrt")
    assert NO_GPU_MESSAGE not in str(ei.value)


@needs_rtx
def test_missing_files_are_named_with_their_fix(planned, tmp_path, capsys):
    dst = copy(planned, tmp_path)
    plan = plan_file(dst, "prior")
    plan.unlink()
    (dst / "torch" / "generator" / "model.safetensors").unlink()
    rc, out, _ = info(capsys, dst, "--verify", "--json")
    assert rc == 1
    v = json.loads(out)["verify"]
    by_file = {p["file"]: p for p in v["problems"]}
    assert set(by_file) == {str(plan.relative_to(dst)), "torch/generator/model.safetensors"}
    p = by_file[str(plan.relative_to(dst))]
    assert p["kind"] == "plan" and "is missing" in p["reasons"][0] and p["fix"][0].startswith(f"larp-rt build {dst} ")
    c = by_file["torch/generator/model.safetensors"]
    assert c["kind"] == "checkpoint" and "checkpoint file" in c["reasons"][0] and "is missing" in c["reasons"][0]
    assert c["fix"][0].startswith(f"larp-rt export {dst} --force") and "--onnx-only" not in c["fix"][0]
    assert any("the bundle holds copies" in n for n in v["notes"])
    shutil.copyfile(planned / "torch" / "generator" / "model.safetensors", dst / "torch" / "generator" /
                    "model.safetensors")  # only the plan missing: the Engine names it
    with pytest.raises(PlanError, match=r"plan .*prior-.*is missing; rebuild the plans with `larp-rt build") as ei:
        Engine(dst, backend="tensorrt")
    assert NO_GPU_MESSAGE not in str(ei.value)
    with pytest.raises(PlanError, match=r"prior-.*is missing; rebuild with `larp-rt build"):
        trt_backend.check_plans(Bundle(dst, verify=False), trt_backend.machine(probe=False), need_gpu=False)


def test_intact_files_with_a_false_manifest_claim(bundle, tmp_path, capsys):
    """Every sha256 matches, but the manifest says int8 weights: the graphs' contents check (Bundle) catches it."""
    dst = copy(bundle, tmp_path)
    edit_manifest(dst, lambda m: m.update(precision="int8"))
    rc, out, _ = info(capsys, dst, "--verify")
    assert rc == 1 and "BAD manifest.json (manifest):" in out
    assert "claims precision 'int8' but decode.onnx has no MatMulNBits node" in out
    assert "--precision int8" in out  # the export command repeats what the manifest says; the reason says why


# --- the header and the reproduced build command ---------------------------------------------------------------
@needs_rtx
def test_the_plan_header_is_read_without_tensorrt(planned, tmp_path):
    import tensorrt_rtx

    for e in manifest(planned)["plans"].values():
        head = trt_backend.read_plan_header(planned / e["file"])
        assert head == {"magic": "vtrt", "flavour": "tensorrt-rtx", "size": e["size"],
                        "version": tensorrt_rtx.__version__}
    assert trt_backend.read_plan_header(planned / "decode.onnx")["flavour"] is None
    # a machine with the version the manifest claims, and a plan whose header says otherwise: the header check alone
    dst = copy(planned, tmp_path)
    edit_manifest(dst, lambda m: [e.update(version="1.8.0.40") for e in m["plans"].values()])
    mach = trt_backend.Machine({"tensorrt-rtx": "1.8.0.40", "tensorrt": None})
    issues = trt_backend.plan_issues(dst, manifest(dst), mach)
    assert [(i.kind, i.phase) for i in issues] == [("header", 2)] * 5
    with pytest.raises(PlanError, match=f"built with tensorrt-rtx {tensorrt_rtx.__version__} by its header"):
        trt_backend.check_plans(Bundle(dst), mach, need_gpu=False)
    # a file that is not a plan at all, recorded with its own hash and size
    bad = plan_file(dst, "decoder")
    bad.write_bytes(b"not a plan" * 100)

    def rehash(m):
        e = m["plans"]["decoder"]
        e["sha256"] = m["files"][e["file"]] = hashlib.sha256(bad.read_bytes()).hexdigest()
        e["size"] = bad.stat().st_size

    edit_manifest(dst, rehash)
    issues = [i for i in trt_backend.plan_issues(dst, manifest(dst), mach) if i.plan == "decoder"]
    assert len(issues) == 1 and "is not a TensorRT plan (it starts with 'not '" in issues[0].reason


@needs_rtx
def test_the_build_command_reproduces_the_recorded_options(bundle, tmp_path, capsys):
    dst = copy(bundle, tmp_path)
    trt_build.build_plans(dst, batch="1,2", compute_capability="8.6,8.9", printer=_quiet,
                          graphs=["decoder"])
    before = manifest(dst)["plans"]["decoder"]
    flip_byte(dst / before["file"])
    rc, out, _ = info(capsys, dst, "--verify", "--json")
    (problem,) = json.loads(out)["verify"]["problems"]
    assert rc == 1 and problem["fix"] == [f"larp-rt build {dst} --trt rtx --batch 1,2 --compute-capability 8.6,8.9"]
    assert main(shlex.split(problem["fix"][0])[1:]) == 0
    after = manifest(dst)["plans"]["decoder"]
    for k in ("flavour", "version", "compute_capabilities", "buckets", "profiles", "weights", "precision"):
        assert after[k] == before[k], k
    assert format_info(bundle_info(dst, verify=True)).splitlines()[-1].startswith("OK verified")
