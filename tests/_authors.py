"""Test helpers. The authors' checkpoint layout, written out from ../shared/LARP.md section 5 and their hub
config.json format, independently of larp_rt's modules (the tests compare our state dicts against it)."""

from __future__ import annotations

import json
from pathlib import Path

# a prelude for `python -c` that makes `import torch` fail, to prove torch-free paths
NO_TORCH = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'): raise ImportError('torch is blocked')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def tokenizer_keys(D=768, enc_depth=12, dec_depth=12, N=1024, P=1024, K=8192, d=16, patch=(4, 8, 8), C=3,
                   prior=None) -> dict[str, tuple[int, ...]]:
    """prior: None or (width E, depth, max_seq_len) of the GPTC prior."""
    pt, ph, pw = patch
    s = {
        "x_embedder.proj.weight": (D, C, pt, ph, pw), "x_embedder.proj.bias": (D,),
        "encoder_patch_pe": (1, P, D), "decoder_latent_pe": (1, N, D), "decoder_patch_query_embed": (1, P, D),
        "encoder_latent_query_embed": (N, D), "decoder_patch_query_token_type_embed": (1, 1, D),
        "bottleneck.in_linear.weight": (d, D), "bottleneck.in_linear.bias": (d,),
        "bottleneck.out_linear.weight": (D, d), "bottleneck.out_linear.bias": (D,),
        "bottleneck.regularizer.embedding.weight": (K, d),
        "final_layer.norm_final.weight": (D,), "final_layer.norm_final.bias": (D,),
        "final_layer.linear.weight": (pt * ph * pw * C, D), "final_layer.linear.bias": (pt * ph * pw * C,),
    }
    for part, depth in (("encoder", enc_depth), ("decoder", dec_depth)):
        for i in range(depth):
            b = f"{part}.blocks.{i}."
            s.update({
                b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "norm2.weight": (D,),
                b + "norm2.bias": (D,), b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            })
    if prior is not None:
        E, depth, max_seq = prior
        p = "prior_model."
        s.update({p + "input_proj.weight": (E, d), p + "input_proj.bias": (E,), p + "pos_emb": (1, max_seq, E),
                  p + "ln_f.weight": (E,), p + "ln_f.bias": (E,), p + "head.weight": (d, E), p + "head.bias": (d,)})
        for i in range(depth):
            b = f"{p}blocks.{i}."
            for ln in ("ln1", "ln2"):
                s.update({b + ln + ".weight": (E,), b + ln + ".bias": (E,)})
            for lin in ("key", "query", "value", "proj"):
                s.update({b + f"attn.{lin}.weight": (E, E), b + f"attn.{lin}.bias": (E,)})
            s.update({b + "mlp.0.weight": (4 * E, E), b + "mlp.0.bias": (4 * E,),
                      b + "mlp.2.weight": (E, 4 * E), b + "mlp.2.bias": (E,)})
    return s


def generator_keys(D=1280, L=30, F=3584, V=8192, classes=101, positions=1024) -> dict[str, tuple[int, ...]]:
    s = {
        "cls_embedding.embedding_table.weight": (classes + 1, D), "tok_embeddings.weight": (V, D),
        "abs_pe": (1, positions, D), "norm.weight": (D,), "output.weight": (V, D),
    }
    for i in range(L):
        b = f"layers.{i}."
        s.update({
            b + "attention.wqkv.weight": (3 * D, D), b + "attention.wo.weight": (D, D),
            b + "feed_forward.w1.weight": (F, D), b + "feed_forward.w3.weight": (F, D),
            b + "feed_forward.w2.weight": (D, F), b + "attention_norm.weight": (D,), b + "ffn_norm.weight": (D,),
        })
    return s


