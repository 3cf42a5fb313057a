"""The S3-DiT: Z-Image's single-stream diffusion transformer (Turbo, Base and the Omni/edit branch).

Forward semantics follow the reference exactly (``docs/model.md``, section 1): the model receives ``t = 1 - sigma``; captions and images are padded to a
multiple of 32 with *learned, unmasked* pad tokens inserted after the embedders; positions are
3-axis integer ids; the raw output is ``x0 - noise`` (the sampler negates it).

The text-to-image path is split so a sampler pays for the caption only once per generation:
:meth:`ZImageDiT.prepare` embeds and refines the captions (they do not depend on ``t``) and builds
every position table, then :meth:`ZImageDiT.denoise` runs one step. ``forward`` does both.

``denoise(..., control=[...])`` takes per-step control branches (a ControlNet bound to its control latents:
:class:`zimage_core.controlnet.ControlInput`) whose hints are added inside the step; see :data:`StepControl`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DiTConfig
from .layers import (
    FinalLayer,
    RMSNorm,
    Rope,
    TimestepEmbedder,
    TransformerBlock,
    make_rope,
    select_per_token,
    stream_dtype,
)


def _pad_len(n: int, multiple: int) -> int:
    return (-n) % multiple


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]``, tokens row-major, vector ordered (ph, pw, c)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def _caption_positions(padded_len: int, start: int, device) -> torch.Tensor:
    """Caption token k (real or pad) sits at (start + k, 0, 0)."""
    pos = torch.zeros(padded_len, 3, dtype=torch.int64, device=device)
    pos[:, 0] = torch.arange(start, start + padded_len, device=device)
    return pos


def _batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-sample sequences; when lengths differ, zero-pad and return a key mask ``[B,1,1,S]``."""
    lens = [s.shape[0] for s in seqs]
    if len(set(lens)) == 1:
        return torch.stack(seqs), None
    out = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = torch.arange(out.shape[1], device=out.device)[None, :] < torch.tensor(lens, device=out.device)[:, None]
    return out, mask[:, None, None, :]


#: A control branch for one step: ``control(dit, x_tokens, adaln, plan) -> run``, called once per step with the
#: embedded image tokens (before the noise refiner), the t-embedding and the plan. The run then gives
#: ``run.refiner_hint(i)`` after noise-refiner layer ``i`` and ``run.layer_hint(i)`` after main layer ``i``
#: (a tensor to add to the hidden states, or None), and sees the joint sequence through
#: ``run.enter_layers(h)`` right before the main layers.
StepControl = Callable[[Any, torch.Tensor, torch.Tensor, "StepPlan"], Any]


def _add_hints(h: torch.Tensor, hints) -> torch.Tensor:
    for hint in hints:
        if hint is not None:
            h = h + hint.to(h.dtype)
    return h


@dataclass
class PreparedCaptions:
    """Embedded, refined captions and their positions: constant over the sampling steps."""

    tokens: list[torch.Tensor]  # per sample [Lc_pad_i, dim]
    padded_lens: list[int]


@dataclass
class StepPlan:
    """Everything a denoising step needs that does not depend on the latent or ``t``."""

    captions: PreparedCaptions
    height: int  # latent size
    width: int
    n_img: int  # real image tokens
    n_img_pad: int
    img_rope: Rope  # [B, N_pad, 1, D/2]
    joint_rope: Rope
    joint_mask: torch.Tensor | None
    joint: torch.Tensor | None = None  # caption part of the joint sequence, batched (set lazily)


