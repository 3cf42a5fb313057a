"""What may change between a run and its ``--resume``: the policy table, and the checks a resume applies.

A checkpoint stores the configuration it was trained with. On ``--resume`` every setting that differs from the
current configuration is looked up in :data:`POLICY` (first matching pattern wins):

- ``free``: bookkeeping that does not touch the training (where files go, how often to log, sample or save);
- ``apply``: a training hyperparameter the resumed run can take over (optimizer settings, the LR shape,
  ``max_steps``, loss weights); the run logs ``optim.lr changed 0.0001 -> 0.0002, applied``;
- ``refuse``: the networks, the data or the method (``model.*``, ``data.*``, ``lora.rank``, ``distill.method``,
  ...): the resume stops with one message naming the key and both values.

DMDR's ``[rl.distill]`` table follows the ``distill.*`` rows. A key not in the table is refused: a new setting is safe to resume over only once someone says so here.
"""

from __future__ import annotations

import json
import logging
from fnmatch import fnmatchcase

from zimage_core.errors import ZImageError

log = logging.getLogger(__name__)

FREE, APPLY, REFUSE = "free", "apply", "refuse"

#: ``(pattern over dotted keys, policy)``; the first pattern that matches decides.
POLICY: tuple[tuple[str, str], ...] = (
    # bookkeeping: where files go and how often the run logs, samples, saves and exports
    ("name", FREE),
    ("output_dir", FREE),
    ("log_every", FREE),
    ("device", FREE),
    ("sharding", FREE),
    ("ddp_find_unused_parameters", FREE),
    ("checkpoint.*", FREE),
    ("samples.*", FREE),
    ("export.*", FREE),
    ("synthetic", FREE),
    ("synthetic.*", FREE),
    ("distill.lora_rank", FREE),  # the exported LoRA delta
    ("distill.export_diffusers", FREE),
    ("rl.memory", FREE),  # placement while drawing
    # training hyperparameters the resumed run takes over
    ("max_steps", APPLY),
    ("mixed_precision", APPLY),
    ("optim.lr", APPLY),
    ("optim.betas", APPLY),
    ("optim.weight_decay", APPLY),
    ("optim.eps", APPLY),
    ("optim.warmup_steps", APPLY),
    ("optim.schedule", APPLY),
    ("optim.min_lr_ratio", APPLY),
    ("optim.grad_clip", APPLY),
    ("optim.grad_accum", APPLY),
    ("objective.*", APPLY),
    ("ema.decay", APPLY),
    ("ema.start_step", APPLY),
    ("ema.every", APPLY),
    ("ema.warmup", APPLY),
    ("distill.fake_lr", APPLY),
    ("distill.ttur", APPLY),
    ("distill.dm_weight", APPLY),
    ("distill.ca_weight", APPLY),
    ("distill.gan_d_weight", APPLY),
    ("distill.cfg", APPLY),
    ("distill.sigma_min", APPLY),
    ("distill.sigma_max", APPLY),
    ("distill.sigma_shift", APPLY),
    ("distill.normalize", APPLY),
    ("rl.kl_beta", APPLY),
    ("rl.clip_range", APPLY),
    ("rl.adv_clip", APPLY),
    ("rl.beta", APPLY),
    ("rl.eta", APPLY),
    ("rl.updates_per_rollout", APPLY),
    ("rl.micro_batch", APPLY),
    ("rl.window_shift_every", APPLY),
    ("rl.curriculum_start", APPLY),
    ("rl.curriculum_warmup", APPLY),
    ("rl.reward_weight", APPLY),  # DMDR: the loss weights and schedules, not the networks
    ("rl.reward_start", APPLY),
    ("rl.dmdr_noise", APPLY),
    ("rl.dynadg_steps", APPLY),
    ("rl.dynadg_scale", APPLY),
    ("rl.dynars_steps", APPLY),
    ("rl.dynars_alpha", APPLY),
    ("rl.dynars_beta", APPLY),
    # everything else (the networks, the data, the method, the seed) cannot change under a checkpoint
    ("*", REFUSE),
)

_WHY = {
    "model": "the network's architecture and weights come from the checkpoint",
    "lora": "the LoRA adapters' shapes are in the checkpoint",
    "data": "the data position and cache belong to the checkpoint",
    "seed": "the random streams are restored from the checkpoint",
    "distill": "the distillation's networks and method are in the checkpoint",
    "rl": "the RL method, policy and sampling are part of the checkpoint",
    "optim": "the optimizer's state has this optimizer's layout",
}


def policy(key: str) -> str:
    if key.startswith("rl.distill."):  # DMDR's [rl.distill] holds the [distill] keys: the same rules
        key = key[len("rl.") :]
    for pattern, rule in POLICY:
        if fnmatchcase(key, pattern):
            return rule
    return REFUSE


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists and empty tables stay values)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _plain(tree: dict) -> dict:
    return json.loads(json.dumps(tree, default=str))


def changed_settings(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every setting that differs (after a JSON round trip)."""
    a, b = flatten(_plain(saved)), flatten(_plain(current))
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            out.append((key, None if old is missing else old, None if new is missing else new))
    return out


def check_resume_config(saved: dict | None, current: dict, where) -> list[tuple[str, object, object]]:
    """Refuse (one message) or accept the changes between a checkpoint's configuration and this run's; log each
    applied change. Returns the changes that were applied or free."""
    if not saved:
        return []
    changes = changed_settings(saved, current)
    for key, old, new in changes:
        if policy(key) == REFUSE:
            why = _WHY.get(key.split(".")[0], "it is part of what the checkpoint holds")
            raise ZImageError(
                f"cannot resume from '{where}' with {key} = {new!r}: the checkpoint was trained with {key} = {old!r} "
                f"and this setting cannot change on resume ({why}). Set it back to {old!r}, or start a new run "
                "(another output_dir, without --resume)."
            )
    for key, old, new in changes:
        if policy(key) == APPLY:
            log.info("%s changed %s -> %s, applied", key, _show(old), _show(new))
        else:
            log.debug("%s changed %s -> %s", key, _show(old), _show(new))
    return changes


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def optimizer_hyperparameters(optimizer) -> list[dict]:
    """The per-group settings of an optimizer as this run's configuration made them (before a state is loaded)."""
    keep = ("lr", "initial_lr", "betas", "weight_decay", "eps")
    return [{k: g[k] for k in keep if k in g} for g in optimizer.param_groups]


def restore_hyperparameters(optimizer, schedule, wanted: list[dict]) -> None:
    """After ``optimizer.load_state_dict`` (which brings back the checkpoint's lr, betas, ...): put this run's
    settings back, and recompute the current LR from this run's base LR and the schedule's position. A no-op
    when nothing changed, so an unchanged resume stays bit for bit."""
    for i, (group, want) in enumerate(zip(optimizer.param_groups, wanted)):
        base = want.get("initial_lr", want.get("lr"))
        for k in ("betas", "weight_decay", "eps"):
            if k in want and group.get(k) != want[k]:
                group[k] = want[k]
        if schedule is None:
            if "lr" in want and group.get("lr") != want["lr"]:
                group["lr"] = want["lr"]
            continue
        if base is not None and schedule.base_lrs[i] != base:
            schedule.base_lrs[i] = base
            group["initial_lr"] = base
            group["lr"] = base * schedule.lr_lambdas[i](schedule.last_epoch)
            schedule._last_lr = [g["lr"] for g in optimizer.param_groups]
