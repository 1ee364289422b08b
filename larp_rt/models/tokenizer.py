"""LARP tokenizer: video <-> N discrete tokens (holistic queries + stochastic VQ).

Parameter and buffer names are the authors' (hywang66/LARP `models/larp_tokenizer.py`, timm `Block`), so
their released `model.safetensors` loads strictly. Shapes in comments use

    B batch, C channels, T/H/W video size, P patch tokens (= t*h*w grid), N query tokens,
    D model width, d code dim (16), K codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TokenizerConfig
from .prior import LARPPrior

__all__ = ["LARPTokenizer", "SVQOutput", "sincos_1d", "sincos_3d"]


# --------------------------------------------------------------------------------------------
# Fixed sin-cos embeddings (MAE convention, as the authors: [sin | cos], first half of a 2-D
# embedding encodes the w coordinate, second half h). Computed in float64 with torch ops so
# they also build on the meta device.
# --------------------------------------------------------------------------------------------
def sincos_1d(dim: int, pos: Tensor, base: float = 10000.0) -> Tensor:
    """(M,) positions -> (M, dim) float64 embedding [sin(pos*w) | cos(pos*w)]."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / base**omega
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d(dim: int, t: int, h: int, w: int) -> Tensor:
    """(t*h*w, dim) float64: 2-D sincos over (h, w) plus 1-D sincos over t, raster order (t, h, w)."""
    gh, gw = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    emb_2d = torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)  # (h*w, dim)
    emb_t = sincos_1d(dim, torch.arange(t, dtype=torch.float64))  # (t, dim)
    return (emb_2d.reshape(1, h * w, dim) + emb_t.reshape(t, 1, dim)).reshape(t * h * w, dim)


# --------------------------------------------------------------------------------------------
# Bidirectional ViT (timm Block names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x(B,h,L,hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (LayerNorm eps 1e-5, MLP ratio 4, GELU, no qkv bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Encoder/decoder body: attends over concat([context, query]) and returns the query slots."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])

    def forward(self, context: Tensor, query: Tensor) -> Tensor:
        h = torch.cat([context, query], dim=1)  # (B, Lc + Lq, D)
        for block in self.blocks:
            h = block(h)
        return h[:, -query.shape[1]:]  # (B, Lq, D); no final norm


class PatchEmbed3D(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        k = (cfg.temporal_patch, cfg.patch, cfg.patch)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.enc_dim, kernel_size=k, stride=k)

    def forward(self, video: Tensor) -> Tensor:
        return self.proj(video).flatten(2).transpose(1, 2)  # (B,C,T,H,W) -> (B, P, D) raster (t, h, w)


# --------------------------------------------------------------------------------------------
# Stochastic vector quantisation
# --------------------------------------------------------------------------------------------
@dataclass
class SVQOutput:
    indices: Tensor  # (B, N) int64
    z: Tensor  # (B, N, d) L2-normalised pre-quantisation vectors
    quantized: Tensor  # (B, N, d) normalised codes with straight-through gradient to z
    loss: Tensor  # commitment_weight * commit + codebook_weight * codebook
    loss_commit: Tensor
    loss_codebook: Tensor


