"""``larp-rt export``: checkpoint folders -> a verified bundle. No torch import at module import time."""

from __future__ import annotations

import argparse

from .presets import DEFAULT_PRESET, PRESETS


def _cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_bundle  # torch and onnx: only when the verb runs (`larp-rt --help` stays light)

    export_bundle(args.tokenizer, args.generator, args.bundle_dir, precision=args.precision, opset=args.opset,
                  onnx_only=args.onnx_only, verify=not args.no_verify, overwrite=args.force,
                  fused_sampler=args.fused_sampler, revision=args.revision, kv_dtype=args.kv_dtype,
                  tokenizer_precision=args.tokenizer_precision, preset=args.preset)
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export checkpoint folders (ours or the authors') to a bundle of ONNX graphs",
                       description="Export a tokenizer and/or generator checkpoint folder to a bundle directory; "
                                   "every graph is verified against PyTorch in ONNX Runtime.")
    p.add_argument("bundle_dir", help="output bundle directory (must not exist unless --force)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint folder (config.json + model.safetensors) or a Hugging "
                                       "Face repo id (hywang66/LARP-L-long-tokenizer; its cache, HF_HUB_OFFLINE)")
    p.add_argument("--generator", help="generator checkpoint folder or hub repo id (hywang66/LARP-L-long-AR, "
                                       "hywang66/LARP-L-long-AR-FP for frame prediction)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of repo ids (default main)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a tested set of the options below (given options win): "
                        + "; ".join(f"{n}: {q.summary}" for n, q in PRESETS.items()).replace("%", "%%")
                        + f" (default {DEFAULT_PRESET})")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default=None,
                   help="int8/int4: weight-only quantized generator (ONNX Runtime MatMulNBits, block 32, "
                        "int8 compute); the tokenizer stays float32 unless --tokenizer-precision int8 "
                        "(default: the preset's, fp32)")
    p.add_argument("--tokenizer-precision", choices=["fp32", "fp16", "int8"], default=None,
                   help="the tokenizer's encoder/decoder: int8 = ONNX Runtime quantize_dynamic (int8 weight MatMuls, "
                        "fused attention; ~1.7x faster than fp32 for LARP-S on AVX-512 VNNI CPUs, PSNR -0.13 dB on "
                        "the tiny pair); default: fp16 with --precision fp16, else fp32")
    p.add_argument("--kv-dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="the generator's KV cache type (default: the weights' float type). fp16 / int8 (one float32 "
                        "scale per token and head) under fp32/int8/int4 weights halve / quarter the cache bytes read "
                        "per step; read by the larp_rt::DecodeAttention op (ONNX Runtime CPU, built kernels)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20 (default 17: TensorRT-friendly)")
    p.add_argument("--onnx-only", action="store_true", help="leave out the PyTorch checkpoints (small edge bundles)")
    p.add_argument("--fused-sampler", action=argparse.BooleanOptionalAction, default=None,
                   help="decode_sample.onnx: the decode step with the fused ops larp_rt::DecodeAttention (reads only "
                        "the written cache slots) + larp_rt::Sample, the fastest CPU path, beside the portable "
                        "standard-ops decode.onnx. Default: written whenever this install has built the kernels "
                        "(class-conditional and frame-prediction generators); --fused-sampler requires it, "
                        "--no-fused-sampler leaves it "
                        "out")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch verification")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.set_defaults(fn=_cmd_export)
