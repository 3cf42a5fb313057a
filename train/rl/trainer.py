"""The RL trainer: Diffusion-DPO and Flow-GRPO on the training run infrastructure.

:class:`RLTrainer` is a :class:`train.trainer.Trainer` whose set-up builds a policy instead of a data cache and
whose ``train_step`` is a DPO or GRPO step; everything else is the trainer's own: ``accelerate`` (one process,
DDP), atomic checkpoints with bit-exact resume (weights, optimizer, LR schedule, EMA, every RNG and the
prompt/pair sampler position), SIGINT/SIGTERM, ``metrics.jsonl`` / TensorBoard (one ``reward/<label>`` series
per reward), sample grids at fixed seeds (``[samples]``), and the export to ``OUTPUT_DIR/export/`` as a LoRA or
a full DiT that ``zimage generate`` and the nodes load.

GRPO step (one rollout iteration): draw ``prompts_per_step`` prompts, ``group_size`` SDE rollouts each
(FlowSDE, log-probs in fp32; CFG-free when ``cfg = 1``), decode, score every reward, composite advantages, then
``updates_per_rollout`` optimizer steps over the trained steps (all, a random subset, or MixGRPO's window, where
the rollout is stochastic only inside the window), each re-scoring the recorded transitions with
:func:`zimage_core.sampling.sde_step` under the current weights: clipped ratio plus the optional KL to the
reference. DPO step: a curriculum batch of chosen/rejected pairs from the candidates drawn at set-up.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import random
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from zimage_core.errors import ZImageError
from zimage_core.sampling import cfg_combine, sde_scale, sde_step
from zimage_core.schedules import img2img_sigmas, model_t

from ..ema import EMA
from ..objective import FlowModel, sample_sigmas
from ..runner import MAIN, Unit, make_optimizer, make_schedule
from ..trainer import Trainer
from . import dpo as D
from . import grpo as G
from .config import RLConfig, rl_config
from .rewards import build_rewards
from .rollout import (
    candidate_id,
    draw_options,
    generate_candidates,
    make_pipeline,
    read_candidates,
    restore_placement,
    rollout,
    to_images,
)

log = logging.getLogger(__name__)


@contextmanager
def adapters_off(dit):
    """The base model: every LoRA adapter's scale set to 0 for the block (its side path then adds exactly 0)."""
    from ..lora_train import adapters

    ads = list(adapters(dit).values())
    scales = [a.scale for a in ads]
    for a in ads:
        a.scale = 0.0
    try:
        yield dit
    finally:
        for a, s in zip(ads, scales):
            a.scale = s


class PromptSampler:
    """GRPO's prompt order: seeded permutations, one epoch after another (the trainer's ``batches``)."""

    def __init__(self, n: int, seed: int):
        self.n, self.epoch, self.pos = n, 0, 0
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.gen).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "order": list(self.order), "gen": self.gen.get_state()}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.pos, self.order = st["epoch"], st["pos"], list(st["order"])
        self.gen.set_state(st["gen"])

    def close(self) -> None:
        pass


class PairSampler:
    """DPO's curriculum batches over the ordered pairs (the trainer's ``batches``)."""

    def __init__(self, pairs: list[D.Pair], batch: int, start: float, warmup: int, seed: int):
        self.pairs, self.batch, self.start, self.warmup = pairs, batch, start, warmup
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = 0

    @property
    def epoch(self) -> int:
        return self.drawn * self.batch // max(1, len(self.pairs))

    def take(self, step: int) -> list[D.Pair]:
        idx = D.curriculum_batch(len(self.pairs), self.batch, step, self.start, self.warmup, self.gen)
        self.drawn += 1
        return [self.pairs[i] for i in idx]

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "gen": self.gen.get_state()}

    def load_state_dict(self, st: dict) -> None:
        self.drawn = st["drawn"]
        self.gen.set_state(st["gen"])

    def close(self) -> None:
        pass


