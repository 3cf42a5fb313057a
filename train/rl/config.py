"""The ``[rl]`` section of a training configuration (read by :func:`rl_config`; unknown keys are errors).

The rest of the file is the usual training configuration: ``[model]`` names the text encoder and VAE (and,
without ``rl.policy``, the DiT), ``[lora]`` trains a LoRA (the reference is then the base with the LoRA switched
off) or, when off, the whole DiT (the reference is a frozen copy), ``[optim]``, ``[ema]``, ``[checkpoint]``,
``[samples]`` and ``[export]`` work as for training; ``max_steps`` counts optimizer steps for DPO and rollout
iterations for GRPO and generator updates for DMDR. No ``[data]`` section is needed.

DMDR (``method = "dmdr"``, :mod:`train.rl.dmdr`) is a distillation run: its distillation settings are the
``[distill]`` keys given as ``[rl.distill]`` (the teacher is ``policy``; no GAN, backward simulation only), the
student's grid and the teacher's guidance come from there (``rl.steps``/``shift``/``cfg`` are not used), and
``batch`` is the prompts per micro-batch (``dmdr_reward = "grpo"``: ``prompts_per_step`` x ``group_size``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DistillSection, TrainConfig, _build

#: The RL methods: offline Diffusion-DPO, online Flow-GRPO, and DMDR (distillation with a reward).
METHODS = ("dpo", "grpo", "dmdr")
#: How DMDR's reward enters the generator's loss (``refl``: the reward's gradient through the decoded x0;
#: ``grpo``: group-relative advantages of Gaussian perturbations of x0, no reward gradient needed).
DMDR_REWARDS = ("refl", "grpo")


@dataclass
class RLConfig:
    method: str = ""  # dpo | grpo | dmdr
    policy: str = ""  # the DiT to improve (file or folder zimage reads); "" = model.checkpoint
    rewards: list = field(default_factory=list)  # [{ name = "...", weight = W, ...options }, { function = "m:f" }]
    prompts: list = field(default_factory=list)  # inline prompts
    prompts_file: str = ""  # .txt (one per line) or .jsonl ({"prompt": ..., "level": 0})
    # how images are drawn (candidates, rollouts)
    width: int = 256
    height: int = 256
    steps: int = 8  # sampler steps; Turbo: 8
    shift: float = 3.0
    cfg: float = 1.0  # 1 = CFG off (Turbo); Base: 4
    negative: str = ""
    memory: str = ""  # memory mode for drawing ("" = the DiT stays where training keeps it)
    # GRPO
    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 2  # prompt groups per rollout iteration (per process)
    eta: float = 0.7  # SDE noise level (Flow-GRPO a)
    same_noise: bool = False  # one start noise per group (DanceGRPO)
    aggregate: str = "advantage"  # advantage (composite: normalise each reward, then weight) | reward
    adv_std: str = "group"  # group | global
    adv_clip: float = 5.0
    clip_range: float = 1e-4  # PPO ratio clip
    kl_beta: float = 0.0  # KL to the reference (0 = off)
    train_steps: str = "all"  # all | random (step_fraction of the steps) | window (MixGRPO)
    step_fraction: float = 0.6
    window_size: int = 4
    window_shift_every: int = 25  # rollout iterations per window move (0 = fixed)
    updates_per_rollout: int = 1  # optimizer steps per rollout batch (the samples split between them)
    micro_batch: int = 0  # samples per forward in the update (0 = all at once)
    # DPO
    candidates: int = 8  # N images per prompt
    candidate_seed: int = 0  # candidate k of prompt i uses seed candidate_seed + k
    candidate_batch: int = 8
    beta: float = 100.0
    pairs_per_prompt: int = 1
    min_gap: float = 0.0
    batch: int = 4  # pairs per micro-batch (optim.grad_accum micro-batches per step)
    sigmas: str = "grid"  # grid (the sampler's own sigmas: no de-distilling) | logit_normal ([objective])
    prompt_buckets: int = 3
    curriculum_start: float = 0.3  # fraction of the ordered pairs available at step 0
    curriculum_warmup: int = -1  # steps until all pairs are available (-1 = half of max_steps, 0 = none)
    # DMDR (distillation with a reward; the [distill] keys as [rl.distill])
    distill: DistillSection = field(default_factory=DistillSection)
    dmdr_reward: str = "refl"  # refl: -reward_weight * reward(decode(x0)) | grpo: advantages (group_size per prompt)
    dmdr_noise: float = 0.1  # grpo: std of the Gaussian perturbation of x0 whose rewards give the advantages
    reward_weight: float = 1.0  # weight of the reward term against the DM term
    reward_start: int = 0  # generator updates of cold start (DM only) before the reward term joins
    dynadg_steps: int = 0  # DynaDG: real-score tilt annealed to 0 over these generator updates (0 = off)
    dynadg_scale: float = 0.375  # the tilt at step 0: the fake score's LoRA in the real score, as a fraction
    dynars_steps: int = 0  # DynaRS: DM/fake noise levels Beta(alpha, beta) annealed to uniform (0 = off)
    dynars_alpha: float = 4.0
    dynars_beta: float = 1.5

    def validate(self, max_steps: int) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"rl.method '{self.method}' must be one of {', '.join(METHODS)}.")
        if not self.rewards:
            raise ConfigError(
                'rl.rewards is empty: give at least one, e.g. rewards = [{ name = "ocr", weight = 1.0 }] or '
                '[{ function = "my_module:my_reward", weight = 1.0 }].'
            )
        if not self.prompts and not self.prompts_file:
            raise ConfigError("rl: give prompts = [...] or prompts_file = PATH (.txt or .jsonl).")
        for side in (self.width, self.height):
            if side < 16 or side % 16:
                raise ConfigError(f"rl.width/height must be positive multiples of 16, got {self.width}x{self.height}.")
        if self.steps < 2 or not self.shift > 0 or self.cfg < 1.0:
            raise ConfigError("rl: steps must be >= 2, shift > 0 and cfg >= 1 (1 = off).")
        if self.method == "grpo":
            if self.group_size < 2 or self.prompts_per_step < 1:
                raise ConfigError("rl: group_size must be >= 2 and prompts_per_step >= 1.")
            if self.aggregate not in ("advantage", "reward") or self.adv_std not in ("group", "global"):
                raise ConfigError("rl: aggregate must be 'advantage' or 'reward', adv_std 'group' or 'global'.")
            if self.train_steps not in ("all", "random", "window"):
                raise ConfigError(f"rl.train_steps '{self.train_steps}' must be all, random or window.")
            if not 0 < self.step_fraction <= 1 or self.window_size < 1:
                raise ConfigError("rl: step_fraction must be in (0, 1] and window_size >= 1.")
            if not self.eta > 0 or not self.clip_range > 0 or self.kl_beta < 0:
                raise ConfigError("rl: eta and clip_range must be > 0, kl_beta >= 0.")
            n = self.group_size * self.prompts_per_step
            if self.updates_per_rollout < 1 or self.updates_per_rollout > n:
                raise ConfigError(f"rl.updates_per_rollout must be between 1 and the {n} samples of a rollout.")
        if self.method == "dmdr":
            self._validate_dmdr(max_steps)
        if self.method == "dpo":
            if self.candidates < 2 or self.batch < 1 or self.pairs_per_prompt < 1 or self.candidate_batch < 1:
                raise ConfigError("rl: candidates must be >= 2; batch, candidate_batch and pairs_per_prompt >= 1.")
            if not self.beta > 0 or self.min_gap < 0:
                raise ConfigError("rl: beta must be > 0 and min_gap >= 0.")
            if self.sigmas not in ("grid", "logit_normal"):
                raise ConfigError(f"rl.sigmas '{self.sigmas}' must be 'grid' or 'logit_normal'.")
            if not 0 < self.curriculum_start <= 1 or self.prompt_buckets < 1:
                raise ConfigError("rl: curriculum_start must be in (0, 1] and prompt_buckets >= 1.")

    def _validate_dmdr(self, max_steps: int) -> None:
        if self.dmdr_reward not in DMDR_REWARDS:
            raise ConfigError(f"rl.dmdr_reward '{self.dmdr_reward}' must be one of {', '.join(DMDR_REWARDS)}.")
        if self.dmdr_reward == "grpo":
            if self.group_size < 2 or self.prompts_per_step < 1 or not self.dmdr_noise > 0:
                raise ConfigError(
                    "rl: DMDR with dmdr_reward = 'grpo' needs group_size >= 2 (samples per prompt in a micro-batch), "
                    "prompts_per_step >= 1 and dmdr_noise > 0."
                )
            if self.aggregate not in ("advantage", "reward") or self.adv_std not in ("group", "global"):
                raise ConfigError("rl: aggregate must be 'advantage' or 'reward', adv_std 'group' or 'global'.")
        if self.reward_weight < 0 or self.reward_start < 0:
            raise ConfigError("rl: reward_weight and reward_start must be >= 0.")
        if self.dynadg_steps < 0 or self.dynars_steps < 0:
            raise ConfigError("rl: dynadg_steps and dynars_steps must be >= 0 (0 = off).")
        if not 0.0 <= self.dynadg_scale <= 1.0:
            raise ConfigError(
                f"rl.dynadg_scale must be in [0, 1] (a fraction of the fake LoRA), got {self.dynadg_scale}."
            )
        if not (self.dynars_alpha > 0 and self.dynars_beta > 0):
            raise ConfigError("rl: dynars_alpha and dynars_beta must be > 0 (Beta distribution parameters).")
        if self.batch < 1:
            raise ConfigError("rl.batch (prompts per micro-batch) must be >= 1.")
        d = self.distill
        if d.teacher and self.policy and Path(d.teacher) != Path(self.policy):
            raise ConfigError(
                f"rl.distill.teacher '{d.teacher}' differs from rl.policy '{self.policy}': DMDR distills the policy; "
                "leave rl.distill.teacher out."
            )
        if d.gan_weight > 0 or d.student_input != "backward":
            raise ConfigError(
                "DMDR is data-free: rl.distill.gan_weight must be 0 and student_input 'backward' (no real latents)."
            )
        if self.dynadg_steps > 0 and d.fake != "lora":
            raise ConfigError(
                "rl.dynadg_steps tilts the real score by the fake score's LoRA: set rl.distill.fake = 'lora' "
                "or dynadg_steps = 0."
            )
        probe = TrainConfig()  # the distillation checks, on a scratch configuration
        probe.distill = dataclasses.replace(d, enabled=True, teacher=self.policy or d.teacher or "policy")
        probe._validate_distill()

    def load_prompts(self) -> tuple[list[str], list[int | None]]:
        """The prompts and their given difficulty levels (None where not given)."""
        prompts, levels = [str(p) for p in self.prompts], [None] * len(self.prompts)
        if self.prompts_file:
            p = Path(self.prompts_file)
            if not p.is_file():
                raise ConfigError(f"rl.prompts_file '{p}' does not exist.")
            lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for n, line in enumerate(lines, 1):
                if p.suffix == ".jsonl":
                    try:
                        rec = json.loads(line)
                        prompts.append(str(rec["prompt"]))
                        levels.append(int(rec["level"]) if rec.get("level") is not None else None)
                    except (ValueError, KeyError, TypeError) as e:
                        raise ConfigError(
                            f"line {n} of '{p}' must be a JSON object with 'prompt' (and optionally 'level'): {e}"
                        ) from e
                else:
                    prompts.append(line.strip())
                    levels.append(None)
        if not prompts:
            raise ConfigError("rl: the prompt list is empty.")
        return prompts, levels


def rl_config(tree: dict, max_steps: int = 1) -> RLConfig:
    """The validated ``[rl]`` section."""
    cfg = _build(RLConfig, dict(tree), "[rl]")
    cfg.validate(max_steps)
    return cfg
