"""Building blocks of the S3-DiT: norms, 3-axis RoPE, attention, SwiGLU, the transformer block.

Module and parameter names follow the ComfyUI single-file layout (fused ``attention.qkv``,
``attention.out``, ``q_norm``/``k_norm``), so that file loads without renaming; the diffusers
layout is mapped onto it by the key table in :mod:`zimage_core.checkpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .config import DiTConfig

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention over ``[B, H, S, D]``; ``mask`` is a bool ``[B, 1, 1, S]`` (True = attend) or None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class RMSNorm(nn.Module):
    """RMSNorm with the statistics in float32 (as the reference), output in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (y.to(self.weight.dtype) * self.weight).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE: interleaved pairs, one frequency table per axis, positions are integer (axis0, h, w).
# ---------------------------------------------------------------------------------------------
class Rope:
    """Rotations for a set of token positions: a complex table ``[B, S, 1, head_dim/2]`` (complex64).

    ``cos``/``sin`` are its real and imaginary parts.
    """

    __slots__ = ("freqs",)

    def __init__(self, freqs: torch.Tensor):
        self.freqs = freqs

    @property
    def cos(self) -> torch.Tensor:
        return self.freqs.real

    @property
    def sin(self) -> torch.Tensor:
        return self.freqs.imag


def rope_angles(pos: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """Angles ``[..., head_dim/2]`` for integer positions ``[..., 3]``.

    Frequencies are built in float64 and the angles rounded to float32, exactly like the reference
    tables (``theta ** (-arange(0, d, 2) / d)``, outer product in float64, then ``.float()``).
    """
    parts = []
    for axis, d in enumerate(cfg.axes_dims):
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d))
        parts.append((pos[..., axis].to(torch.float64)[..., None] * freqs).float())
    return torch.cat(parts, dim=-1)