class RLTrainer(Trainer):
    """``RLTrainer(cfg).train()`` for a configuration with an ``[rl]`` section.

    A :class:`train.trainer.Trainer` (so a :class:`train.runner.RunBase`) whose :meth:`build` makes the policy,
    the reference, the rewards and the prompt or pair sampler instead of a data cache; the samples, the export
    and the checkpoint metadata are the trainer's.
    """

    def __init__(self, cfg, resume=None, progress: bool = True):
        super().__init__(cfg, resume, progress)
        self.rl: RLConfig = rl_config(cfg.rl, cfg.max_steps)
        if self.rl.method == "dmdr":
            raise ZImageError("rl.method 'dmdr' is a distillation run: train.run starts train.rl.dmdr.DMDRTrainer.")

    # ---- set-up (the run infrastructure is train.runner.RunBase's) --------------------------------
    def build(self) -> None:
        cfg, rl, acc = self.cfg, self.rl, self.acc
        self.prompts, given_levels = rl.load_prompts()
        self._encode(cfg)
        from ..lora_train import add_lora
        from ..model import build_dit

        model = copy.copy(cfg.model)
        model.checkpoint = rl.policy or cfg.model.checkpoint
        if not model.checkpoint:
            raise ZImageError(
                "rl.policy is not set: give the DiT to improve (a file or folder zimage reads, e.g. an exported "
                "model), or model.checkpoint."
            )
        dit = build_dit(model, cfg.seed, trainable=not cfg.lora.enabled)
        self.ref = None
        if cfg.lora.enabled:
            add_lora(dit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init_seed)
            dit.train()
        elif rl.method == "dpo" or rl.kl_beta > 0:  # a frozen copy of the base is the reference
            self.ref = copy.deepcopy(dit).eval().requires_grad_(False).to(self.device)
        self.dit_config = dit.cfg
        names = {n for n, p in dit.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer([p for p in dit.parameters() if p.requires_grad], cfg.optim)
        self.schedule = make_schedule(self.optimizer, cfg.optim, cfg.max_steps)  # stepped by hand
        self.model, self.optimizer = acc.prepare(FlowModel(dit), self.optimizer)
        self.sharded = acc.is_fsdp2 if hasattr(acc, "is_fsdp2") else False
        if self.sharded:
            raise ZImageError("RL post-training runs on one process or DDP; FSDP2 is not supported for it yet.")
        self.dit = acc.unwrap_model(self.model).dit
        self.params = {n: p for n, p in self.dit.named_parameters() if n in names}
        e = cfg.ema
        self.ema = EMA(self.params, e.decay, e.start_step, e.every, e.warmup) if e.enabled else None
        self.units[MAIN] = Unit(self.params, self.optimizer, self.schedule, self.ema, self.model, self.sharded)
        self.pipe = make_pipeline(self.dit, self.vae, self.device, rl.memory)
        self.sigmas = img2img_sigmas(rl.steps, rl.shift, 1.0).tolist()
        self.step_rng = random.Random(cfg.seed * 13 + self.rank)
        if rl.method == "grpo":
            self.rewards = build_rewards(rl.rewards)
            self.batches = PromptSampler(len(self.prompts), cfg.seed * 7 + self.rank)
        else:
            self._prepare_pairs(given_levels)

    def _encode(self, cfg) -> None:
        """Encode the prompts (and the negative, with CFG) and the sample prompts, then free the text encoder."""
        from ..encoders import load_text_encoder, load_vae_for

        rl = self.rl
        te = load_text_encoder(cfg.model, self.device)
        texts = list(dict.fromkeys(self.prompts + ([rl.negative] if rl.cfg > 1.0 else [])))
        feats = {}
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            feats.update(zip(chunk, (f.detach().cpu() for f in te.encode(chunk))))
        self.cond = [feats[p] for p in self.prompts]
        self.uncond = feats[rl.negative] if rl.cfg > 1.0 else None
        self.vae = load_vae_for(cfg.model, self.device)
        self.renderer = None
        if cfg.samples.every > 0:
            from ..samples import SampleRenderer

            self.renderer = SampleRenderer(cfg.samples, te, self.vae)
        del te
        gc.collect()

    def _prepare_pairs(self, given_levels) -> None:
        """Draw (or reuse) the candidates, score them, build the pairs and their curriculum order."""
        cfg, rl, acc = self.cfg, self.rl, self.acc
        folder = self.out / "candidates"
        stamp = {
            "policy": rl.policy or cfg.model.checkpoint,
            "prompts": self.prompts,
            "n": rl.candidates,
            "seed": rl.candidate_seed,
            "size": [rl.width, rl.height],
            "steps": rl.steps,
            "shift": rl.shift,
            "cfg": rl.cfg,
        }
        done = folder / "done.json"
        if not (done.is_file() and json.loads(done.read_text()) == stamp):
            if acc.is_main_process and folder.exists():
                for f in list(folder.glob("*-rank*.*")) + [done]:
                    f.unlink(missing_ok=True)
            acc.wait_for_everyone()
            mine = [i for i in range(len(self.prompts)) if i % self.world == self.rank]
            generate_candidates(
                self.pipe, self.prompts, self.cond, self.uncond, rl, folder, mine, shard=f"rank{self.rank}"
            )
            restore_placement(self.pipe, self.dit, self.device)
            acc.wait_for_everyone()
            if acc.is_main_process:
                done.write_text(json.dumps(stamp))
            acc.wait_for_everyone()
        records, latents = read_candidates(folder)
        self.rewards = build_rewards(rl.rewards)  # after drawing: a judge scores the written candidates
        self.latents = latents
        scores = self._score_candidates(records, latents)
        total = self.rewards.total(scores)
        by_prompt: dict[int, list] = {}
        for rec, s in zip(records, total.tolist()):
            by_prompt.setdefault(int(rec["prompt_index"]), []).append(
                (candidate_id(rec["prompt_index"], rec["seed"]), s)
            )
        # candidate ids are strings; pairs index into the id list
        ids = sorted({cid for v in by_prompt.values() for cid, _ in v})
        pos = {cid: k for k, cid in enumerate(ids)}
        pairs = D.build_pairs(
            {p: [(pos[c], s) for c, s in v] for p, v in by_prompt.items()}, rl.min_gap, rl.pairs_per_prompt
        )
        if not pairs:
            raise ZImageError(
                f"no chosen/rejected pair: every prompt's candidates score within rl.min_gap = {rl.min_gap} of each "
                "other. Lower min_gap, draw more candidates, or use a reward that tells them apart."
            )
        self.ids = ids
        levels = D.prompt_levels(self.prompts, rl.prompt_buckets, given_levels)
        order = D.curriculum_order(pairs, levels, torch.Generator().manual_seed(cfg.seed))
        warmup = rl.curriculum_warmup if rl.curriculum_warmup >= 0 else cfg.max_steps // 2
        self.batches = PairSampler(order, rl.batch, rl.curriculum_start, warmup, cfg.seed * 7 + self.rank)
        self.pair_stats = {
            "pairs": len(order),
            "gap_mean": float(np.mean([p.gap for p in order])),
            **{f"candidates_{k}": float(v.mean()) for k, v in scores.items()},
        }
        log.info("DPO: %d pairs from %d candidates of %d prompts", len(order), len(records), len(self.prompts))
        if acc.is_main_process:
            self.log_metrics({"step": self.step, **{f"dpo/{k}": v for k, v in self.pair_stats.items()}})

    def _score_candidates(self, records: list[dict], latents: dict) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {}
        for start in range(0, len(records), self.rl.candidate_batch):
            chunk = records[start : start + self.rl.candidate_batch]
            lat = torch.stack([latents[r["id"]] for r in chunk]).to(self.device)
            imgs = to_images(self.pipe, lat)
            scores = self.rewards.scores(imgs, [r["prompt"] for r in chunk], [r["id"] for r in chunk])
            for k, v in scores.items():
                out.setdefault(k, []).append(v.detach().float().cpu())
        restore_placement(self.pipe, self.dit, self.device)
        return {k: torch.cat(v) for k, v in out.items()}

    # ---- per-process state beyond the base's: the sampler position and the step-subset RNG ----------
    def rank_extra(self) -> dict:
        return {"data": self.batches.state_dict(), "step_rng": self.step_rng.getstate()}

    def load_rank_extra(self, state: dict) -> None:
        self.batches.load_state_dict(state["data"])
        self.step_rng.setstate(state["step_rng"])

    # ---- model calls ----------------------------------------------------------------------------
    def _raw(self, model, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
        """Raw DiT output at ``x`` (sigmas ``[B]``): the DiT sees ``t = 1 - sigma``."""
        with self.acc.autocast():
            return model(x, model_t(sigma).to(self.device), [c.to(self.device) for c in caps])

    def _reference(self):
        """The frozen base as a callable ``dit`` module (LoRA off, or the frozen copy)."""
        if self.ref is not None:
            return nullcontext(self.ref)
        return adapters_off(self.dit)

    def _velocity(self, model, x, i: int, caps, grad: bool) -> torch.Tensor:
        """The policy's velocity at state ``x`` of schedule entry ``i`` (with CFG when on; the unconditional branch
        carries no gradient, as in Flow-GRPO)."""
        s = torch.full((x.shape[0],), self.sigmas[i], dtype=torch.float32, device=self.device)
        with torch.set_grad_enabled(grad):
            raw = self._raw(model, x, s, caps).float()
        if self.rl.cfg > 1.0:
            with torch.no_grad():
                neg = self._raw(model, x, s, [self.uncond] * x.shape[0]).float()
            raw = cfg_combine(raw, neg, self.rl.cfg)
        return -raw

    # ---- GRPO -----------------------------------------------------------------------------------
    def _sde_window(self) -> list[int] | None:
        rl = self.rl
        if rl.train_steps != "window":
            return None
        return G.window_steps(len(self.sigmas) - 1, rl.window_size, rl.window_shift_every, self.step)

    def grpo_rollout(self):
        """Prompts, SDE rollouts, rewards and advantages of one iteration (no gradients)."""
        rl = self.rl
        idx = self.batches.take(rl.prompts_per_step)
        prompt_ids = [i for i in idx for _ in range(rl.group_size)]
        groups = torch.tensor([g for g in range(len(idx)) for _ in range(rl.group_size)])
        n = len(prompt_ids)
        shape = (1, 16, rl.height // 8, rl.width // 8)
        if rl.same_noise:
            base = [torch.randn(shape, generator=self.noise_gen) for _ in idx]
            noise = torch.cat([base[g] for g in groups.tolist()])
        else:
            noise = torch.randn((n,) + shape[1:], generator=self.noise_gen)
        sde_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.noise_gen)))
        cond = [self.cond[i] for i in prompt_ids]
        uncond = [self.uncond] * n if rl.cfg > 1.0 else None
        with torch.no_grad():
            ro = rollout(self.pipe, cond, uncond, noise, draw_options(rl), rl.eta, sde_gen, self._sde_window())
            images = to_images(self.pipe, ro.latents)
        restore_placement(self.pipe, self.dit, self.device)
        prompts = [self.prompts[i] for i in prompt_ids]
        scores = self.rewards.scores(images, prompts, None)
        adv, valid = G.advantages(scores, self.rewards.weights, groups, rl.aggregate, rl.adv_std, rl.adv_clip)
        return ro, prompt_ids, scores, adv, valid

    def grpo_step(self) -> tuple[float, dict]:
        cfg, rl, acc = self.cfg, self.rl, self.acc
        ro, prompt_ids, scores, adv, valid = self.grpo_rollout()
        steps = G.trained_steps(ro.sde_steps, rl.train_steps, rl.step_fraction, self.step_rng)
        lp_old = dict(zip(ro.sde_steps, ro.log_probs))
        n = len(prompt_ids)
        perm = torch.randperm(n, generator=self.noise_gen).tolist()
        parts = [perm[k :: rl.updates_per_rollout] for k in range(rl.updates_per_rollout)]
        sigma_max = self.sigmas[1]
        totals, stats = [], {"clipfrac": [], "approx_kl": [], "kl": [], "ratio_max": []}
        for part in parts:
            micro = rl.micro_batch or len(part)
            chunks = [part[k : k + micro] for k in range(0, len(part), micro)]
            calls = len(chunks) * len(steps)
            k_call, total = 0, 0.0
            for chunk in chunks:
                ix = torch.tensor(chunk)
                caps = [self.cond[prompt_ids[j]] for j in chunk]
                a = adv[ix].to(self.device)
                for i in steps:
                    k_call += 1
                    x = ro.states[i][ix].to(self.device)
                    x_next = ro.states[i + 1][ix].to(self.device)
                    ctx = acc.no_sync(self.model) if k_call < calls else nullcontext()
                    with ctx:
                        v = self._velocity(self.model, x, i, caps, grad=True)
                        _, lp, mean = sde_step(x, v, self.sigmas[i], self.sigmas[i + 1], rl.eta, sigma_max, x_next)
                        loss, st = G.clipped_objective(lp, lp_old[i][ix].to(self.device), a, rl.clip_range)
                        if rl.kl_beta > 0:
                            with torch.no_grad(), self._reference() as ref:
                                v_ref = self._velocity(ref, x, i, caps, False)
                            _, _, mean_ref = sde_step(
                                x, v_ref, self.sigmas[i], self.sigmas[i + 1], rl.eta, sigma_max, x_next
                            )
                            kl = G.gaussian_kl(
                                mean, mean_ref, sde_scale(self.sigmas[i], self.sigmas[i + 1], rl.eta, sigma_max)
                            )
                            loss = loss + rl.kl_beta * kl
                            stats["kl"].append(float(kl.detach().mean()))
                        loss = loss.sum() / (len(part) * len(steps))
                        acc.backward(loss)
                    total += float(loss.detach())
                    for key in ("clipfrac", "approx_kl", "ratio_max"):
                        stats[key].append(st[key])
            if cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            totals.append(total)
        info = {k: float(np.mean(v)) for k, v in stats.items() if v}
        info["zero_std_ratio"] = float(1.0 - valid.float().mean())
        info["trained_steps"] = len(steps)
        for label, v in scores.items():
            info[f"reward/{label}"] = float(acc.reduce(v.detach().float().mean().to(self.device), "mean"))
            info[f"reward/{label}_std"] = float(v.detach().float().std())
        info["reward/total"] = float(acc.reduce(self.rewards.total(scores).float().mean().to(self.device), "mean"))
        return float(np.mean(totals)), info

    # ---- DPO ------------------------------------------------------------------------------------
    def dpo_losses(self, pairs: list[D.Pair], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Per-pair losses of one micro-batch (with gradients)."""
        rl = self.rl
        x_w = torch.stack([self.latents[self.ids[p.chosen]] for p in pairs]).float()
        x_l = torch.stack([self.latents[self.ids[p.rejected]] for p in pairs]).float()
        b = len(pairs)
        noise = torch.randn(x_w.shape, generator=generator, dtype=torch.float32)
        if rl.sigmas == "grid":
            sigma = D.grid_sigmas(b, self.sigmas[:-1], generator)
        else:
            n_tok = (x_w.shape[-2] // 2) * (x_w.shape[-1] // 2)
            sigma = sample_sigmas(b, n_tok, self.cfg.objective, generator)
        x_w, x_l, noise, sigma = (t.to(self.device) for t in (x_w, x_l, noise, sigma))
        xs_w, xs_l = D.noised_pair(x_w, x_l, noise, sigma)
        caps = [self.cond[p.prompt] for p in pairs]
        both = torch.cat([xs_w, xs_l])
        sig2 = torch.cat([sigma, sigma])
        raw = self._raw(self.model, both, sig2, caps + caps).float()
        with torch.no_grad(), self._reference() as ref:
            ref_raw = self._raw(ref, both, sig2, caps + caps).float()
        x0s, noises = torch.cat([x_w, x_l]), torch.cat([noise, noise])
        err, ref_err = D.flow_errors(raw, x0s, noises), D.flow_errors(ref_raw, x0s, noises)
        loss, st = D.dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], rl.beta)
        st["level"] = float(np.mean([p.level for p in pairs]))
        st["gap"] = float(np.mean([p.gap for p in pairs]))
        return loss, st

    def dpo_step(self) -> tuple[float, dict]:
        cfg, acc = self.cfg, self.acc
        n = cfg.optim.grad_accum
        total, infos = 0.0, []
        for micro in range(n):
            pairs = self.batches.take(self.step)
            ctx = acc.no_sync(self.model) if micro < n - 1 else nullcontext()
            with ctx:
                loss, st = self.dpo_losses(pairs, self.noise_gen)
                loss = loss.mean()
                acc.backward(loss / n)
            total += float(loss.detach())
            infos.append(st)
        if cfg.optim.grad_clip > 0:
            acc.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        info = {k: float(np.mean([i[k] for i in infos])) for k in infos[0]}
        info["competence"] = D.competence(self.step, self.batches.start, self.batches.warmup)
        return total / n, info

    # ---- the step the trainer's loop calls ------------------------------------------------------
    def train_step(self) -> tuple[float, dict]:
        loss, info = self.grpo_step() if self.rl.method == "grpo" else self.dpo_step()
        if not self.acc.optimizer_step_was_skipped:
            self.schedule.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.params, self.step)
        if not math.isfinite(loss):
            raise ZImageError(
                f"the {self.rl.method} loss became {loss} at step {self.step}; lower optim.lr or keep optim.grad_clip on."
            )
        return loss, info
