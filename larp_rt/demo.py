"""The demo: export the tiny checkpoint pair to a bundle, generate a grid of class-conditional videos with
ONNX Runtime on the CPU, write it as mp4 + GIF, and print a latency table (ONNX Runtime vs torch)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import larp_rt

from .bench import bench_engine
from .engine import Engine
from .sampling import SamplingParams
from .video import grid, write_video

REPO_TINY = Path(larp_rt.__file__).resolve().parents[1] / "checkpoints" / "tiny"


def _random_tiny(folder: Path, seed: int) -> tuple[Path, Path]:
    import torch

    from .checkpoint import save_pretrained
    from .config import GeneratorConfig, TokenizerConfig
    from .models import LARPGenerator, LARPTokenizer

    torch.manual_seed(seed)
    tok, gen = LARPTokenizer(TokenizerConfig.from_name("tiny")), LARPGenerator(GeneratorConfig.from_name("tiny"))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)  # the authors' init zeroes the output layers
    torch.nn.init.normal_(gen.output.weight, std=0.02)
    return save_pretrained(tok, folder / "tokenizer"), save_pretrained(gen, folder / "generator")


def run_demo(out: str | Path = "out/demo", tokenizer: str | None = None, generator: str | None = None,
             seed: int = 0, scale: int = 4, printer=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is None and generator is None and (REPO_TINY / "tokenizer").is_dir():
            tokenizer, generator = str(REPO_TINY / "tokenizer"), str(REPO_TINY / "generator")
            printer(f"[1/4] using the committed trained tiny pair: {REPO_TINY}")
        elif tokenizer is None or generator is None:
            tokenizer, generator = map(str, _random_tiny(Path(tmp), seed))
            printer("[1/4] NOTE: no trained tiny checkpoint found, so this demo uses RANDOMLY INITIALISED tiny models: "
                    "the videos are noise; the pipeline (export, ONNX Runtime, sampling, video writing) is real")
        else:
            printer(f"[1/4] using {tokenizer} + {generator}")
        from .export import export_bundle

        bundle = out / "bundle"
        printer(f"[2/4] exporting to {bundle}")
        from . import kernels

        export_bundle(tokenizer, generator, bundle, overwrite=True, printer=lambda s: printer("      " + s),
                      fused_sampler=kernels.ort_custom_op_library() is not None)

    eng = Engine(bundle)  # ONNX Runtime on the CPU
    n = eng.generator_config.num_classes
    classes = list(range(n)) * 2
    params = SamplingParams(cfg_scale=eng.default_params.cfg_scale, temperature=1.0, seed=seed)
    printer(f"[3/4] generating {len(classes)} videos for classes {classes} with {eng.backend_name} "
            f"(sampler {eng.sampler_name}, cfg {params.cfg_scale}, seed {seed})")
    videos, result = eng.generate_video(classes, params)
    g = grid(videos, cols=n, scale=scale)
    paths = [write_video(out / "samples.mp4", g), write_video(out / "samples.gif", g)]
    printer(f"      wrote {', '.join(map(str, paths))} (rows: two samples per class, columns: classes 0..{n - 1})")
    eng.close()  # its ONNX Runtime threads would compete with the torch measurements
    printer("[4/4] latency, batch 1 (ONNX Runtime vs torch eager, this CPU):")
    rows = bench_engine(str(bundle), batches=(1,), repeats=3, printer=lambda s: printer("      " + s))
    return {"bundle": str(bundle), "videos": [str(p) for p in paths], "tokens": result.tokens, "latency": rows}