class ZImageDiT(nn.Module):
    """``ZImageTransformer2DModel`` with ComfyUI parameter names (fused qkv)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim, bias=True)
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, cfg.t_mid_dim)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim, bias=True)
        )
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(cfg, True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        if cfg.is_omni:
            self.siglip_embedder = nn.Sequential(
                RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps), nn.Linear(cfg.siglip_feat_dim, cfg.dim, bias=True)
            )
            self.siglip_refiner = nn.ModuleList(TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))

    # ---- small helpers -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype of the token stream between blocks: float32 for float16 weights (it can exceed float16's
        range on some checkpoints; the blocks keep every matmul in float16, see :mod:`zimage_core.layers`)."""
        return stream_dtype(self.dtype)

    def _run(self, block: TransformerBlock, x, rope, mask, mod=None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, mask, mod, use_reentrant=False)
        return block(x, rope, mask, mod)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """t-embedding ``[B, adaln_dim]`` for ``t = 1 - sigma`` in [0, 1]."""
        return self.t_embedder(t * self.cfg.t_scale).to(self.dtype)

    def _embed_padded(self, feats: torch.Tensor, embedder: nn.Module, pad_token: torch.Tensor, total: int):
        """Embed ``[L, C]`` rows and append ``total - L`` learned pad tokens (inserted after the embedder)."""
        emb = embedder(feats.to(self.dtype))
        n_pad = total - emb.shape[0]
        if n_pad:
            emb = torch.cat([emb, pad_token.to(emb.dtype).expand(n_pad, -1)], dim=0)
        return emb.to(self.residual_dtype)

    # ---- text-to-image -----------------------------------------------------------------------
    def prepare_captions(self, cap_feats: list[torch.Tensor]) -> PreparedCaptions:
        """Embed + context-refine each caption ``[L_i, cap_feat_dim]`` (independent of ``t``)."""
        cfg = self.cfg
        tokens, lens, poss = [], [], []
        for feats in cap_feats:
            if feats.ndim != 2 or feats.shape[-1] != cfg.cap_feat_dim or feats.shape[0] == 0:
                raise ValueError(
                    f"caption features must be [length > 0, {cfg.cap_feat_dim}], got {tuple(feats.shape)}; "
                    "was the text encoded by the matching text encoder?"
                )
            lc = feats.shape[0]
            lp = lc + _pad_len(lc, cfg.seq_multiple)
            tokens.append(self._embed_padded(feats.to(self.device), self.cap_embedder, self.cap_pad_token, lp))
            lens.append(lp)
            poss.append(_caption_positions(lp, 1, self.device))
        x, mask = _batch(tokens)
        rope = make_rope(_batch(poss)[0], cfg)
        for block in self.context_refiner:
            x = self._run(block, x, rope, mask)
        return PreparedCaptions([x[i, : lens[i]] for i in range(len(lens))], lens)

    def plan(self, captions: PreparedCaptions, height: int, width: int) -> StepPlan:
        """Positions and masks for latents of ``height x width`` (latent pixels) with these captions."""
        cfg, p, dev = self.cfg, self.cfg.patch_size, self.device
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be a multiple of the patch size {p}")
        ht, wt = height // p, width // p
        n = ht * wt
        n_pad = n + _pad_len(n, cfg.seq_multiple)
        grid = torch.stack(
            torch.meshgrid(torch.arange(ht, device=dev), torch.arange(wt, device=dev), indexing="ij"), -1
        )
        img_pos, joint_pos = [], []
        for lp in captions.padded_lens:
            pos = torch.zeros(n_pad, 3, dtype=torch.int64, device=dev)
            pos[:n, 0] = lp + 1
            pos[:n, 1:] = grid.reshape(n, 2)
            img_pos.append(pos)
            joint_pos.append(torch.cat([pos, _caption_positions(lp, 1, dev)]))
        joint_pos_b, joint_mask = _batch(joint_pos)
        return StepPlan(
            captions=captions,
            height=height,
            width=width,
            n_img=n,
            n_img_pad=n_pad,
            img_rope=make_rope(torch.stack(img_pos), cfg),
            joint_rope=make_rope(joint_pos_b, cfg),
            joint_mask=joint_mask,
        )

    def prepare(self, cap_feats: list[torch.Tensor], height: int, width: int) -> StepPlan:
        return self.plan(self.prepare_captions(cap_feats), height, width)

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, plan: StepPlan, control: Sequence[StepControl] | None = None
    ) -> torch.Tensor:
        """One forward: latents ``[B, C, H, W]`` at ``t`` ``[B]`` -> raw output ``[B, C, H, W]`` (= x0 - noise).

        ``control``: ControlNets active at this step (their hints sum); None or empty: the plain step.
        """
        cfg = self.cfg
        b = x.shape[0]
        if b != len(plan.captions.tokens):
            raise ValueError(f"{b} latents but {len(plan.captions.tokens)} captions; give one caption per latent")
        adaln = self.embed_time(t.to(self.device))
        h = self.x_embedder(patchify(x.to(self.dtype), cfg.patch_size)).to(self.residual_dtype)
        if plan.n_img_pad > plan.n_img:
            h = torch.cat([h, self.x_pad_token.to(h.dtype).expand(b, plan.n_img_pad - plan.n_img, -1)], dim=1)
        runs = [c(self, h, adaln, plan) for c in control] if control else None
        for i, block in enumerate(self.noise_refiner):
            h = self._run(block, h, plan.img_rope, None, block.modulation(adaln))
            if runs:
                h = _add_hints(h, [r.refiner_hint(i) for r in runs])
        if plan.joint_mask is None:
            cap = torch.stack(plan.captions.tokens)
            h = torch.cat([h, cap.to(h.dtype)], dim=1)
        else:
            # pad only: the mask is the plan's (building it again would copy lengths to the device every step)
            h = torch.nn.utils.rnn.pad_sequence(
                [torch.cat([h[i], c.to(h.dtype)]) for i, c in enumerate(plan.captions.tokens)], batch_first=True
            )
        if runs:
            for r in runs:
                r.enter_layers(h)
        for i, block in enumerate(self.layers):
            h = self._run(block, h, plan.joint_rope, plan.joint_mask, block.modulation(adaln))
            if runs:
                h = _add_hints(h, [r.layer_hint(i) for r in runs])
        scale = 1.0 + self.final_layer.adaLN_modulation(adaln).unsqueeze(1)
        out = self.final_layer(h[:, : plan.n_img], scale)
        return unpatchify(out, plan.height, plan.width, cfg.patch_size, cfg.in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cap_feats: list[torch.Tensor]) -> torch.Tensor:
        """Text-to-image forward, ``x`` ``[B, C, H, W]`` -> raw output (prepare + one denoise step)."""
        return self.denoise(x, t, self.prepare(cap_feats, x.shape[-2], x.shape[-1]))

    # ---- Omni / edit ---------------------------------------------------------------------------
    def forward_omni(
        self,
        images: list[list[torch.Tensor]],
        t: torch.Tensor,
        cap_segments: list[list[torch.Tensor]],
        siglip: list[list[torch.Tensor | None]] | None = None,
    ) -> torch.Tensor:
        """Omni forward: per sample ``[ref_1..ref_N, target]`` latents ``[C, H, W]`` (refs clean, used at t = 1),
        ``N + 2`` caption segments, and optional SigLIP features ``[h, w, siglip_dim]`` per reference (None for
        the target). Returns the raw output for the targets ``[B, C, H, W]``.

        Caption positions follow ComfyUI (each segment spans exactly its padded length), which equals the
        diffusers numbering whenever no caption segment needs padding.
        """
        adaln_noisy = self.embed_time(t.to(self.device))
        adaln_clean = self.embed_time(torch.ones_like(t, device=self.device))
        seqs, offsets, sizes = [], [], []
        for i, (imgs, segs) in enumerate(zip(images, cap_segments)):
            parts, target_at = self._omni_sample(imgs, segs, siglip[i] if siglip else None)
            seqs.append(parts)
            offsets.append(target_at)
            sizes.append(tuple(imgs[-1].shape[-2:]))
        if len(set(sizes)) != 1:
            raise ValueError(f"all targets in a batch must have the same size, got {sizes}")
        return self._omni_run(seqs, offsets, sizes[0], adaln_noisy, adaln_clean)

    def _omni_sample(self, imgs, segs, sigs):
        """Embed one Omni sample: ``{modality: (tokens, positions, noise mask)}`` and the target's image offset."""
        cfg, dev, p = self.cfg, self.device, self.cfg.patch_size
        n_ref = len(imgs) - 1
        if len(segs) != n_ref + 2:
            raise ValueError(f"{n_ref} reference images need {n_ref + 2} caption segments, got {len(segs)}")
        if sigs is not None and cfg.siglip_feat_dim is None:
            raise ValueError("SigLIP features were given but this model has no SigLIP branch (not an Omni model)")
        noise_of = [0] * n_ref + [1]
        cap_tok, cap_pos, cap_nm, end_pos = [], [], [], []
        cu = 1
        for j, seg in enumerate(segs):
            lc = seg.shape[0]
            lp = lc + _pad_len(lc, cfg.seq_multiple)
            cap_tok.append(self._embed_padded(seg.to(dev), self.cap_embedder, self.cap_pad_token, lp))
            cap_pos.append(_caption_positions(lp, cu, dev))
            cap_nm += [noise_of[j] if j < len(noise_of) else 1] * lp
            end_pos.append(cu + lc)
            cu += lc + 2
        img_tok, img_pos, img_nm, img_lens = [], [], [], []
        for j, img in enumerate(imgs):
            c, h, w = img.shape
            toks = self.x_embedder(patchify(img[None].to(self.dtype), p)[0]).to(self.residual_dtype)
            n = toks.shape[0]
            npad = n + _pad_len(n, cfg.seq_multiple)
            if npad > n:
                toks = torch.cat([toks, self.x_pad_token.to(toks.dtype).expand(npad - n, -1)])
            pos = torch.zeros(npad, 3, dtype=torch.int64, device=dev)
            grid = torch.meshgrid(torch.arange(h // p, device=dev), torch.arange(w // p, device=dev), indexing="ij")
            pos[:n, 0] = end_pos[j]
            pos[:n, 1], pos[:n, 2] = grid[0].reshape(-1), grid[1].reshape(-1)
            img_tok.append(toks)
            img_pos.append(pos)
            img_nm += [noise_of[j]] * npad
            img_lens.append(npad)
        sig_tok, sig_pos, sig_nm = [], [], []
        if sigs is not None:
            for j, img in enumerate(imgs):
                feat = sigs[j] if j < len(sigs) else None
                if feat is None:
                    n, npad = 0, cfg.seq_multiple
                    toks = self.siglip_pad_token.to(self.residual_dtype).expand(npad, -1)
                    pos = torch.zeros(npad, 3, dtype=torch.int64, device=dev)
                else:
                    sh, sw, sc = feat.shape
                    # The reference flattens [h, w, C] through a [C, h, w] permute; kept for weight compatibility.
                    flat = feat.to(dev).permute(2, 0, 1).reshape(sh * sw, sc)
                    n = sh * sw
                    npad = n + _pad_len(n, cfg.seq_multiple)
                    toks = self._embed_padded(flat, self.siglip_embedder, self.siglip_pad_token, npad)
                    gh, gw = torch.meshgrid(torch.arange(sh, device=dev), torch.arange(sw, device=dev), indexing="ij")
                    lat_h, lat_w = img.shape[-2:]
                    pos = torch.zeros(npad, 3, dtype=torch.int64, device=dev)
                    pos[:n, 0] = end_pos[j] + 1
                    pos[:n, 1] = (gh.reshape(-1).float() / max(sh - 1, 1) * (lat_h - 1)).to(torch.int64)
                    pos[:n, 2] = (gw.reshape(-1).float() / max(sw - 1, 1) * (lat_w - 1)).to(torch.int64)
                sig_tok.append(toks)
                sig_pos.append(pos)
                sig_nm += [noise_of[j]] * npad
        parts = {
            "cap": (torch.cat(cap_tok), torch.cat(cap_pos), cap_nm),
            "img": (torch.cat(img_tok), torch.cat(img_pos), img_nm),
            "sig": (torch.cat(sig_tok), torch.cat(sig_pos), sig_nm) if sig_tok else None,
        }
        return parts, sum(img_lens[:-1])

    def _omni_run(self, seqs, offsets, size, adaln_noisy, adaln_clean):
        cfg, dev = self.cfg, self.device

        def refine(key: str, blocks, modulated: bool):
            toks, mask_key = _batch([s[key][0] for s in seqs])
            pos, _ = _batch([s[key][1] for s in seqs])
            nm, _ = _batch([torch.tensor(s[key][2], device=dev) for s in seqs])
            rope = make_rope(pos, cfg)
            for block in blocks:
                mod = block.modulation(adaln_noisy, adaln_clean, nm) if modulated else None
                toks = self._run(block, toks, rope, mask_key, mod)
            lens = [len(s[key][2]) for s in seqs]
            return [toks[i, : lens[i]] for i in range(len(seqs))]

        img = refine("img", self.noise_refiner, True)
        cap = refine("cap", self.context_refiner, False)
        has_sig = all(s["sig"] is not None for s in seqs)
        sig = refine("sig", self.siglip_refiner, False) if has_sig else None
        joint, joint_pos, joint_nm, img_start = [], [], [], []
        for i, s in enumerate(seqs):
            chunks = [cap[i], img[i]] + ([sig[i]] if has_sig else [])
            keys = ["cap", "img"] + (["sig"] if has_sig else [])
            joint.append(torch.cat(chunks))
            joint_pos.append(torch.cat([s[k][1] for k in keys]))
            joint_nm.append(torch.tensor(sum((s[k][2] for k in keys), []), device=dev))
            img_start.append(cap[i].shape[0] + offsets[i])
        h, mask = _batch(joint)
        rope = make_rope(_batch(joint_pos)[0], cfg)
        nm, _ = _batch(joint_nm)
        for block in self.layers:
            h = self._run(block, h, rope, mask, block.modulation(adaln_noisy, adaln_clean, nm))
        ada = self.final_layer.adaLN_modulation
        scale = select_per_token(1.0 + ada(adaln_noisy), 1.0 + ada(adaln_clean), nm)
        out = self.final_layer(h, scale)
        lh, lw = size
        n = (lh // cfg.patch_size) * (lw // cfg.patch_size)
        target = torch.stack([out[i, img_start[i] : img_start[i] + n] for i in range(len(seqs))])
        return unpatchify(target, lh, lw, cfg.patch_size, cfg.in_channels)
