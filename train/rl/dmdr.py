"""DMDR: distribution matching distillation with a reward (Jiang et al. 2025, "Distribution Matching Distillation
Meets Reinforcement Learning").

A few-step student (initialised from the policy, which is also the frozen teacher = the real score) is trained
with the distillation's distribution-matching term as the regulariser plus a reward term. The distillation is the
existing :class:`train.distill.Distiller` (backward simulation, fake score = LoRA on the shared frozen teacher,
TTUR, Decoupled DMD / DMD2 / CA terms, checkpoints and export); this module adds only what DMDR adds:

- **the reward term** (``dmdr_reward = "refl"``): the student's ``x0`` is decoded to images with gradients and
  scored by the configured rewards (:class:`train.rl.rewards.RewardSet`, every reward differentiable); the
  generator's loss gains ``-reward_weight * mean(sum_k w_k r_k(images))``, from generator update
  ``reward_start`` on (the cold start before it is distillation only, the paper's first stage). That is the
  reward-tilted target ``p_real(x) exp(r(x) / beta)``: its KL gradient is the DM gradient minus the reward's.
  The rewards are logged per reward (``reward/<label>``) during the cold start too.
- or **the GRPO advantage** (``dmdr_reward = "grpo"``; rewards need no gradient): a micro-batch is
  ``prompts_per_step`` prompts x ``group_size`` samples; each sample's ``x0`` is perturbed,
  ``x~ = x0 + dmdr_noise * eps``, decoded and scored, the scores become group-relative (composite) advantages
  (:func:`train.rl.grpo.advantages`), and the loss is the clipped objective (:func:`train.rl.grpo.clipped_objective`)
  on the Gaussian log-probability ``log N(x~; x0, dmdr_noise^2)``: its gradient moves ``x0`` toward the
  perturbations that scored above their group (a score-function estimate of the reward's gradient in x0 space).
- **DynaDG** (dynamic distribution guidance): for the first ``dynadg_steps`` generator updates the real score is
  tilted toward the fake score: it is the frozen base *plus the fake score's LoRA* at
  ``dynadg_scale * cosine(step / dynadg_steps)`` of the fake's own scale (the DMDR code runs the fake LoRA at 2.0
  and the real one at ``0.75 * 0.5 (1 + cos(pi step / T))``, whence the default 0.375), then the pure teacher. The
  early DM gradient is then small while the fake score is still untrained.
- **DynaRS** (dynamic renoise sampling): the re-noising levels of the DM term and the fake score's training are
  ``Beta(a, b)`` with ``(a, b)`` annealed from ``(dynars_alpha, dynars_beta)`` (default ``(4, 1.5)``: mostly high
  noise, sigma convention) to ``(1, 1)`` (uniform, the distiller's sampler) over ``dynars_steps`` by the same cosine.

Data-free: the captions are ``[rl] prompts`` encoded once (no ``[data]`` cache, no real latents, no GAN).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from zimage_core.errors import ZImageError
from zimage_core.vae import FluxVAE, to_raw_space

from ..distill import Distiller
from ..distill.networks import shared_twin
from ..lora_train import ADAPTER, _add_side_path, adapters
from ..objective import shift_sigmas
from . import grpo as G
from .config import RLConfig, rl_config
from .rewards import build_rewards
from .trainer import PromptSampler

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The schedules
# ---------------------------------------------------------------------------------------------
def cosine(step: int, total: int) -> float:
    """``0.5 (1 + cos(pi step / total))`` for ``step < total``, else 0 (``total = 0``: always 0)."""
    if total <= 0 or step >= total:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def dynadg_tilt(step: int, total: int, scale: float) -> float:
    """DynaDG: the fake LoRA's share in the real score at generator update ``step``."""
    return scale * cosine(step, total)


def dynars_params(step: int, total: int, alpha: float, beta: float) -> tuple[float, float]:
    """DynaRS: the Beta parameters of the re-noising levels at ``step``, ``(alpha, beta)`` -> ``(1, 1)``."""
    c = cosine(step, total)
    return 1.0 + (alpha - 1.0) * c, 1.0 + (beta - 1.0) * c


