import json

import pytest
import torch

from larp_rt import ConfigError, GeneratorConfig, PriorConfig, TokenizerConfig
from larp_rt.models import LARPGenerator, LARPPrior, LARPTokenizer


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "name, expected_m, tol_m",
    [("larp-l", 172.2, 0.5), ("larp-b", 116.0, 1.0), ("larp-s", 39.0, 0.5)],
)
def test_tokenizer_sizes_on_meta(name, expected_m, tol_m):
    with torch.device("meta"):
        m = LARPTokenizer(TokenizerConfig.from_name(name))
    assert m.prior_model is None
    assert abs(n_params(m) / 1e6 - expected_m) <= tol_m


def test_prior_size_on_meta():
    with torch.device("meta"):
        m = LARPTokenizer(TokenizerConfig.from_name("larp-l").with_prior("larp"))
    assert abs(n_params(m.prior_model) / 1e6 - 21.7) <= 0.2
    assert abs((n_params(m) - n_params(m.prior_model)) / 1e6 - 172.2) <= 0.5


@pytest.mark.parametrize("name, expected_m, tol_m", [("ar-lp", 632.0, 1.0), ("ar-l", 326.3, 1.0), ("small", 36.0, 0.5)])
def test_generator_sizes_on_meta(name, expected_m, tol_m):
    with torch.device("meta"):
        m = LARPGenerator(GeneratorConfig.from_name(name))
    assert abs(n_params(m) / 1e6 - expected_m) <= tol_m


def test_released_generator_shapes():
    cfg = GeneratorConfig.from_name("ar-lp")
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.ffn_hidden) == (1280, 30, 20, 64, 3584)
    assert GeneratorConfig.from_name("ar-l").ffn_hidden == 2816
    small = GeneratorConfig.from_name("small")
    assert (small.dim, small.n_layer, small.n_head, small.vocab_size, small.max_seq_len) == (512, 8, 8, 8192, 1024)
    assert TokenizerConfig.from_name("small") == TokenizerConfig.from_name("larp-s")


@pytest.mark.parametrize("cls", [TokenizerConfig, PriorConfig, GeneratorConfig])
def test_every_preset_builds(cls):
    model_cls = {TokenizerConfig: LARPTokenizer, PriorConfig: LARPPrior, GeneratorConfig: LARPGenerator}[cls]
    for name in cls.PRESETS:
        cfg = cls.from_name(name)
        device = "cpu" if name == "tiny" else "meta"  # real tensors for the tiny ones, shapes for the rest
        with torch.device(device):
            m = model_cls(cfg)
        assert n_params(m) > 0


def test_tiny_presets_are_small_and_consistent():
    t, g = TokenizerConfig.from_name("tiny"), GeneratorConfig.from_name("tiny")
    assert g.vocab_size == t.codebook_size and g.max_seq_len == t.num_tokens
    assert n_params(LARPTokenizer(t)) < 2e6 and n_params(LARPGenerator(g)) < 2e6


def test_unknown_keys_and_presets_raise_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depht'\].*valid keys are: .*enc_depth"):
        TokenizerConfig.from_name("tiny", depht=3)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['layers'\].*n_layer"):
        GeneratorConfig.from_dict({"dim": 64, "layers": 2})
    with pytest.raises(ConfigError, match=r"unknown preset 'larp-xl'.*larp-b, larp-l, larp-s"):
        TokenizerConfig.from_name("larp-xl")
    with pytest.raises(ConfigError, match=r"unknown key"):
        TokenizerConfig.from_dict({"prior": {"dims": 3}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"frames": 10}, r"frames=10 must be divisible by temporal_patch=4"),
        ({"height": 100}, r"height=100 must be divisible by patch=8"),
        ({"enc_heads": 5}, r"enc_dim=768 must be divisible by enc_heads=5"),
        ({"num_tokens": 0}, r"num_tokens must be a positive int"),
        ({"svq_temperature": 0.0}, r"svq_temperature must be > 0"),
    ],
)
def test_invalid_tokenizer_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TokenizerConfig.from_name("larp-l", **overrides)


def test_invalid_generator_values():
    with pytest.raises(ConfigError, match="n_head"):
        GeneratorConfig.from_name("ar-lp", n_head=7)
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        GeneratorConfig.from_name("tiny", class_dropout_prob=1.5)


@pytest.mark.parametrize("n", [256, 512, 1024, 2048])
def test_any_token_count_builds(n):
    cfg = TokenizerConfig.from_name("larp-l", num_tokens=n).with_prior()
    with torch.device("meta"):
        m = LARPTokenizer(cfg)
    assert m.encoder_latent_query_embed.shape == (n, 768)
    assert m.decoder_latent_pe.shape == (1, n, 768)
    assert m.prior_model.pos_emb.shape[1] >= n


def test_dict_round_trip_through_json():
    cfg = TokenizerConfig.from_name("tiny").with_prior("tiny")
    back = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.prior, PriorConfig)
    g = GeneratorConfig.from_name("small", num_classes=10)
    assert GeneratorConfig.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_ss_ratio_schedule():
    p = PriorConfig()
    assert p.ss_ratio(0, 1000) == 0.0
    assert p.ss_ratio(150, 1000) == pytest.approx(0.25)
    assert p.ss_ratio(300, 1000) == pytest.approx(0.5)
    assert p.ss_ratio(900, 1000) == pytest.approx(0.5)
