import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from larp_rt import TokenizerConfig
from larp_rt.models import LARPTokenizer
from larp_rt.models.tokenizer import sincos_3d


def tiny(**overrides) -> TokenizerConfig:
    return TokenizerConfig.from_name("tiny", **overrides)


def randomised(model: LARPTokenizer) -> LARPTokenizer:
    """The authors' init zeroes the output layer; give it weights so outputs are not constant."""
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    torch.nn.init.normal_(model.final_layer.linear.bias, mean=0.5, std=0.05)
    return model


# ------------------------------------------------------------------------------------------------
# fixed embeddings and layout
# ------------------------------------------------------------------------------------------------
def _mae_1d(dim, pos):  # MAE / the authors' numpy formula, written out independently
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _authors_3d(dim, grid, frames):
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w first (MAE)
    emb_2d = np.concatenate([_mae_1d(dim // 2, gw), _mae_1d(dim // 2, gh)], axis=1)
    emb_t = _mae_1d(dim, np.arange(frames, dtype=np.float32))
    return (emb_2d.reshape(1, grid * grid, dim) + emb_t.reshape(frames, 1, dim)).reshape(-1, dim)


def test_sincos_3d_matches_the_authors_formula():
    ours = sincos_3d(64, 4, 16, 16).numpy()
    np.testing.assert_allclose(ours, _authors_3d(64, 16, 4), rtol=0, atol=1e-12)


def test_unpatchify_inverts_the_per_patch_layout():
    cfg = tiny(height=32, width=48)  # non-square on purpose
    m = LARPTokenizer(cfg)
    video = torch.rand(2, *cfg.video_shape)
    t, h, w = cfg.grid
    pt, p, c = cfg.temporal_patch, cfg.patch, cfg.in_channels
    # patchify by hand: (B, C, t*pt, h*p, w*p) -> (B, t*h*w, pt*ph*pw*c), channel-last per patch, raster (t, h, w)
    x = video.reshape(2, c, t, pt, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(2, t * h * w, -1)
    assert torch.equal(m.unpatchify(x), video)


# ------------------------------------------------------------------------------------------------
# stochastic VQ
# ------------------------------------------------------------------------------------------------
def test_deterministic_svq_is_nearest_normalised_code_float64():
    torch.manual_seed(0)
    m = LARPTokenizer(tiny(codebook_size=64)).double()
    z = torch.randn(3, 64, 16, dtype=torch.float64)
    out = m.quantize(z, deterministic=True)
    zn = z / z.norm(dim=-1, keepdim=True)
    codes = m.bottleneck.regularizer.embedding.weight
    cn = codes / codes.norm(dim=-1, keepdim=True)
    d2 = ((zn[:, :, None, :] - cn[None, None]) ** 2).sum(-1)  # (B, N, K) squared L2
    assert torch.equal(out.indices, d2.argmin(-1))
    assert torch.allclose(out.quantized, cn[out.indices], atol=1e-12)
    assert torch.allclose(out.z, zn, atol=1e-15)


def _svq_fixture(temperature):
    m = LARPTokenizer(tiny(codebook_size=6, svq_temperature=temperature)).double()
    cosines = torch.tensor([1.0, 0.99, 0.98, 0.97, 0.96, 0.95], dtype=torch.float64)
    codes = torch.zeros(6, 16, dtype=torch.float64)
    codes[:, 0] = cosines
    codes[torch.arange(6), torch.arange(1, 7)] = torch.sqrt(1 - cosines**2)
    with torch.no_grad():
        m.bottleneck.regularizer.embedding.weight.copy_(codes * 3.0)  # raw rows are not unit norm
    z = torch.zeros(1, 200_000, 16, dtype=torch.float64)
    z[..., 0] = 2.0
    return m, z, cosines


def test_stochastic_svq_frequencies_match_softmax_cos_over_temperature():
    m, z, cosines = _svq_fixture(0.03)
    idx = m.quantize(z, deterministic=False, generator=torch.Generator().manual_seed(1)).indices
    counts = np.bincount(idx.flatten().numpy(), minlength=6)
    n = counts.sum()

    def pvalue(temp):
        expected = torch.softmax(cosines / temp, 0).numpy() * n
        return chi2.sf(((counts - expected) ** 2 / expected).sum(), df=5)

    assert pvalue(0.03) > 1e-4  # the right temperature fits
    assert pvalue(0.027) < 1e-12 and pvalue(0.033) < 1e-12  # a 10% wrong one is rejected
    assert pvalue(1.0) < 1e-12


def test_stochastic_svq_is_reproducible_with_an_explicit_generator():
    m, z, _ = _svq_fixture(0.03)
    a = m.quantize(z[:, :1000], deterministic=False, generator=torch.Generator().manual_seed(7)).indices
    b = m.quantize(z[:, :1000], deterministic=False, generator=torch.Generator().manual_seed(7)).indices
    c = m.quantize(z[:, :1000], deterministic=False, generator=torch.Generator().manual_seed(8)).indices
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_svq_losses_and_straight_through():
    torch.manual_seed(0)
    m = LARPTokenizer(tiny())
    z = torch.randn(2, 64, 16, requires_grad=True)
    out = m.quantize(z, deterministic=False)
    zn = F.normalize(z, dim=-1)
    q = m.bottleneck.regularizer.codebook()[out.indices]
    expected = 0.25 * F.mse_loss(zn, q.detach()) + 1.0 * F.mse_loss(q, zn.detach())
    assert torch.allclose(out.loss, expected)
    assert torch.allclose(out.quantized, q, atol=1e-6)
    out.quantized.sum().backward()  # straight-through: gradient of the codes flows to z
    assert z.grad is not None and z.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# prior loss
# ------------------------------------------------------------------------------------------------
def test_prior_loss_grads_reach_encoder_not_codebook():
    torch.manual_seed(0)
    m = LARPTokenizer(tiny().with_prior("tiny")).train()
    out = m(torch.rand(2, *m.config.video_shape), ss_ratio=0.5, generator=torch.Generator().manual_seed(0))
    out["loss_prior"].backward()
    codebook = m.bottleneck.regularizer.embedding.weight
    assert codebook.grad is None or codebook.grad.abs().max() == 0
    for p in (m.encoder.blocks[0].attn.qkv.weight, m.bottleneck.in_linear.weight, m.encoder_latent_query_embed,
              m.x_embedder.proj.weight, m.prior_model.input_proj.weight, m.prior_model.head.weight):
        assert p.grad is not None and p.grad.abs().max() > 0
    for p in m.decoder.parameters():  # the decoder is not on the prior's path
        assert p.grad is None or p.grad.abs().max() == 0


def test_prior_loss_rounds_and_scheduled_sampling():
    torch.manual_seed(0)
    m = LARPTokenizer(tiny().with_prior("tiny")).eval()  # eval: no dropout, so rounds are comparable
    svq = m.quantize(m.encode_latents(torch.rand(2, *m.config.video_shape)), deterministic=True)
    # ss_ratio = 0: round 2 is teacher-forced again, so the mean equals the single teacher-forced loss
    pred = m.prior_model.ar_predict(svq.quantized)
    emb = m.bottleneck.regularizer.codebook().detach()
    logits = (pred @ emb.t())[:, 1:]
    tf_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), svq.indices[:, 1:].reshape(-1))
    got = m.prior_loss(svq, ss_ratio=0.0, generator=torch.Generator().manual_seed(0))["loss_prior"]
    assert torch.allclose(got, tf_loss, atol=1e-6)
    # ss_ratio = 1: round 2 sees sampled codes, so the average differs
    got1 = m.prior_loss(svq, ss_ratio=1.0, generator=torch.Generator().manual_seed(0))["loss_prior"]
    assert not torch.allclose(got1, tf_loss, atol=1e-6)
    with pytest.raises(ValueError, match="ss_ratio"):
        m.prior_loss(svq, ss_ratio=1.5)


# ------------------------------------------------------------------------------------------------
# encode / decode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"num_tokens": 16}, {"num_tokens": 96}, {"height": 32, "width": 48}])
def test_encode_decode_round_trip_shapes_and_range(overrides):
    torch.manual_seed(0)
    m = randomised(LARPTokenizer(tiny(**overrides))).eval()
    video = torch.rand(2, *m.config.video_shape)
    tokens = m.encode(video)
    assert tokens.shape == (2, m.config.num_tokens) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < m.config.codebook_size
    out = m.decode(tokens)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    # deterministic SVQ: encoding is a function of the video
    assert torch.equal(m.encode(video), tokens)
    # the training forward reconstructs through the same decoder
    rec = m(video, deterministic=True)["recon"]
    assert torch.allclose(rec.clamp(0, 1), out, atol=1e-6)


def test_encode_batch_rows_are_independent():
    torch.manual_seed(0)
    m = randomised(LARPTokenizer(tiny())).eval()
    video = torch.rand(3, *m.config.video_shape)
    assert torch.equal(m.encode(video)[1:2], m.encode(video[1:2]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.rand(2, 3, 8, 32), r"video must have shape \(B, 3, 8, 32, 32\)"),
        (lambda: torch.rand(2, 8, 32, 32, 3), r"video must have shape \(B, 3, 8, 32, 32\).*permute"),
        (lambda: torch.rand(0, 3, 8, 32, 32), r"B >= 1"),
        (lambda: (torch.rand(1, 3, 8, 32, 32) * 255).to(torch.uint8), r"video must be a floating-point.*/ 255"),
        (lambda: torch.rand(1, 3, 8, 32, 32) * 2 - 1, r"video values must be finite and in \[0, 1\]"),
        (lambda: torch.full((1, 3, 8, 32, 32), math.nan), r"video values must be finite"),
        (lambda: np.zeros((1, 3, 8, 32, 32), np.float32), r"video must be a torch.Tensor"),
    ],
)
def test_encode_rejects_bad_video(make, message):
    m = LARPTokenizer(tiny()).eval()
    with pytest.raises(ValueError, match=message):
        m.encode(make())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.zeros(2, 63, dtype=torch.int64), r"indices must have shape \(B, 64\)"),
        (lambda: torch.full((1, 64), 1024, dtype=torch.int64), r"indices must be codebook indices in \[0, 1023\]"),
        (lambda: torch.full((1, 64), -1, dtype=torch.int64), r"codebook indices"),
        (lambda: torch.zeros(1, 64), r"indices must be an integer tensor"),
    ],
)
def test_decode_rejects_bad_indices(make, message):
    m = LARPTokenizer(tiny()).eval()
    with pytest.raises(ValueError, match=message):
        m.decode(make())