def beta_levels(n: int, a: float, b: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of ``Beta(a, b)`` (float32), reproducible from the torch ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(a, b, size=n)).float()


# ---------------------------------------------------------------------------------------------
# Decoding with gradients, prompts as the distiller's captions
# ---------------------------------------------------------------------------------------------
def decode_with_grad(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> pixels in about [-1, 1], keeping the autograd graph (the pipeline's decode runs
    without gradients). A :class:`FluxVAE` decodes untiled in float32; any other VAE module's ``decode`` is called
    as it is."""
    if isinstance(vae, FluxVAE):
        raw = to_raw_space(latents.float(), vae.config.scaling_factor, vae.config.shift_factor)
        with torch.autocast(raw.device.type, enabled=False):
            return vae.decoder(raw.to(vae.dtype)).float()
    return vae.decode(latents).float()


def images_from_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reward images ``[B, 3, H, W]`` in 0..1 (clamped like a saved PNG), with gradients."""
    return (decode_with_grad(vae, latents) / 2.0 + 0.5).clamp(0.0, 1.0)


@dataclass
class PromptBatch:
    """What the distiller reads from a batch: caption features and a latent-shaped tensor (its shape only)."""

    cap_feats: list[torch.Tensor]
    latents: torch.Tensor
    prompts: list[str]


class PromptBatches:
    """``batch`` prompts at a time in seeded epochs (:class:`train.rl.trainer.PromptSampler`), per process."""

    def __init__(self, data: PromptData, batch: int, seed: int, group: int = 1):
        self.data, self.batch, self.group = data, batch, group
        self.sampler = PromptSampler(len(data.prompts), seed)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __next__(self) -> PromptBatch:
        idx = [i for i in self.sampler.take(self.batch) for _ in range(self.group)]
        lat = torch.zeros((len(idx), 16, self.data.height // 8, self.data.width // 8))
        return PromptBatch([self.data.feats[i] for i in idx], lat, [self.data.prompts[i] for i in idx])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, st: dict) -> None:
        self.sampler.load_state_dict(st)

    def close(self) -> None:
        pass


@dataclass
class PromptData:
    """The encoded ``[rl]`` prompts in the shape of the distiller's data cache."""

    prompts: list[str]
    feats: list[torch.Tensor]
    empty_feats: torch.Tensor
    width: int
    height: int
    batch: int  # distinct prompts per micro-batch
    group: int = 1  # samples per prompt (GRPO groups)

    empty = ""

    @property
    def text_dim(self) -> int:
        return int(self.empty_feats.shape[-1])

    def text(self, key: str) -> torch.Tensor:
        """The distiller looks up only the empty caption (its unconditional branch)."""
        return self.empty_feats

    def batches(self, seed: int, rank: int, world: int) -> PromptBatches:
        return PromptBatches(self, self.batch, seed * 7 + rank, self.group)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class DMDRTrainer(Distiller):
    """``DMDRTrainer(cfg).train()`` for a configuration with ``[rl] method = "dmdr"``: a :class:`Distiller`
    whose teacher is ``rl.policy``, whose captions are the ``[rl]`` prompts, and whose generator loss gains the
    reward term, with DynaDG and DynaRS (module docstring)."""

    def __init__(self, cfg, resume=None, progress: bool = True):
        rl: RLConfig = rl_config(cfg.rl, cfg.max_steps)
        if cfg.distill.enabled:
            raise ZImageError(
                "a DMDR run takes its distillation settings from [rl.distill]; remove the [distill] table."
            )
        policy = rl.policy or cfg.model.checkpoint
        if not policy:
            raise ZImageError(
                "rl.policy is not set: give the DiT to distill and improve (a file or folder zimage reads)."
            )
        cfg = copy.deepcopy(cfg)
        cfg.model.checkpoint = ""
        cfg.distill = dataclasses.replace(rl.distill, enabled=True, teacher=policy)
        cfg._validate_distill()  # the teacher, and the samples drawn on the student's grid without guidance
        super().__init__(cfg, resume, progress)
        self.rl = rl

    @property
    def kind(self) -> str:
        """``distill-<student>-dmdr``: exported like any distillation run, resumed only by DMDR."""
        return f"distill-{self.cfg.distill.student}-dmdr"

    # ---- set-up ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        from ..encoders import load_text_encoder, load_vae_for

        cfg, rl = self.cfg, self.rl
        prompts, _ = rl.load_prompts()
        te = load_text_encoder(cfg.model, self.device)
        texts = list(dict.fromkeys(prompts + [""]))
        feats = {}
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            feats.update(zip(chunk, (f.detach().cpu() for f in te.encode(chunk))))
        grpo = rl.dmdr_reward == "grpo"
        self.data = PromptData(
            prompts,
            [feats[p] for p in prompts],
            feats[""],
            rl.width,
            rl.height,
            rl.prompts_per_step if grpo else rl.batch,
            rl.group_size if grpo else 1,
        )
        self.vae = load_vae_for(cfg.model, self.device).requires_grad_(False)
        self.renderer = None
        if cfg.samples.every > 0:
            from ..samples import SampleRenderer

            self.renderer = SampleRenderer(cfg.samples, te, self.vae)
        del te
        gc.collect()

    def build(self) -> None:
        super().build()
        rl = self.rl
        self.rewards = build_rewards(rl.rewards)
        if rl.dmdr_reward == "refl" and rl.reward_weight > 0 and not self.rewards.differentiable:
            stiff = [label for label, r, _ in self.rewards.entries if not r.differentiable]
            raise ZImageError(
                f"DMDR's reward term back-propagates through the rewards, but {stiff} are not differentiable; "
                "use differentiable rewards (image statistics, alignment, aesthetic, a torch function) or "
                "rl.dmdr_reward = 'grpo' (advantages from the scores alone)."
            )
        self.tilted = None
        if rl.dynadg_steps > 0:
            self.tilted = tilted_twin(self.nets.teacher, self.nets.fake)
        log.info(
            "DMDR: reward term x%g from generator update %d; DynaDG %s; DynaRS %s",
            rl.reward_weight,
            rl.reward_start,
            f"tilt {rl.dynadg_scale} -> 0 over {rl.dynadg_steps}" if rl.dynadg_steps else "off",
            f"Beta({rl.dynars_alpha}, {rl.dynars_beta}) -> U over {rl.dynars_steps}" if rl.dynars_steps else "off",
        )

    def meta_extra(self) -> dict:
        rl = {k: v for k, v in dataclasses.asdict(self.rl).items() if k != "distill"}
        return {**super().meta_extra(), "rl": rl}

    def loop_fields(self) -> dict:
        """Also the schedules' values the step just taken used (``self.step`` has advanced past it)."""
        rl, used = self.rl, max(0, self.step - 1)
        a, b = dynars_params(used, rl.dynars_steps, rl.dynars_alpha, rl.dynars_beta)
        tilt = dynadg_tilt(used, rl.dynadg_steps, rl.dynadg_scale)
        return {**super().loop_fields(), "dynadg_tilt": tilt, "dynars_a": a, "dynars_b": b}

    # ---- DynaRS ---------------------------------------------------------------------------------
    def _renoise_sigmas(self, b: int, gen: torch.Generator) -> torch.Tensor:
        rl, d = self.rl, self.cfg.distill
        if cosine(self.step, rl.dynars_steps) == 0.0:
            return super()._renoise_sigmas(b, gen)
        a, bb = dynars_params(self.step, rl.dynars_steps, rl.dynars_alpha, rl.dynars_beta)
        u = d.sigma_min + (d.sigma_max - d.sigma_min) * beta_levels(b, a, bb, gen)
        return shift_sigmas(u, d.sigma_shift).float().to(self.device)

    # ---- DynaDG ---------------------------------------------------------------------------------
    @torch.no_grad()
    def direction(self, x0, cond, sigma_k, gen):
        rl = self.rl
        tilt = dynadg_tilt(self.step, rl.dynadg_steps, rl.dynadg_scale)
        if self.tilted is None or tilt == 0.0:
            return super().direction(x0, cond, sigma_k, gen)
        fake = adapters(self.nets.fake)
        for name, ad in adapters(self.tilted).items():
            ad.scale = tilt * fake[name].scale
        teacher = self.nets.teacher
        self.nets.teacher = self.tilted  # the real score for this direction: base + tilt * fake LoRA
        try:
            return super().direction(x0, cond, sigma_k, gen)
        finally:
            self.nets.teacher = teacher

    # ---- the reward term ------------------------------------------------------------------------
    def generator_extra(self, x0: torch.Tensor, batch, gen: torch.Generator) -> tuple[torch.Tensor | None, dict]:
        rl = self.rl
        active = rl.reward_weight > 0 and self.step >= rl.reward_start
        if rl.dmdr_reward == "grpo":
            return self.grpo_term(x0, batch, gen, active)
        with torch.enable_grad() if active else torch.no_grad():
            images = images_from_latents(self.vae, x0 if active else x0.detach())
            scores = self.rewards.scores(images, batch.prompts)
            total = self.rewards.total(scores)
        info = {f"reward/{k}": self._mean(v) for k, v in scores.items()}
        info["reward/total"] = self._mean(total)
        if not active:
            return None, info
        flat = [k for k, v in scores.items() if not v.requires_grad]
        if flat:
            raise ZImageError(
                f"DMDR's reward term needs a gradient, but reward(s) {flat} returned scores without one (e.g. a "
                "function returning numbers or detached tensors); return a tensor computed from the images."
            )
        loss = -rl.reward_weight * total.float().mean()
        info["loss_reward"] = float(loss.detach())
        return loss, info

    def grpo_term(
        self, x0: torch.Tensor, batch, gen: torch.Generator, active: bool
    ) -> tuple[torch.Tensor | None, dict]:
        """The GRPO-advantage reward term (module docstring); the perturbation comes from the micro-batch's
        keyed generator."""
        rl = self.rl
        b = x0.shape[0]
        eps = torch.randn(tuple(x0.shape), generator=gen, dtype=torch.float32).to(x0.device)
        x_t = x0.detach().float() + rl.dmdr_noise * eps
        with torch.no_grad():
            scores = self.rewards.scores(images_from_latents(self.vae, x_t), batch.prompts)
        groups = torch.arange(b) // rl.group_size
        adv, valid = G.advantages(scores, self.rewards.weights, groups, rl.aggregate, rl.adv_std, rl.adv_clip)
        info = {f"reward/{k}": self._mean(v) for k, v in scores.items()}
        info["reward/total"] = self._mean(self.rewards.total(scores))
        info["zero_std_ratio"] = float(1.0 - valid.float().mean())
        if not active:
            return None, info
        dims = tuple(range(1, x0.ndim))
        log_prob = -((x_t - x0.float()) ** 2).mean(dim=dims) / (2.0 * rl.dmdr_noise**2)
        per, _ = G.clipped_objective(log_prob, log_prob.detach(), adv.to(x0.device), rl.clip_range)
        loss = rl.reward_weight * per.mean()
        info["loss_reward"] = float(loss.detach())
        return loss, info

    def _mean(self, v: torch.Tensor) -> float:
        return float(self.acc.reduce(v.detach().float().mean().to(self.device), "mean"))


def tilted_twin(teacher, fake):
    """The tilted real score: a twin of the frozen ``teacher`` carrying the *same* LoRA tensors as the ``fake``
    score's twin (shallow copies of its adapters, so each has its own ``scale``; set by :meth:`direction`)."""
    twin = shared_twin(teacher)
    mods = dict(twin.named_modules())
    for name, ad in adapters(fake).items():
        mine = copy.copy(ad)  # shares down/up (the same Parameters), own scale
        mine.scale = 0.0
        mods[name].add_module(ADAPTER, mine)
        mods[name].register_forward_hook(_add_side_path)
    return twin.eval()  # no requires_grad_ here: the LoRA tensors are the fake score's trained ones
