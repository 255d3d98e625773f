"""A PyTorch rendition of DALLE2-pytorch's ``DiffusionPriorNetwork``, for parity tests.

Written from the prior spec (sections 1-3), not from the original code. Two variants:
``"laion"`` follows v1.1.0 (the code LAION's published prior was trained with: one
``null_text_embed`` table, no condition dropout, dot-product attention with the relative-position
bias amplified by 128) and ``"head"`` follows the current code (separate null tokens, keep-mask
condition dropout, cosine-sim attention with scale 16). Module nesting reproduces the reference's
state-dict key names (``causal_transformer.layers.0.1.5.weight`` ...), so that
``prior_state_dict_with_prefix`` gives a dict laid out like a LAION prior checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["laion", "head"]


class LayerNorm(nn.Module):
    """Gain-only LayerNorm over the last axis; ``stable`` first divides by the row max."""

    def __init__(self, dim: int, stable: bool = False, fp16_eps: float = 1e-3):
        super().__init__()
        self.stable, self.fp16_eps = stable, fp16_eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else self.fp16_eps
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
        return (x - x.mean(dim=-1, keepdim=True)) * (var + eps).rsqrt() * self.g


class SinusoidalPosEmb(nn.Module):
    """t [b] -> [b, dim]: sin half first, then cos."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class MLP(nn.Module):
    """[b, dim_in] -> [b, dim_out]; two SiLU hidden layers of width 2 * dim_out."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        hidden = int(2 * dim_out)
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU()),
            nn.Linear(hidden, dim_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


class RotaryEmbedding(nn.Module):
    """Interleaved-pair rotary embedding of the first ``len(freqs) * 2`` features."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def rotate_queries_or_keys(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n, d] -> [..., n, d], position p = index along the second-to-last axis."""
        rot = self.freqs.shape[0] * 2
        pos = torch.arange(t.shape[-2], device=t.device, dtype=self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None, :]).repeat_interleave(2, dim=-1)
        head, tail = t[..., :rot], t[..., rot:]
        pairs = head.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((head * angles.cos() + rotated * angles.sin(), tail), dim=-1)


class RelPosBias(nn.Module):
    """One-sided T5 bucketed bias [heads, i, j] for queries 0..i-1 and key slots 0..j-1."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, n: torch.Tensor) -> torch.Tensor:
        """Non-negative distances -> bucket indices (same shape)."""
        max_exact = self.num_buckets // 2
        scaled = torch.log(n.clamp(min=1).float() / max_exact) / math.log(
            self.max_distance / max_exact)
        large = max_exact + (scaled * (self.num_buckets - max_exact)).long()
        large = large.clamp(max=self.num_buckets - 1)
        return torch.where(n < max_exact, n, large)

    def buckets(self, i: int, j: int) -> torch.Tensor:
        """Bucket index [i, j] of query i against key slot j (slot 0 is the null k/v)."""
        device = self.relative_attention_bias.weight.device
        rel = torch.arange(j, device=device)[None, :] - torch.arange(i, device=device)[:, None]
        return self.bucket((-rel).clamp(min=0))

    def forward(self, i: int, j: int) -> torch.Tensor:
        """Bias [heads, i, j]."""
        return self.relative_attention_bias(self.buckets(i, j)).permute(2, 0, 1)


class Attention(nn.Module):
    """Causal multi-query attention [b, N, dim] -> [b, N, dim] with a null k/v slot at index 0."""

    def __init__(self, dim: int, dim_head: int, heads: int, rotary_emb: RotaryEmbedding,
                 variant: Variant, fp16_eps: float):
        super().__init__()
        self.heads, self.dim_head, self.variant = heads, dim_head, variant
        self.norm = LayerNorm(dim, fp16_eps=fp16_eps)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(2, dim_head))
        self.rotary_emb = rotary_emb
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False),
                                    LayerNorm(dim, fp16_eps=fp16_eps))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        h = self.norm(x)
        q = self.to_q(h).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
        k, v = self.to_kv(h).chunk(2, dim=-1)
        q = self.rotary_emb.rotate_queries_or_keys(q)
        k = self.rotary_emb.rotate_queries_or_keys(k)
        nk, nv = (t.expand(b, 1, self.dim_head) for t in self.null_kv[:, None, :].unbind(0))
        k, v = torch.cat((nk, k), dim=-2), torch.cat((nv, v), dim=-2)
        if self.variant == "head":
            sim = 16.0 * torch.einsum("bhid,bjd->bhij", F.normalize(q, dim=-1),
                                      F.normalize(k, dim=-1)) + attn_bias
        else:
            sim = torch.einsum("bhid,bjd->bhij", q, k) / math.sqrt(self.dim_head) + 128 * attn_bias
        causal = torch.ones(n, n + 1, dtype=torch.bool, device=x.device).triu(2)
        sim = sim.masked_fill(causal, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(-2)
        return self.to_out(out)


class SwiGLU(nn.Module):
    """[..., 2 * inner] -> [..., inner]: value half times silu(gate half)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.silu(gate)