def tokenizer_config_json(*, tokens=16, size=16, frames=4, tpatch=2, patch=4, dim=32, depth=2, heads=2,
                          codebook=64, prior_name="gptc-XXS", prior_args=None) -> dict:
    """A hub config.json of the authors' LARPTokenizer (their constructor arguments, yaml defaults)."""
    return {
        "bottleneck": {"name": "bottleneck", "args": {
            "bottleneck_dim": 16, "norm": "none",
            "regularizer": {"name": "vq", "args": {
                "codebook_size": codebook, "commitment_loss_weight": 0.25, "codebook_loss_weight": 1.0,
                "entropy_loss_weight": 0.0, "entropy_loss_temperature": 0.01, "l2_normalized": True,
                "stochastic": True, "stochastic_temperature": 0.03}}}},
        "prior_model": {"name": prior_name, "use_mix_ss": True, "mix_ss_max_ratio": 0.5,
                        "mix_ss_peak_steps_ratio": 0.3, "n_rounds": 2, "avg_loss_over_rounds": True,
                        "no_grad_before_last_round": False, "no_dropout": False, "latent_ce_temperature": 1.0,
                        "args": {"l2_normalized": True, **(prior_args or {})}},
        "transformer_name": "transformer_encoder_parallel", "encoder_name": "none", "decoder_name": "none",
        "bottleneck_token_num": tokens, "input_size": size, "frame_num": frames,
        "temporal_patch_size": tpatch, "patch_size": patch, "decoder_temporal_patch_size": tpatch,
        "decoder_patch_size": patch, "in_channels": 3, "encoder_hidden_size": dim, "decoder_hidden_size": dim,
        "encoder_num_heads": heads, "decoder_num_heads": heads, "encoder_depth": depth, "decoder_depth": depth,
        "learned_encoder_patch_pe": False, "learned_encoder_latent_query_embed": True,
        "learned_decoder_latent_pe": False, "learned_decoder_patch_query_embed": False,
        "use_encoder_patch_token_type_embed": False, "use_encoder_latent_query_token_type_embed": False,
        "use_decoder_latent_token_type_embed": False, "use_decoder_patch_query_token_type_embed": True,
        "encoder_query_gaussian_init": True, "latent_pe_scale_factor": 10000, "query_init_std": 0.02,
    }


def generator_config_json(**overrides) -> dict:
    """A hub config.json of the authors' LARP_AR (asdict(ModelArgs)) for llama-abs-LP, with overrides."""
    d = {
        "dim": 1280, "n_layer": 30, "n_head": 20, "n_kv_head": None, "multiple_of": 256, "ffn_dim_multiplier": None,
        "rope_base": 10000, "norm_eps": 1e-05, "initializer_range": 0.02, "token_dropout_p": 0.1,
        "attn_dropout_p": 0.0, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1, "drop_path_rate": 0.0,
        "num_classes": 101, "class_dropout_prob": 0.1, "model_type": "class_cond", "vocab_size": 8192,
        "cls_token_num": 1, "max_batch_size": 32, "max_seq_len": 1024, "use_fixed_pe": False,
        "frame_prediction": False,
    }
    d.update(overrides)
    return d


def write_authors_folders(root: Path) -> tuple[object, object]:
    """A small random tokenizer (with prior) and generator written to ``root/tok`` and ``root/gen`` in the authors'
    hub layout (their config.json keys + model.safetensors); returns the two PyTorch models."""
    import torch
    from safetensors.torch import save_file

    from larp_rt.config import GeneratorConfig, TokenizerConfig
    from larp_rt.models import LARPGenerator, LARPTokenizer

    torch.manual_seed(0)
    tcfg = TokenizerConfig(num_tokens=16, frames=4, height=16, width=16, temporal_patch=2, patch=4, enc_dim=32,
                           enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2, codebook_size=64)
    tok = LARPTokenizer(tcfg.with_prior("gptc-xxs", max_seq_len=16))
    gen = LARPGenerator(GeneratorConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, max_seq_len=16, num_classes=5))
    for name, model, cfg in (("tok", tok, tokenizer_config_json(prior_args={"max_seq_len": 16})),
                             ("gen", gen, generator_config_json(dim=64, n_layer=2, n_head=2, vocab_size=64,
                                                                max_seq_len=16, num_classes=5))):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / name / "model.safetensors")
    return tok, gen
