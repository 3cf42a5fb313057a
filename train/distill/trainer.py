"""The distillation loop: :class:`Distiller` turns a teacher DiT into an N-step, CFG-free student.

One optimizer step of the student (the "step" of ``max_steps``) is ``ttur`` fake-score updates followed by one
generator update, each over ``grad_accum`` micro-batches of captions (and latents, for the GAN or real-latent
inputs) from the data cache:

- *fake turn*: the student draws ``x0`` (backward simulation, no gradients); the fake score learns it by flow
  matching (:func:`losses.fake_score_loss`), plus the GAN head's discriminator loss;
- *generator turn*: the student draws ``x0`` with gradients at grid index ``k``; the teacher (real score) and the
  fake score give the update direction (:mod:`train.distill.losses`: DMD2, Decoupled DMD or CFG augmentation only)
  and the surrogate loss moves ``x0`` along it (plus the GAN generator loss).

Every model call goes through the engine's :class:`~zimage_core.denoiser.Denoiser` (the DiT flips in one place);
the backward simulation and the sample images use the engine's sampling loop. Randomness: the grid index of a
turn comes from a generator keyed by ``(seed, step, turn)`` (the same on every process), each micro-batch's noise
from one keyed by its global index (:mod:`train.parallel`), so any number of processes trains the same student.

Parallelism: a full student is FSDP2-sharded with ``sharding = "fsdp2"`` (or an accelerate FSDP2 config), else
replicated; the teacher is replicated and frozen; replicated trained tensors (a full unsharded student, every
LoRA, the GAN head) get their gradients averaged by :func:`train.parallel.average_gradients`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from zimage_core.denoiser import Denoiser
from zimage_core.errors import ZImageError

from ..ema import EMA
from ..objective import shift_sigmas
from ..parallel import average_gradients, global_micro_index, keyed_generator, shard_dit
from ..runner import MAIN, RunBase, Unit, make_optimizer, make_schedule
from . import losses as L
from .grid import Renoise, simulate, student_grid
from .networks import build_networks, capture_features

log = logging.getLogger(__name__)


def _norm(params) -> float:
    """Total gradient norm of ``params`` without changing them (DTensor shards included)."""
    total = torch.nn.utils.clip_grad_norm_(list(params), float("inf"))
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)


class Distiller(RunBase):
    """``Distiller(cfg).train()`` for a configuration with a ``[distill]`` section."""

    @property
    def kind(self) -> str:
        return f"distill-{self.cfg.distill.student}"

    # ---- set-up ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """``self.data`` (captions: ``text_dim``, ``empty``, ``text(key)``, ``batches(seed, rank, world)``) and
        ``self.renderer`` (sample images or None): the data cache of ``[data]`` (DMDR: its prompts instead)."""
        from ..trainer import prepare_run_data, prepare_synthetic

        cfg, acc = self.cfg, self.acc
        self.data_cfg = cfg.data_config()
        if cfg.synthetic:
            if acc.is_main_process:
                prepare_synthetic(cfg.synthetic)
            acc.wait_for_everyone()
        self.data, segments, self.renderer = prepare_run_data(
            cfg, self.data_cfg, acc, self.device, self.out, self.progress
        )
        if segments is not None:
            raise ZImageError("distillation trains text to image; remove the edit_jsonl sources from [data].")

    def build(self) -> None:
        from ..model import build_dit

        cfg, acc, d = self.cfg, self.acc, self.cfg.distill
        if acc.mixed_precision == "fp16":
            raise ZImageError("distillation runs in bf16 or fp32 (mixed_precision = 'bf16' or 'no'), not fp16.")
        self.prepare_data()
        dtype = d.teacher_dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        teacher = build_dit(dataclasses.replace(cfg.model, checkpoint=d.teacher, dtype=dtype), cfg.seed, False)
        teacher = teacher.to(self.device)
        if self.data.text_dim is not None and self.data.text_dim != teacher.cfg.cap_feat_dim:
            raise ZImageError(
                f"the teacher reads caption features of width {teacher.cfg.cap_feat_dim}, but the data cache holds "
                f"width {self.data.text_dim}: the text encoder does not belong to this DiT (model.text_encoder)."
            )
        self.dit_config = teacher.cfg
        self.nets = nets = build_networks(teacher, d, cfg.model.gradient_checkpointing, cfg.seed)
        nets.student.to(self.device)
        nets.fake.to(self.device)
        fsdp = cfg.sharding == "fsdp2" or getattr(acc, "is_fsdp2", False)
        self.student_sharded = bool(fsdp and self.world > 1 and d.student == "full")
        if fsdp and self.world > 1 and d.student != "full":
            log.info("FSDP2 shards a full student only; the LoRA student's adapters are replicated")
        if self.student_sharded:
            shard_dit(nets.student, self.device, acc.mixed_precision)
            nets.student_params = {n: p for n, p in nets.student.named_parameters() if p.requires_grad}
        self.opt_g = make_optimizer(list(nets.student_params.values()), cfg.optim)
        self.schedule = make_schedule(self.opt_g, cfg.optim, cfg.max_steps)
        fake_optim = dataclasses.replace(cfg.optim, lr=d.fake_lr or cfg.optim.lr, weight_decay=0.0, warmup_steps=0)
        self.opt_f = make_optimizer(list(nets.fake_params.values()), fake_optim)
        e = cfg.ema
        self.ema = EMA(nets.student_params, e.decay, e.start_step, e.every, e.warmup) if e.enabled else None
        self.units[MAIN] = Unit(
            nets.student_params, self.opt_g, self.schedule, self.ema, nets.student, self.student_sharded
        )
        self.units["fake"] = Unit(nets.fake_params, self.opt_f, model=nets.fake)
        self.grid = student_grid(d.student_steps, d.student_shift)
        self.empty = self.data.text(self.data.empty)
        self.batches = self.data.batches(cfg.seed, self.rank, self.world)
        log.info(
            "distilling %s (%s) into a %d-step student, grid %s, teacher cfg %g",
            d.teacher,
            d.method,
            d.student_steps,
            [round(float(s), 4) for s in self.grid],
            d.cfg,
        )

    # ---- checkpoints ----------------------------------------------------------------------------
    def meta_extra(self) -> dict:
        return {
            "epoch": self.batches.epoch,
            "dit_config": dataclasses.asdict(self.dit_config),
            "distill": dataclasses.asdict(self.cfg.distill),
            "grid": [float(s) for s in self.grid],
        }

    def rank_extra(self) -> dict:
        return {"data": self.batches.state_dict()}

    def load_rank_extra(self, state: dict) -> None:
        self.batches.load_state_dict(state["data"])

    def close(self) -> None:
        self.batches.close()

    def loop_fields(self) -> dict:
        return {"lr": self.schedule.get_last_lr()[0], "epoch": self.batches.epoch}

    # ---- pieces of a step -----------------------------------------------------------------------
    def _gen(self, turn: int, micro: int) -> torch.Generator:
        n = self.cfg.optim.grad_accum
        return keyed_generator(
            self.cfg.seed, self.step, turn, global_micro_index(self.step, micro, n, self.rank, self.world)
        )

    def _k(self, turn: int) -> int:
        """The student's grid index for this turn: the same on every process and micro-batch."""
        shared = keyed_generator(self.cfg.seed, self.step, turn, -1)
        return int(torch.randint(0, self.cfg.distill.student_steps, (1,), generator=shared))

    def _renoise_sigmas(self, b: int, gen: torch.Generator) -> torch.Tensor:
        d = self.cfg.distill
        u = d.sigma_min + (d.sigma_max - d.sigma_min) * torch.rand(b, generator=gen)
        return shift_sigmas(u, d.sigma_shift).float().to(self.device)

    def _randn(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(self.device)

    def generate(self, batch, gen: torch.Generator, k: int, grad: bool):
        """The student's ``x0`` at grid index ``k`` for a batch's captions: ``(x0, cond, sigma_k [B])``."""
        d, acc = self.cfg.distill, self.acc
        lat = batch.latents
        b, c, h, w = lat.shape
        cond = [f.to(self.device) for f in batch.cap_feats]
        sig = self.grid[k].expand(b).to(self.device)
        if d.student_input == "real":
            x_k = L.noised(lat.to(self.device), self._randn(lat.shape, gen), sig)
        else:
            noise = self._randn((b, c, h, w), gen)
            solver = "euler" if d.simulation == "euler" else Renoise(gen)
            with torch.no_grad(), acc.autocast():
                fn = Denoiser(self.nets.student, cond, None, (h, w))
                x_k = simulate(fn, noise, self.grid, k, solver)
        with nullcontext() if grad else torch.no_grad(), acc.autocast():
            fn = Denoiser(self.nets.student, cond, None, (h, w))
            x0 = L.denoised(x_k, fn(x_k, sig), sig)
        return x0, cond, sig

    @torch.no_grad()
    def direction(
        self, x0: torch.Tensor, cond, sigma_k: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """Where the generator's ``x0`` should move (per the method), and per term its mean size and its own
        surrogate loss ``0.5 mean((weight * term)^2)`` (what the term alone would log as the loss)."""
        d, acc, nets = self.cfg.distill, self.acc, self.nets
        b, _, h, w = x0.shape
        uncond = [self.empty.to(self.device)] * b
        guided = d.cfg > 1.0
        delta = torch.zeros_like(x0, dtype=torch.float32)
        terms = {}
        with acc.autocast():
            if d.method in ("decoupled_dmd", "dmd2") and d.dm_weight > 0:
                s = self._renoise_sigmas(b, gen)
                x_t = L.noised(x0, self._randn(x0.shape, gen), s)
                if d.method == "dmd2":  # the real score is the guided teacher, at the same noise level
                    real = Denoiser(nets.teacher, cond, uncond if guided else None, (h, w), cfg=d.cfg)
                else:
                    real = Denoiser(nets.teacher, cond, None, (h, w))
                r0 = L.denoised(x_t, real(x_t, s), s)
                f0 = L.denoised(x_t, Denoiser(nets.fake, cond, None, (h, w))(x_t, s), s)
                dm = (L.dmd2_direction if d.method == "dmd2" else L.dm_direction)(x0, r0, f0, d.normalize)
                delta += d.dm_weight * dm
                terms["dm_size"] = float(dm.abs().mean())
                terms["loss_dm"] = float(0.5 * (d.dm_weight * dm).pow(2).mean())
            if d.method in ("decoupled_dmd", "ca_only") and guided and d.ca_weight > 0:
                # CFG augmentation at a noise level cleaner than the student's input sigma_k
                lo = torch.full_like(sigma_k, d.sigma_min).minimum(sigma_k)
                s = lo + (sigma_k - lo) * torch.rand(b, generator=gen).to(self.device)
                x_c = L.noised(x0, self._randn(x0.shape, gen), s)
                v_c, v_u = Denoiser(nets.teacher, cond, uncond, (h, w), cfg=d.cfg).branches(x_c, s)
                ca = L.ca_direction(x0, L.denoised(x_c, v_c, s), L.denoised(x_c, v_u, s), d.cfg, d.normalize)
                delta += d.ca_weight * ca
                terms["ca_size"] = float(ca.abs().mean())
                terms["loss_ca"] = float(0.5 * (d.ca_weight * ca).pow(2).mean())
        return delta, terms

    def _fake_features(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake score's velocity at ``x`` and its image-token features for the GAN head (``gan_head``)."""
        h, w = x.shape[-2:]
        n_img = (h // self.dit_config.patch_size) * (w // self.dit_config.patch_size)
        d = self.cfg.distill
        with capture_features(self.nets.fake, d.gan_layer, n_img, d.gan_head == "pooled") as store:
            v = Denoiser(self.nets.fake, cond, None, (h, w))(x, sigma)
        return v, store["feats"]

    def generator_extra(self, x0: torch.Tensor, batch, gen: torch.Generator) -> tuple[torch.Tensor | None, dict]:
        """A further generator loss on the student's ``x0`` (with gradients) and its metrics (``gen``: the
        micro-batch's keyed generator): none here; DMDR (:mod:`train.rl.dmdr`) adds its reward term."""
        return None, {}

    def _step_optimizer(self, opt, params: dict, clip: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # ---- the step -------------------------------------------------------------------------------
    def fake_turn(self, turn: int) -> dict:
        d, n, nets, acc = self.cfg.distill, self.cfg.optim.grad_accum, self.nets, self.acc
        self.opt_f.zero_grad(set_to_none=True)  # also drops what the generator's GAN loss left on the fake
        k = self._k(turn)
        out = {"fake_loss": 0.0}
        for micro in range(n):
            batch = next(self.batches)
            gen = self._gen(turn, micro)
            x0, cond, _ = self.generate(batch, gen, k, grad=False)
            x0 = x0.detach()
            b = x0.shape[0]
            s = self._renoise_sigmas(b, gen)
            noise = self._randn(x0.shape, gen)
            x_s = L.noised(x0, noise, s)
            with acc.autocast():
                if nets.gan is None:
                    v = Denoiser(nets.fake, cond, None, x0.shape[-2:])(x_s, s)
                    loss = L.fake_score_loss(v, x0, noise)
                else:
                    v, feats_fake = self._fake_features(x_s, s, cond)
                    loss = L.fake_score_loss(v, x0, noise)
                    real = batch.latents.to(self.device)
                    s_r = self._renoise_sigmas(b, gen)
                    _, feats_real = self._fake_features(L.noised(real, self._randn(real.shape, gen), s_r), s_r, cond)
                    d_loss = L.gan_discriminator_loss(nets.gan(feats_real), nets.gan(feats_fake))
                    out["gan_d"] = out.get("gan_d", 0.0) + float(d_loss) / n
                    loss = loss + d.gan_d_weight * d_loss
            (loss / n).backward()
            out["fake_loss"] += float(L.fake_score_loss(v.detach(), x0, noise)) / n
        average_gradients(list(nets.fake_params.values()), self.world)
        out["fake_grad_norm"] = self._step_optimizer(self.opt_f, nets.fake_params, self.cfg.optim.grad_clip)
        return out

    def generator_turn(self, turn: int) -> tuple[float, dict]:
        d, n, nets, acc = self.cfg.distill, self.cfg.optim.grad_accum, self.nets, self.acc
        k = self._k(turn)
        total, info = 0.0, {"k": k}
        for micro in range(n):
            batch = next(self.batches)
            gen = self._gen(turn, micro)
            x0, cond, sig = self.generate(batch, gen, k, grad=True)
            delta, terms = self.direction(x0.detach(), cond, sig, gen)
            loss = L.matching_loss(x0, delta)
            extra, extra_info = self.generator_extra(x0, batch, gen)
            if extra is not None:
                loss = loss + extra
            terms = {**terms, **extra_info}
            if nets.gan is not None and d.gan_weight > 0:
                s = self._renoise_sigmas(x0.shape[0], gen)
                with acc.autocast():
                    _, feats = self._fake_features(L.noised(x0, self._randn(x0.shape, gen), s), s, cond)
                    g_loss = L.gan_generator_loss(nets.gan(feats))
                info["gan_g"] = info.get("gan_g", 0.0) + float(g_loss) / n
                loss = loss + d.gan_weight * g_loss
            (loss / n).backward()
            total += float(loss.detach()) / n
            for key, value in terms.items():
                info[key] = info.get(key, 0.0) + value / n
        if not self.student_sharded:  # FSDP2 reduce-scatters the student's gradients itself
            average_gradients(list(nets.student_params.values()), self.world)
        info["grad_norm"] = self._step_optimizer(self.opt_g, nets.student_params, self.cfg.optim.grad_clip)
        return total, info

    def train_step(self) -> tuple[float, dict]:
        d = self.cfg.distill
        info: dict = {}
        for turn in range(d.ttur):
            for key, value in self.fake_turn(turn).items():
                info[key] = info.get(key, 0.0) + value / d.ttur
        loss, g_info = self.generator_turn(d.ttur)
        info.update(g_info)
        self.schedule.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.nets.student_params, self.step)
        if not (math.isfinite(loss) and math.isfinite(info["fake_loss"])):
            raise ZImageError(
                f"a distillation loss became non-finite at step {self.step} (generator {loss}, fake "
                f"{info['fake_loss']}); lower optim.lr / distill.fake_lr or keep optim.grad_clip on."
            )
        return loss, info

    # ---- samples and export ---------------------------------------------------------------------
    def render_samples(self) -> list:
        """The fixed prompts at the student's step count with cfg 1 (the [samples] section is set to them)."""
        if self.renderer is None:
            return []
        acc, student = self.acc, self.nets.student
        if self.student_sharded:
            student.unshard()
        elif not acc.is_main_process:
            return []
        use_ema = self.ema is not None and self.cfg.samples.use_ema
        self.renderer.vae.to(self.device)
        try:
            with self.ema.applied(self.nets.student_params) if use_ema else nullcontext():
                return self.renderer.render(
                    student, self.device, self.step, self.out / "samples", acc.autocast, write=acc.is_main_process
                )
        finally:
            if self.student_sharded:
                student.reshard()

    def export(self, checkpoint: Path) -> Path:
        from .export import export_distilled

        cfg = self.cfg
        paths = export_distilled(
            checkpoint,
            self.out / "export",
            ema=cfg.export.ema and self.ema is not None,
            dtype=cfg.export.dtype,
            lora_rank=cfg.distill.lora_rank,
            diffusers=cfg.distill.export_diffusers,
        )
        return paths["student"]