def feed_forward(dim: int, mult: int, normformer: bool, fp16_eps: float) -> nn.Sequential:
    """SwiGLU feed-forward [b, N, dim] -> [b, N, dim], laid out at Sequential indices 0..5."""
    inner = int(mult * dim)
    return nn.Sequential(
        LayerNorm(dim, fp16_eps=fp16_eps),
        nn.Linear(dim, 2 * inner, bias=False),
        SwiGLU(),
        LayerNorm(inner, fp16_eps=fp16_eps) if normformer else nn.Identity(),
        nn.Dropout(0.0),
        nn.Linear(inner, dim, bias=False),
    )


class CausalTransformer(nn.Module):
    """Pre-norm causal transformer [b, N, dim] -> [b, N, dim] with stable final norm."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, ff_mult: int,
                 norm_in: bool, normformer: bool, final_proj: bool, variant: Variant):
        super().__init__()
        fp16_eps = 1e-5 if variant == "laion" else 1e-3
        self.init_norm = LayerNorm(dim, fp16_eps=fp16_eps) if norm_in else nn.Identity()
        self.rel_pos_bias = RelPosBias(heads)
        rotary = RotaryEmbedding(min(32, dim_head))
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, dim_head, heads, rotary, variant, fp16_eps),
                           feed_forward(dim, ff_mult, normformer, fp16_eps)])
            for _ in range(depth))
        self.norm = LayerNorm(dim, stable=True, fp16_eps=fp16_eps)
        self.project_out = nn.Linear(dim, dim, bias=False) if final_proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        x = self.init_norm(x)
        attn_bias = self.rel_pos_bias(n, n + 1)
        for attn, ff in self.layers:
            x = attn(x, attn_bias) + x
            x = ff(x) + x
        return self.project_out(self.norm(x))


def prob_mask_like(shape: tuple[int, ...], prob: float, device: torch.device) -> torch.Tensor:
    """Boolean mask of ``shape``, True with probability ``prob`` (exact at 0 and 1)."""
    if prob in (0, 1):
        return torch.full(shape, bool(prob), device=device)
    return torch.rand(shape, device=device) < prob


class PriorNetworkReference(nn.Module):
    """DiffusionPriorNetwork: (x_t [b, d], t [b], text_embed [b, d], text_encodings [b, L, d])
    -> prediction [b, d] (x0 for LAION's predict_x_start prior)."""

    def __init__(self, dim: int, depth: int, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 4, num_timesteps: int | None = None, max_text_len: int = 77,
                 normformer: bool = False, norm_in: bool = False, final_proj: bool = True,
                 variant: Variant = "laion", seed: int = 0):
        super().__init__()
        if variant not in ("laion", "head"):
            raise ValueError(f"unknown variant {variant!r}")
        self.dim, self.variant = dim, variant
        self.num_timesteps, self.max_text_len = num_timesteps, max_text_len
        if num_timesteps is not None:
            time_net: nn.Module = nn.Embedding(num_timesteps, dim)
        else:
            time_net = nn.Sequential(SinusoidalPosEmb(dim), MLP(dim, dim))
        self.to_time_embeds = nn.Sequential(time_net, nn.Unflatten(-1, (1, dim)))
        self.learned_query = nn.Parameter(torch.zeros(dim))
        if variant == "laion":
            self.null_text_embed = nn.Parameter(torch.zeros(1, max_text_len, dim))
        else:
            self.null_text_encodings = nn.Parameter(torch.zeros(1, max_text_len, dim))
            self.null_text_embeds = nn.Parameter(torch.zeros(1, 1, dim))
            self.null_image_embed = nn.Parameter(torch.zeros(1, dim))
        self.causal_transformer = CausalTransformer(dim, depth, dim_head, heads, ff_mult,
                                                    norm_in, normformer, final_proj, variant)
        self._randomise(seed)

    @torch.no_grad()
    def _randomise(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in sorted(self.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".g"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("weight", "bias")):
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise)

    def forward(self, image_embed: torch.Tensor, timesteps: torch.Tensor,
                text_embed: torch.Tensor, text_encodings: torch.Tensor | None = None,
                text_cond_drop_prob: float = 0.0,
                image_cond_drop_prob: float = 0.0) -> torch.Tensor:
        b, device = image_embed.shape[0], image_embed.device
        text_tok, image_tok = text_embed[:, None, :], image_embed[:, None, :]
        if text_encodings is None:
            text_encodings = image_embed.new_zeros(b, 0, self.dim)
        enc = text_encodings[:, : self.max_text_len]
        pad = self.max_text_len - enc.shape[1]
        mask = F.pad((enc != 0).any(dim=-1), (0, pad), value=False)
        enc = F.pad(enc, (0, 0, 0, pad))
        if self.variant == "laion":
            enc = torch.where(mask[..., None], enc, self.null_text_embed)
        else:
            text_keep = prob_mask_like((b, 1, 1), 1 - text_cond_drop_prob, device)
            image_keep = prob_mask_like((b, 1, 1), 1 - image_cond_drop_prob, device)
            enc = torch.where(mask[..., None] & text_keep, enc, self.null_text_encodings)
            text_tok = torch.where(text_keep, text_tok, self.null_text_embeds)
            image_tok = torch.where(image_keep, image_tok, self.null_image_embed)
        if self.num_timesteps is not None:
            time_tok = self.to_time_embeds(timesteps.long())
        else:
            t = timesteps.to(image_embed.dtype) if self.variant == "head" else timesteps
            time_tok = self.to_time_embeds(t)
        query = self.learned_query.expand(b, 1, self.dim)
        tokens = torch.cat((enc, text_tok, time_tok, image_tok, query), dim=1)
        return self.causal_transformer(tokens)[:, -1]


def cosine_schedule_buffers(timesteps: int) -> dict[str, torch.Tensor]:
    """The 13 ``noise_scheduler.*`` buffers of a cosine schedule, each float32 [timesteps]."""
    s = 0.008
    x = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64)
    acp = np.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    acp = acp / acp[0]
    betas = np.clip(1 - acp[1:] / acp[:-1], 0, 0.999)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    prev = np.concatenate(([1.0], ac[:-1]))
    post_var = betas * (1 - prev) / (1 - ac)
    bufs = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
        "log_one_minus_alphas_cumprod": np.log(1 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(alphas) / (1 - ac),
        "p2_loss_weight": np.ones_like(betas),
    }
    return {f"noise_scheduler.{k}": torch.from_numpy(v.astype(np.float32)) for k, v in bufs.items()}


def prior_state_dict_with_prefix(model: PriorNetworkReference) -> dict[str, torch.Tensor]:
    """A DiffusionPrior-style state dict: ``net.*`` weights plus the cosine schedule buffers."""
    out = {f"net.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update(cosine_schedule_buffers(model.num_timesteps or 1000))
    return out


if __name__ == "__main__":
    b, d = 2, 64
    gen = torch.Generator().manual_seed(1)
    x_t, text_embed = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    encodings = torch.randn(b, 10, d, generator=gen)
    encodings[0, 6:] = 0
    t = torch.tensor([3, 998])
    for variant in ("laion", "head"):
        net = PriorNetworkReference(d, 2, dim_head=16, heads=4, num_timesteps=1000,
                                    variant=variant).eval()
        print(f"--- {variant}")
        for key, value in sorted(prior_state_dict_with_prefix(net).items()):
            print(f"{key} {tuple(value.shape)}")
        with torch.no_grad():
            out = net(x_t, t, text_embed, encodings)
            dropped = net(x_t, t, text_embed, encodings, 1.0, 1.0)
        assert torch.isfinite(out).all()
        print("output", tuple(out.shape), "dropped differs:", not torch.allclose(out, dropped))
        assert (variant == "head") == (not torch.allclose(out, dropped))
    print("buckets N=6:\n", net.causal_transformer.rel_pos_bias.buckets(6, 7))
    cont = PriorNetworkReference(d, 1, dim_head=16, heads=4, variant="head")
    print([k for k in cont.state_dict() if k.startswith("to_time")])
    assert cont(x_t, t.float(), text_embed).shape == (b, d)
    print("beta[0]", cosine_schedule_buffers(1000)["noise_scheduler.betas"][0].item())