def make_rope(pos: torch.Tensor, cfg: DiTConfig) -> Rope:
    """Rope tables for positions ``[B, S, 3]``; rows of padding may carry any position.

    The angles are computed from the positions, so there is no table to overflow: positions beyond the
    reference table's length (``axes_lens``, e.g. a prompt longer than 1536 tokens with ``max_length=None``)
    work (:func:`zimage_core.pipeline.denoise_latents` warns that the model was not trained on them).
    """
    ang = rope_angles(pos, cfg)
    return Rope(torch.complex(torch.cos(ang), torch.sin(ang)).unsqueeze(2))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x`` ``[B, S, H, D]`` in float32.

    One complex multiply: ``(x0 + i x1)(cos + i sin)`` is exactly ``(x0 cos - x1 sin, x0 sin + x1 cos)``,
    in a single pass over memory instead of six elementwise kernels and a stack.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope.freqs).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = onednn.linear(self.qkv, x).view(b, s, 3, self.n_heads, self.head_dim).unbind(2)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        o = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return onednn.linear(self.out, o.transpose(1, 2).reshape(b, s, -1).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn.swiglu(self.w1, self.w2, self.w3, x)


class Modulation:
    """The four per-block vectors, already as ``1 + scale`` and ``tanh(gate)``, broadcastable to ``[B, S, dim]``."""

    __slots__ = ("scale_msa", "gate_msa", "scale_mlp", "gate_mlp")

    def __init__(self, scale_msa, gate_msa, scale_mlp, gate_mlp):
        self.scale_msa, self.gate_msa, self.scale_mlp, self.gate_mlp = scale_msa, gate_msa, scale_mlp, gate_mlp


def select_per_token(noisy: torch.Tensor, clean: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` noisy/clean vectors -> ``[B, S, C]`` chosen by ``noise_mask`` ``[B, S]`` (1 = noisy)."""
    return torch.where(noise_mask.unsqueeze(-1) == 1, noisy.unsqueeze(1), clean.unsqueeze(1))


class TransformerBlock(nn.Module):
    """Sandwich-norm block; modulated blocks take ``1 + scale`` and ``tanh(gate)`` from the t-embedding."""

    def __init__(self, cfg: DiTConfig, modulated: bool):
        super().__init__()
        self.dim = cfg.dim
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim, bias=True))

    def modulation(
        self, adaln: torch.Tensor, adaln_clean: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None
    ) -> Modulation:
        """Vectors for t-embedding ``adaln`` ``[B, adaln_dim]``; per token when a noise mask is given (Omni)."""

        def split(e: torch.Tensor):
            s1, g1, s2, g2 = self.adaLN_modulation(e).chunk(4, dim=-1)
            return 1.0 + s1, g1.tanh(), 1.0 + s2, g2.tanh()

        noisy = split(adaln)
        if noise_mask is None:
            return Modulation(*(v.unsqueeze(1) for v in noisy))
        clean = split(adaln_clean)
        return Modulation(*(select_per_token(n, c, noise_mask) for n, c in zip(noisy, clean)))

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, mod: Modulation | None = None):
        if x.dtype == torch.float32 and self.attention_norm1.weight.dtype == torch.float16:
            return _block_fp16(self, x, rope, mask, mod)
        if mod is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        x = x + mod.gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * mod.scale_msa, rope, mask))
        return x + mod.gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * mod.scale_mlp))


# ---------------------------------------------------------------------------------------------
# float16 without overflow
# ---------------------------------------------------------------------------------------------
# In float16 the block's intermediate activations can exceed 65504 (the SwiGLU product, the attention and
# feed-forward outputs of checkpoints with large weights: Base, many fine-tunes). Every such value feeds an RMSNorm
# (the sandwich post-norms, the q/k norms), and RMSNorm is scale-invariant: ``rms(y / s, eps / s^2) ==
# rms(y, eps)``. So each float16 matmul gets its input divided, per token, by a power of two ``s`` chosen so its
# output cannot overflow (exact: powers of two do not round), and the following norm runs in float32 with
# ``eps / s^2``. The SwiGLU's nonlinearity and product, the norms and the residual stream are float32 (the DiT
# keeps its residual stream in float32 when its weights are float16); every matmul stays float16.

_FP16_SAFE = 2.0**14  # a matmul's output stays below this (float16's largest value is 65504)
_DEFAULT_BOUND = 2.0**9  # when a weight's row sums are unknown (quantized or wrapped linears)


def _row_l1(linear: nn.Module) -> float:
    """The largest L1 norm of a row of ``linear``'s weight: ``|W x|`` is at most this times ``max |x|``."""
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
        return _DEFAULT_BOUND
    key = (w.data_ptr(), w._version, w.device)
    cached = linear.__dict__.get("_zimage_row_l1")
    if cached is None or cached[0] != key:
        cached = (key, float(w.float().abs().sum(dim=1).max()))
        linear.__dict__["_zimage_row_l1"] = cached
    return max(cached[1], 1e-6)


def _pow2_scale(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor:
    """Per token ``s = 2^k >= 1`` so that ``linear(x / s)`` stays below :data:`_FP16_SAFE` for every linear."""
    bound = max(_row_l1(m) for m in linears)
    need = x.abs().amax(dim=-1, keepdim=True).float() * (bound / _FP16_SAFE)
    return torch.exp2(torch.ceil(torch.log2(need.clamp_min(1.0))))


def stream_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model's token stream between blocks: float32 for float16 weights (it can exceed float16's
    range on some checkpoints; the blocks keep every matmul in float16), else the weights' dtype."""
    return torch.float32 if weight_dtype == torch.float16 else weight_dtype


def stream_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for a token stream ``x``: a float32 stream of a float16 model (see ``residual_dtype``) goes
    through the float16 matmul divided per token by a power of two so it cannot overflow, and comes back float32
    (bias added in float32); any other stream is the plain call. For projections whose output is not normalised
    (the ControlNet's ``before_proj``/``after_proj``), so the scale has to be undone exactly (powers of two are)."""
    w = getattr(linear, "weight", None)
    if x.dtype != torch.float32 or not isinstance(w, torch.Tensor) or w.dtype != torch.float16:
        return linear(x)
    if not isinstance(linear, nn.Linear):  # quantized / wrapped linears: float16 in, float32 out
        return linear(x.half()).float()
    s = _pow2_scale(x, linear)
    y = F.linear((x / s).half(), w).float() * s
    return y if linear.bias is None else y + linear.bias.float()


def _rms32(y: torch.Tensor, norm: RMSNorm, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(y * scale)`` in float32 for ``y`` that is the true value divided by ``scale`` (per token)."""
    eps = norm.eps if scale is None else norm.eps / scale.square()
    return y * torch.rsqrt(y.square().mean(dim=-1, keepdim=True) + eps) * norm.weight.float()


def _attention_fp16(attn: Attention, a: torch.Tensor, rope: Rope, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of float32 ``a`` with float16 matmuls; returns ``(y / s, s)``."""
    b, n, _ = a.shape
    s1 = _pow2_scale(a, attn.qkv)
    q, k, v = attn.qkv((a / s1).half()).view(b, n, 3, attn.n_heads, attn.head_dim).unbind(2)
    s_head = s1.unsqueeze(-1)
    q = apply_rope(_rms32(q.float(), attn.q_norm, s_head), rope).half()
    k = apply_rope(_rms32(k.float(), attn.k_norm, s_head), rope).half()
    o = attn.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    o = o.transpose(1, 2).reshape(b, n, -1).float()  # the true output / s1
    s2 = _pow2_scale(o, attn.out)
    return attn.out((o / s2).half()).float(), s1 * s2


def _feed_forward_fp16(ff: FeedForward, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SwiGLU of float32 ``f`` with float16 matmuls; returns ``(y / s, s)``."""
    s1 = _pow2_scale(f, ff.w1, ff.w3)
    x16 = (f / s1).half()
    hidden = F.silu(ff.w1(x16).float() * s1) * (ff.w3(x16).float() * s1)
    s2 = _pow2_scale(hidden, ff.w2)
    return ff.w2((hidden / s2).half()).float(), s2


def _block_fp16(block: TransformerBlock, x: torch.Tensor, rope: Rope, mask, mod: Modulation | None):
    """:meth:`TransformerBlock.forward` for float16 weights and a float32 residual stream ``x``."""
    a = _rms32(x, block.attention_norm1)
    if mod is not None:
        a = a * mod.scale_msa.float()
    y, s = _attention_fp16(block.attention, a, rope, mask)
    y = _rms32(y, block.attention_norm2, s)
    x = x + (y if mod is None else mod.gate_msa.float() * y)
    f = _rms32(x, block.ffn_norm1)
    if mod is not None:
        f = f * mod.scale_mlp.float()
    y, s = _feed_forward_fp16(block.feed_forward, f)
    y = _rms32(y, block.ffn_norm2, s)
    return x + (y if mod is None else mod.gate_mlp.float() * y)


class TimestepEmbedder(nn.Module):
    """Sinusoid (cos first) -> Linear -> SiLU -> Linear."""

    def __init__(self, out_dim: int, mid_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.dim = cfg.dim
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim, bias=True))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` is ``1 + adaLN(c)``, broadcastable to ``x`` (a float32 residual stream of a float16 model is
        normalised in float32 and projected in float16)."""
        y = F.layer_norm(x, (self.dim,), eps=1e-6) * scale
        return self.linear(y if y.dtype == self.linear.weight.dtype else y.to(self.linear.weight.dtype))
