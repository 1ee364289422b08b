import json
import os

import pytest
import torch
from _authors import generator_config_json, generator_keys, tokenizer_config_json, tokenizer_keys
from safetensors.torch import save_file

from larp_rt import CheckpointError, GeneratorConfig, TokenizerConfig, load_pretrained, save_pretrained
from larp_rt.checkpoint import check_state_dict, read_config
from larp_rt.models import LARPGenerator, LARPTokenizer


def shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def write_folder(path, config: dict, state: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


# ------------------------------------------------------------------------------------------------
# the authors' key layout, at the released sizes (meta device: shapes only)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_prior", [False, True])
def test_larp_l_state_dict_is_the_authors_layout(with_prior):
    cfg = TokenizerConfig.from_name("larp-l")
    if with_prior:
        cfg = cfg.with_prior("larp")
    with torch.device("meta"):
        m = LARPTokenizer(cfg)
    spec = tokenizer_keys(prior=(384, 12, 1024) if with_prior else None)
    assert shapes(m.state_dict()) == spec
    # a state dict of exactly those names and shapes loads strictly
    meta_sd = {k: torch.empty(s, device="meta") for k, s in spec.items()}
    check_state_dict(m.state_dict(), meta_sd, "larp-l")
    m.load_state_dict(meta_sd, strict=True, assign=True)


def test_ar_lp_state_dict_is_the_authors_layout():
    with torch.device("meta"):
        m = LARPGenerator(GeneratorConfig.from_name("ar-lp"))
    spec = generator_keys()
    assert shapes(m.state_dict()) == spec
    meta_sd = {k: torch.empty(s, device="meta") for k, s in spec.items()}
    check_state_dict(m.state_dict(), meta_sd, "ar-lp")
    m.load_state_dict(meta_sd, strict=True, assign=True)


def test_authors_configs_convert_to_the_presets():
    assert read_config_dict(generator_config_json()) == ("generator", GeneratorConfig.from_name("ar-lp"))
    ar_l = read_config_dict(generator_config_json(dim=1024, n_layer=24, n_head=16))[1]
    assert ar_l == GeneratorConfig.from_name("ar-l")
    # the FP variant: prefix of 1024 tokens + separator
    fp = read_config_dict(generator_config_json(frame_prediction=True, cls_token_num=1025))[1]
    assert fp.frame_prediction and fp.num_positions == 2048 and fp.input_vocab == 8193
    tcfg = read_config_dict(tokenizer_config_json(tokens=1024, size=128, frames=16, tpatch=4, patch=8, dim=768,
                                                  depth=12, heads=12, codebook=8192, prior_name="gptc-S"))[1]
    assert tcfg.replace(prior=None) == TokenizerConfig.from_name("larp-l")
    assert tcfg.prior == TokenizerConfig.from_name("larp-l").with_prior("larp").prior




def read_config_dict(d):
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        with open(os.path.join(t, "config.json"), "w") as f:
            json.dump(d, f)
        kind, cfg, dialect = read_config(t)
    assert dialect == "authors"
    return kind, cfg


# ------------------------------------------------------------------------------------------------
# loading the authors' folders (tiny configs with the same names)
# ------------------------------------------------------------------------------------------------
def _authors_tiny_tokenizer(tmp_path, with_prior_weights: bool):
    cfg_json = tokenizer_config_json(prior_args={"max_seq_len": 16})
    torch.manual_seed(0)
    src_cfg = TokenizerConfig(num_tokens=16, frames=4, height=16, width=16, temporal_patch=2, patch=4,
                              enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2,
                              codebook_size=64).with_prior("gptc-xxs", max_seq_len=16)
    src = LARPTokenizer(src_cfg)
    torch.nn.init.normal_(src.final_layer.linear.weight, std=0.05)
    torch.nn.init.constant_(src.final_layer.linear.bias, 0.5)
    sd = src.state_dict()
    spec = tokenizer_keys(D=32, enc_depth=2, dec_depth=2, N=16, P=32, K=64, patch=(2, 4, 4), prior=(256, 6, 16))
    assert shapes(sd) == spec  # independent check of the names at a tiny size
    if not with_prior_weights:
        sd = {k: v for k, v in sd.items() if not k.startswith("prior_model.")}
    return src.eval(), write_folder(tmp_path / "authors-tok", cfg_json, sd)


@pytest.mark.parametrize("with_prior_weights", [False, True])
def test_authors_tokenizer_folder_loads_strictly_with_or_without_prior(tmp_path, with_prior_weights):
    src, folder = _authors_tiny_tokenizer(tmp_path, with_prior_weights)
    m = load_pretrained(folder)
    assert (m.prior_model is not None) == with_prior_weights
    assert not m.training
    video = torch.rand(2, 3, 4, 16, 16)
    tokens = m.encode(video)
    assert torch.equal(tokens, src.encode(video))
    assert torch.equal(m.decode(tokens), src.decode(tokens))
    # dropping the prior on request
    assert load_pretrained(folder, with_prior=False).prior_model is None
    if not with_prior_weights:
        with pytest.raises(CheckpointError, match="with_prior=True but the weights hold no prior_model"):
            load_pretrained(folder, with_prior=True)


def test_authors_generator_folder_loads_strictly(tmp_path):
    torch.manual_seed(0)
    src = LARPGenerator(GeneratorConfig.from_name("tiny")).eval()
    torch.nn.init.normal_(src.output.weight, std=0.05)
    cfg = src.config
    assert shapes(src.state_dict()) == generator_keys(D=128, L=2, F=cfg.ffn_hidden, V=1024, classes=8, positions=64)
    folder = write_folder(tmp_path / "authors-ar", generator_config_json(
        dim=128, n_layer=2, n_head=4, vocab_size=1024, max_seq_len=64, num_classes=8), src.state_dict())
    m = load_pretrained(folder, kind="generator")
    assert m.config == cfg
    tokens = torch.randint(0, 1024, (2, 10))
    with torch.no_grad():
        assert torch.equal(m(torch.tensor([1, 8]), tokens), src(torch.tensor([1, 8]), tokens))
    with pytest.raises(CheckpointError, match="holds a generator checkpoint, not a tokenizer"):
        load_pretrained(folder, kind="tokenizer")


def test_wrong_shape_missing_and_unexpected_keys_are_listed(tmp_path):
    src = LARPGenerator(GeneratorConfig.from_name("tiny"))
    sd = dict(src.state_dict())
    sd["abs_pe"] = torch.zeros(1, 32, 128)  # wrong shape
    del sd["layers.1.ffn_norm.weight"]  # missing
    sd["layers.2.attention.wo.weight"] = torch.zeros(128, 128)  # unexpected
    folder = write_folder(tmp_path / "bad", generator_config_json(
        dim=128, n_layer=2, n_head=4, vocab_size=1024, max_seq_len=64, num_classes=8), sd)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(folder)
    msg = str(e.value)
    assert "1 missing key(s): layers.1.ffn_norm.weight" in msg
    assert "1 unexpected key(s): layers.2.attention.wo.weight" in msg
    assert "abs_pe: checkpoint (1, 32, 128) vs model (1, 64, 128)" in msg


def test_unsupported_authors_architecture_is_refused(tmp_path):
    d = tokenizer_config_json()
    d["learned_encoder_patch_pe"] = True
    with pytest.raises(CheckpointError, match="learned_encoder_patch_pe=True.*does not implement"):
        read_config_dict(d)
    d = tokenizer_config_json()
    d["encoder_hidden_sizes"] = 32
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['encoder_hidden_sizes'\]"):
        read_config_dict(d)
    with pytest.raises(CheckpointError, match="n_kv_head"):
        read_config_dict(generator_config_json(n_kv_head=4))


# ------------------------------------------------------------------------------------------------
# our own format
# ------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny").with_prior("tiny"))
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    save_pretrained(tok, tmp_path / "tok", extra={"note": "test"})
    save_pretrained(gen, tmp_path / "gen")
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["format"] == "larp_rt.checkpoint" and meta["kind"] == "tokenizer" and meta["note"] == "test"
    tok2, gen2 = load_pretrained(tmp_path / "tok"), load_pretrained(tmp_path / "gen")
    assert tok2.config == tok.config and gen2.config == gen.config
    for a, b in ((tok, tok2), (gen, gen2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not [p for p in os.listdir(tmp_path / "tok") if p.startswith(".tmp")]
    assert load_pretrained(tmp_path / "gen", dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16


def test_save_refuses_bad_metadata_without_touching_the_folder(tmp_path):
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    save_pretrained(gen, tmp_path / "gen")
    before = {p: (tmp_path / "gen" / p).read_bytes() for p in os.listdir(tmp_path / "gen")}
    with pytest.raises(ValueError, match="may not override"):
        save_pretrained(LARPGenerator(GeneratorConfig.from_name("tiny")), tmp_path / "gen", extra={"config": {}})
    with pytest.raises(TypeError, match="LARPTokenizer or LARPGenerator"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "gen")
    assert {p: (tmp_path / "gen" / p).read_bytes() for p in os.listdir(tmp_path / "gen")} == before


def test_clear_errors_for_broken_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist or is not a directory"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json.*is missing"):
        load_pretrained(tmp_path / "empty")
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    folder = save_pretrained(gen, tmp_path / "g")
    # pickle only: refused with a conversion hint
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle, which larp_rt never loads"):
        load_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99.*upgrade larp_rt"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="neither a larp_rt checkpoint config"):
        load_pretrained(folder)