class SVQ(nn.Module):
    """Stochastic VQ over an L2-normalised codebook: p = softmax(cos(z, codes) / temperature)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.temperature = cfg.svq_temperature
        self.commitment_weight = cfg.commitment_weight
        self.codebook_weight = cfg.codebook_weight
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)  # raw; normalised at use
        nn.init.kaiming_uniform_(self.embedding.weight)

    def codebook(self) -> Tensor:
        """(K, d) L2-normalised codebook (differentiable)."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def lookup(self, indices: Tensor) -> Tensor:
        """(...,) int -> (..., d) normalised codes."""
        return F.embedding(indices, self.codebook())

    def forward(self, z: Tensor, *, deterministic: bool = True, generator: torch.Generator | None = None) -> SVQOutput:
        # z: (B, N, d) unnormalised projections
        compute_dtype = torch.promote_types(z.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
        z = F.normalize(z.to(compute_dtype), p=2, dim=-1)
        emb = self.codebook().to(compute_dtype)  # (K, d)
        cos = z @ emb.t()  # (B, N, K)
        if deterministic:
            indices = cos.argmax(dim=-1)  # == nearest normalised code in L2
        else:
            probs = torch.softmax(cos / self.temperature, dim=-1)
            indices = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            indices = indices.reshape(cos.shape[:-1])
        q = F.embedding(indices, emb)  # (B, N, d)
        loss_commit = F.mse_loss(z, q.detach())
        loss_codebook = F.mse_loss(q, z.detach())
        loss = self.commitment_weight * loss_commit + self.codebook_weight * loss_codebook
        quantized = z + (q - z).detach()  # straight-through
        return SVQOutput(indices, z, quantized, loss, loss_commit, loss_codebook)


class Bottleneck(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.in_linear = nn.Linear(cfg.enc_dim, cfg.code_dim)
        self.out_linear = nn.Linear(cfg.code_dim, cfg.dec_dim)
        self.regularizer = SVQ(cfg)


class OutputLayer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dec_dim, eps=1e-6)
        self.linear = nn.Linear(cfg.dec_dim, cfg.patch_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm_final(x))


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
class LARPTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        t, h, w = cfg.grid
        P, N = cfg.num_patches, cfg.num_tokens

        self.x_embedder = PatchEmbed3D(cfg)
        self.register_buffer("encoder_patch_pe", sincos_3d(cfg.enc_dim, t, h, w).float().reshape(1, P, cfg.enc_dim))
        self.encoder_latent_query_embed = nn.Parameter(torch.randn(N, cfg.enc_dim) * cfg.query_init_std)
        self.encoder = ViT(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads)

        self.bottleneck = Bottleneck(cfg)

        pos = torch.arange(N, dtype=torch.float64)
        self.register_buffer("decoder_latent_pe", sincos_1d(cfg.dec_dim, pos, cfg.latent_pe_scale).float()[None])
        self.register_buffer(
            "decoder_patch_query_embed", sincos_3d(cfg.dec_dim, t, h, w).float().reshape(1, P, cfg.dec_dim)
        )
        self.decoder_patch_query_token_type_embed = nn.Parameter(torch.randn(1, 1, cfg.dec_dim) * 0.02)
        self.decoder = ViT(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads)
        self.final_layer = OutputLayer(cfg)

        self.prior_model = LARPPrior(cfg.prior) if cfg.prior is not None else None
        self._init_weights()

    def _init_weights(self) -> None:
        # authors' initialize_weights: xavier Linear, zero bias, conv like Linear, zeroed output layer
        for name, m in self.named_modules():
            if name.startswith("prior_model"):
                continue  # the prior keeps its GPT init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ---------------------------------------------------------------------------------------
    # validation at the public boundary
    # ---------------------------------------------------------------------------------------
    def check_video(self, video: object, name: str = "video") -> Tensor:
        c, T, H, W = self.config.video_shape
        if not isinstance(video, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape (B, {c}, {T}, {H}, {W}), got {type(video).__name__}"
            )
        if video.ndim != 5 or tuple(video.shape[1:]) != (c, T, H, W) or video.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape (B, {c}, {T}, {H}, {W}) with B >= 1 (channels first, float in [0, 1]), "
                f"got {tuple(video.shape)}; resize/crop to {T}x{H}x{W} and permute a (B, T, H, W, C) array with "
                f".permute(0, 4, 1, 2, 3)"
            )
        if not video.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point tensor in [0, 1], got dtype {video.dtype}; "
                "convert uint8 frames with video.float() / 255"
            )
        lo, hi = torch.aminmax(video)
        if not (torch.isfinite(lo) and torch.isfinite(hi) and lo >= 0 and hi <= 1):
            raise ValueError(
                f"{name} values must be finite and in [0, 1] (LARP uses no [-1, 1] shift), got range "
                f"[{lo.item():.4g}, {hi.item():.4g}]; rescale or clamp the input"
            )
        return video

    def check_indices(self, indices: object, name: str = "indices") -> Tensor:
        N, K = self.config.num_tokens, self.config.codebook_size
        if not isinstance(indices, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, {N}), got {type(indices).__name__}")
        if indices.ndim != 2 or indices.shape[1] != N or indices.shape[0] == 0:
            raise ValueError(f"{name} must have shape (B, {N}) with B >= 1, got {tuple(indices.shape)}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} must be an integer tensor (int64 or int32), got dtype {indices.dtype}")
        lo, hi = torch.aminmax(indices.to(torch.int64))
        if lo < 0 or hi >= K:
            raise ValueError(
                f"{name} must be codebook indices in [0, {K - 1}], got values in [{lo.item()}, {hi.item()}]"
            )
        return indices.to(torch.int64)

    # ---------------------------------------------------------------------------------------
    # encoder
    # ---------------------------------------------------------------------------------------
    def encode_latents(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) in [0, 1] -> (B, N, d) unnormalised code-space projections."""
        x = self.x_embedder(video) + self.encoder_patch_pe  # (B, P, D)
        q = self.encoder_latent_query_embed.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, D)
        z = self.encoder(x, q)  # (B, N, D) the query slots
        return self.bottleneck.in_linear(z)  # (B, N, d)

    def quantize(self, z: Tensor, *, deterministic: bool = True, generator: torch.Generator | None = None) -> SVQOutput:
        return self.bottleneck.regularizer(z, deterministic=deterministic, generator=generator)

    @torch.no_grad()
    def encode(self, video: Tensor, *, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Video (B, C, T, H, W) float in [0, 1] -> token indices (B, N) int64.

        ``deterministic=True`` (deployment, token extraction) takes the most likely code;
        ``False`` samples the SVQ distribution with ``generator``.
        """
        video = self.check_video(video)
        return self.quantize(self.encode_latents(video.to(self._dtype())), deterministic=deterministic,
                             generator=generator).indices

    # ---------------------------------------------------------------------------------------
    # decoder
    # ---------------------------------------------------------------------------------------
    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, N, d) normalised codes -> (B, C, T, H, W) reconstruction (unclamped; training path)."""
        z = self.bottleneck.out_linear(codes.to(self._dtype())) + self.decoder_latent_pe  # (B, N, D)
        q = (self.decoder_patch_query_embed + self.decoder_patch_query_token_type_embed).expand(z.shape[0], -1, -1)
        x = self.decoder(z, q)  # (B, P, D)
        return self.unpatchify(self.final_layer(x))  # (B, C, T, H, W)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Token indices (B, N) -> video (B, C, T, H, W) float, clamped to [0, 1]."""
        indices = self.check_indices(indices).to(self.bottleneck.regularizer.embedding.weight.device)
        return self.decode_codes(self.bottleneck.regularizer.lookup(indices)).clamp_(0.0, 1.0)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, P, pt*ph*pw*C) with per-patch channel order (pt, ph, pw, c) -> (B, C, T, H, W)."""
        cfg = self.config
        t, h, w = cfg.grid
        pt, p, c = cfg.temporal_patch, cfg.patch, cfg.in_channels
        x = x.reshape(x.shape[0], t, h, w, pt, p, p, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, c, t, pt, h, ph, w, pw)
        return x.reshape(x.shape[0], c, t * pt, h * p, w * p)

    # ---------------------------------------------------------------------------------------
    # training forward
    # ---------------------------------------------------------------------------------------
    def forward(
        self,
        video: Tensor,
        *,
        ss_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> dict[str, Tensor]:
        """Training forward: stochastic SVQ, reconstruction, VQ losses and (if present) the prior loss.

        Returns ``recon`` (unclamped), ``indices``, ``loss_q`` (weighted commit + codebook), ``loss_commit``,
        ``loss_codebook`` and, with a prior, ``loss_prior`` and ``prior_acc`` (round-1 top-1 accuracy).
        """
        svq = self.quantize(self.encode_latents(video), deterministic=deterministic, generator=generator)
        out = {
            "recon": self.decode_codes(svq.quantized),
            "indices": svq.indices,
            "loss_q": svq.loss,
            "loss_commit": svq.loss_commit,
            "loss_codebook": svq.loss_codebook,
        }
        if self.prior_model is not None:
            out.update(self.prior_loss(svq, ss_ratio=ss_ratio, generator=generator))
        return out

    def prior_loss(
        self, svq: SVQOutput, *, ss_ratio: float, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """AR prior loss with scheduled sampling (LARP.md section 2).

        The prior reads the straight-through quantised vectors (gradients reach the encoder through them) and
        scores its predictions against the *detached* normalised codebook: the codebook gets no gradient.
        """
        if self.prior_model is None:
            raise RuntimeError("this tokenizer was built without a prior (config.prior is None)")
        if not 0.0 <= ss_ratio <= 1.0:
            raise ValueError(f"ss_ratio must be in [0, 1], got {ss_ratio}")
        prior_cfg = self.prior_model.config
        ar_input = svq.quantized  # (B, N, d)
        labels = svq.indices[:, 1:]  # (B, N-1)
        emb = self.bottleneck.regularizer.codebook().detach().to(ar_input.dtype)  # (K, d)
        B, N, d = ar_input.shape
        mask = torch.rand(B, N - 1, 1, device=ar_input.device, generator=generator) < ss_ratio  # (B, N-1, 1)

        logits_rounds = []
        x = ar_input
        for r in range(prior_cfg.n_rounds):
            pred = self.prior_model.ar_predict(x)  # (B, N, d) normalised; slot 0 is the input
            logits = (pred @ emb.t())[:, 1:] / prior_cfg.latent_ce_temperature  # (B, N-1, K)
            logits_rounds.append(logits)
            if r < prior_cfg.n_rounds - 1:
                with torch.no_grad():
                    probs = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
                    sampled = torch.multinomial(probs, 1, generator=generator).reshape(B, N - 1)
                replaced = torch.where(mask, F.embedding(sampled, emb), ar_input[:, 1:])  # (B, N-1, d)
                x = torch.cat([ar_input[:, :1], replaced], dim=1)
        logits_all = torch.stack(logits_rounds)  # (R, B, N-1, K)
        loss = F.cross_entropy(logits_all.reshape(-1, logits_all.shape[-1]),
                               labels.unsqueeze(0).expand(len(logits_rounds), -1, -1).reshape(-1))
        acc = (logits_rounds[0].argmax(-1) == labels).float().mean()
        return {"loss_prior": loss, "prior_acc": acc.detach()}

    def _dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype
