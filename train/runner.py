"""The run infrastructure every trainer shares: :class:`RunBase` owns what is not the training maths.

A trainer (flow matching in :mod:`train.trainer`, distillation in :mod:`train.distill`, RL post-training) is a
subclass that builds its networks in :meth:`RunBase.build` and does one optimizer step in
:meth:`RunBase.train_step`; the base owns the rest, the same way for all of them:

- the ``accelerate`` set-up (one process, DDP, FSDP2; :meth:`RunBase.make_accelerator`), the output folder
  (``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``samples/``, ``checkpoints/``, ``export/``);
- seeding: python, numpy and torch from ``seed + rank``; :attr:`RunBase.noise_gen`, a CPU generator per rank;
- the step counter, the loop (progress bar, logging every ``log_every`` steps, samples every ``samples.every``,
  checkpoints every ``checkpoint.every``), SIGINT/SIGTERM = save a checkpoint after the current step and exit;
- checkpoints of a **named set of trained units** (:class:`Unit`: trainable tensors, optimizer, LR schedule,
  EMA), written atomically with every process's RNG states, and resumed bit for bit (:meth:`save`,
  :meth:`load`); the export at ``max_steps``.

The API a subclass uses (stable; the distillation and RL trainers are built on it):

=============================  ==========================================================================
``build()``                    create data, networks, optimizers; register them in ``self.units``
``train_step() -> (loss, info)``  one optimizer step; advance ``self.step`` by one; ``info`` is logged
``kind`` (property)            a word written in ``trainer.json``; a checkpoint of another kind is refused
``loop_fields() -> dict``      values logged after ``loss`` (e.g. ``lr``, ``epoch``)
``render_samples() -> list``   ``[(name, PIL image)]`` drawn at fixed seeds (files written by the subclass)
``export(checkpoint) -> Path``  the files a finished run leaves in ``OUTPUT_DIR/export/`` (main process)
``rank_extra()`` / ``load_rank_extra(d)``  more per-process state (a data position, another generator)
``meta_extra() -> dict``       more fields for ``trainer.json`` (e.g. the architecture)
``close()``                    release data loaders at the end of :meth:`train`
=============================  ==========================================================================

Provided: ``self.acc``, ``self.device``, ``self.rank``, ``self.world``, ``self.out``, ``self.ckpt_root``,
``self.noise_gen``, ``self.writer`` (TensorBoard or None), ``self.step``, ``self.units``, :meth:`setup`,
:meth:`train`, :meth:`save`, :meth:`load`, :meth:`sample`, :meth:`log_metrics`, :meth:`request_stop`.

The configuration object needs: ``name``, ``out_dir``, ``seed``, ``max_steps``, ``log_every``,
``mixed_precision``, ``device``, ``ddp_find_unused_parameters``, ``to_dict()``, ``checkpoint.every``,
``checkpoint.keep_last``, ``samples.every``, ``export.final`` (:class:`train.config.TrainConfig` has them).

Checkpoint files (see :mod:`train.checkpoint`): the unit named :data:`MAIN` is ``trainable.safetensors`` /
``ema.safetensors`` with its optimizer, schedule and EMA state at the top of ``optimizer.pt`` (what
:mod:`train.export` reads); any other unit ``NAME`` is ``NAME.safetensors`` / ``NAME.ema.safetensors`` with its
state under ``optimizer.pt["units"][NAME]``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zimage_core.errors import ZImageError
from zimage_core.outputs import atomic_path

from . import checkpoint as ck
from .resume import check_resume_config, optimizer_hyperparameters, restore_hyperparameters

log = logging.getLogger(__name__)

#: The unit whose tensors are ``trainable.safetensors`` (the model a run exports).
MAIN = "trainable"


class LRSchedule:
    """Linear warm-up to 1, then constant or cosine down to ``min_ratio`` at ``total`` steps (a LambdaLR factor)."""

    def __init__(self, warmup: int, total: int, kind: str, min_ratio: float = 0.0):
        self.warmup, self.total, self.kind, self.min_ratio = warmup, total, kind, min_ratio

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - self.warmup) / max(1, self.total - self.warmup)))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], o) -> torch.optim.Optimizer:
    """AdamW or bitsandbytes' 8-bit AdamW from an ``[optim]``-like section (``optimizer, lr, betas, ...``)."""
    kw = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
            raise ZImageError(
                f"optim.optimizer = 'adamw8bit' needs bitsandbytes, which cannot be imported ({type(e).__name__}: {e}). "
                "Install it (pip install bitsandbytes) or use optimizer = 'adamw'."
            ) from e
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def make_schedule(optimizer: torch.optim.Optimizer, o, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The :class:`LRSchedule` of an ``[optim]``-like section as a LambdaLR (stepped by hand, once per step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(o.warmup_steps, total, o.schedule, o.min_lr_ratio))


@dataclass
class Unit:
    """One trained network as a checkpoint sees it.

    ``params`` are the trained tensors by name (saved in float32; DTensor shards are gathered), ``model`` the
    module the optimizer's parameters belong to as prepared (needed for FSDP2 optimizer state, with
    ``sharded``). ``optimizer``, ``schedule`` and ``ema`` are optional. A schedule's LR function is this run's
    (from its config) after a resume, so a longer ``max_steps`` stretches a cosine.
    """

    params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LambdaLR | None = None
    ema: object | None = None  # train.ema.EMA
    model: torch.nn.Module | None = None
    sharded: bool = False


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # this process's loss per optimizer step of this call
    checkpoint: Path | None = None
    export: Path | None = None
    stopped: bool = False


def _cache_dir(cfg) -> Path | None:
    """The data cache folder a configuration names (None without a [data] section or when it is invalid)."""
    if not cfg.data:
        return None
    try:
        return Path(cfg.data_config().cache_dir).expanduser()
    except ZImageError:
        return None


def _remove_created(paths: list[Path]) -> None:
    """Remove folders a failed start created: the output folder (all of it: it is new), and a data cache folder
    only while it holds no finished shard (an interrupted build's shards are kept: the next start continues)."""
    import shutil

    for p in paths:
        if not p.is_dir():
            continue
        if any(p.glob("shard-*.safetensors")):
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed '%s' (created by this failed start)", p)


def unit_files(name: str) -> tuple[str, str]:
    """The safetensors files of a unit's weights and EMA."""
    if name == MAIN:
        return "trainable.safetensors", "ema.safetensors"
    return f"{name}.safetensors", f"{name}.ema.safetensors"


class RunBase:
    """``Sub(cfg).train()``; ``resume`` = True (latest checkpoint of the run) or a checkpoint path."""

    def __init__(self, cfg, resume: bool | str | Path | None = None, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.step = 0
        self.units: dict[str, Unit] = {}
        self.writer = None
        self._stop = False
        self._ready = False

    # ---- what a subclass provides -----------------------------------------------------------------
    @property
    def kind(self) -> str:
        raise NotImplementedError

    def build(self) -> None:
        """Create data, networks and optimizers and register the trained ones in ``self.units``."""
        raise NotImplementedError

    def train_step(self) -> tuple[float, dict]:
        """One optimizer step; advances ``self.step``; returns this process's loss and values to log."""
        raise NotImplementedError

    def loop_fields(self) -> dict:
        return {}

    def render_samples(self) -> list:
        return []

    def export(self, checkpoint: Path) -> Path | None:
        return None

    def rank_extra(self) -> dict:
        return {}

    def load_rank_extra(self, state: dict) -> None:
        pass

    def meta_extra(self) -> dict:
        return {}

    def find_unused_parameters(self) -> bool:
        return bool(self.cfg.ddp_find_unused_parameters)

    def close(self) -> None:
        pass

    # ---- set-up -------------------------------------------------------------------------------------
    def make_accelerator(self):
        """An ``accelerate.Accelerator`` for the launcher's processes; DeepSpeed and FSDP v1 are refused."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
        acc = Accelerator(
            cpu=cpu,
            mixed_precision=mp,
            log_with=None,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters())],
        )
        kind = str(acc.distributed_type).rsplit(".", 1)[-1]
        if kind == "DEEPSPEED" or (kind == "FSDP" and not getattr(acc, "is_fsdp2", False)):
            raise ZImageError(
                f"accelerate is configured for {kind}{' v1' if kind == 'FSDP' else ''}; this trainer supports one "
                "process, DDP (--multi_gpu) and FSDP2 (fsdp_version: 2 in the accelerate config)."
            )
        return acc

    def setup(self) -> None:
        """Accelerator, seeds, :meth:`build`, the resume; ``config.json`` is written once all of it succeeded.
        A start that fails removes what it created (a new output folder, a new data cache folder still empty)."""
        cfg = self.cfg
        self.acc = acc = self.make_accelerator()
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.out = cfg.out_dir
        self.ckpt_root = self.out / "checkpoints"
        cfg.check_model_files()  # before anything is made
        created = [p for p in (self.out, _cache_dir(cfg)) if p is not None and not p.exists()]
        try:
            if acc.is_main_process:
                self.out.mkdir(parents=True, exist_ok=True)
                ck.clean_stale(self.ckpt_root)
            acc.wait_for_everyone()
            random.seed(cfg.seed + self.rank)
            np.random.seed((cfg.seed + self.rank) % 2**32)
            torch.manual_seed(cfg.seed + self.rank)
            self.noise_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (self.rank + 1))
            resume_from = self._resume_checkpoint()  # found and checked against this configuration before build
            self.build()
            if resume_from is not None:
                self.load(resume_from, report=False)
            if acc.is_main_process:
                if self.step:
                    self._truncate_metrics(self.step)
                self.writer = self._tensorboard()
                with atomic_path(self.out / "config.json") as tmp:  # this run's settings, resumed changes included
                    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        except BaseException:
            if acc.is_main_process:
                _remove_created(created)
            raise
        self._ready = True

    def _truncate_metrics(self, step: int) -> None:
        """Drop the records after ``step`` (written by the run between its last checkpoint and a kill), so a resumed
        run's ``metrics.jsonl`` has each step once."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                rec_step = int(json.loads(line).get("step", 0))
            except (ValueError, AttributeError):
                rec_step = 0  # keep a line we cannot read rather than lose it
            if rec_step > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in kept))
            log.info("metrics.jsonl: dropped %d record(s) after step %d (not in the resumed checkpoint)", dropped, step)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            log.info("TensorBoard is not installed; logging to metrics.jsonl only (pip install tensorboard)")
            return None
        # a resumed run overwrites the events after its checkpoint's step instead of doubling them
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)

    # ---- checkpoints ------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.world,
            "kind": self.kind,
            **self.meta_extra(),
            "config": self.cfg.to_dict(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _rank_state(self) -> dict:
        st = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "noise": self.noise_gen.get_state(),
            **self.rank_extra(),
            "step": self.step,
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    @staticmethod
    def _unit_state(u: Unit) -> dict:
        return {
            "optimizer": ck.optimizer_state(u.optimizer, u.model, u.sharded) if u.optimizer is not None else None,
            "scheduler": u.schedule.state_dict() if u.schedule is not None else None,
            "ema": u.ema.state_dict() if u.ema is not None else None,
        }

    def save(self) -> Path:
        """Write the checkpoint of the current step (all processes must call this: shards are gathered)."""
        acc = self.acc
        tensors: dict[str, dict] = {}
        optim: dict = {}
        for name, u in self.units.items():
            weights, ema = unit_files(name)
            tensors[weights] = ck.full_cpu(u.params)
            if u.ema is not None:
                tensors[ema] = ck.full_cpu(u.ema.shadow)
            state = self._unit_state(u)
            if name == MAIN:
                optim.update(state)
            else:
                optim.setdefault("units", {})[name] = state
        main_w, main_e = unit_files(MAIN)
        trainable, ema = tensors.pop(main_w, {}), tensors.pop(main_e, None)
        meta, rank_state = self._meta(), self._rank_state()

        def write(folder: Path) -> None:
            ck.write_checkpoint(
                folder,
                rank=self.rank,
                is_main=acc.is_main_process,
                trainable=trainable,
                ema=ema,
                optim=optim if acc.is_main_process else None,
                meta=meta,
                rank_state=rank_state,
                **({"extra": tensors} if tensors else {}),
            )

        final = ck.write_atomic_dir(
            self.ckpt_root / ck.step_name(self.step), write, acc.is_main_process, acc.wait_for_everyone
        )
        if acc.is_main_process:
            for p in ck.prune(self.ckpt_root, self.cfg.checkpoint.keep_last):
                log.info("removed old checkpoint %s", p.name)
        acc.wait_for_everyone()
        log.info("saved checkpoint %s", final)
        return final

    def check_meta(self, meta: dict, path: Path) -> None:
        if meta.get("kind") != self.kind:
            raise ZImageError(
                f"checkpoint '{path}' is a {meta.get('kind')} run; this configuration trains {self.kind}."
            )

    def _load_unit(self, path: Path, name: str, u: Unit, state: dict) -> None:
        weights, ema_file = unit_files(name)
        ck.copy_into(u.params, ck.read_tensors(path, weights), f"checkpoint '{path}'")
        if u.optimizer is not None:
            ck.load_optimizer_state(u.optimizer, state["optimizer"], u.model, u.sharded)
        if u.schedule is not None:
            lambdas = list(u.schedule.lr_lambdas)  # this run's LR shape (e.g. a longer max_steps)
            u.schedule.load_state_dict(state["scheduler"])
            u.schedule.lr_lambdas[:] = lambdas
        if u.ema is not None:
            shadow = ck.read_tensors(path, ema_file) if (path / ema_file).is_file() else None
            if shadow is None:
                log.warning("checkpoint %s has no EMA; the EMA starts from the current weights", path.name)
                u.ema.shadow = {n: p.detach().float().clone() for n, p in u.params.items()}
            else:
                u.ema.load_state_dict(
                    state.get("ema") or {}, {n: ck.like(shadow[n], t) for n, t in u.ema.shadow.items()}
                )

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint ``--resume`` names, checked (its kind, what changed in the configuration) before the
        networks and the data are built; None when there is nothing to resume from."""
        if not self.resume:
            return None
        if self.resume is True and ck.latest_checkpoint(self.ckpt_root) is None:
            log.info("--resume: %s holds no checkpoint yet; starting from step 0", self.ckpt_root)
            return None
        path = ck.resolve_checkpoint(self.out if self.resume is True else self.resume)
        meta = ck.read_meta(path)
        self.check_meta(meta, path)
        check_resume_config(meta.get("config"), self.cfg.to_dict(), path)
        return path

    def load(self, path: Path, report: bool = True) -> None:
        meta = ck.read_meta(path)
        self.check_meta(meta, path)
        if report:  # refuse, or apply and log each change (setup did it before building)
            check_resume_config(meta.get("config"), self.cfg.to_dict(), path)
        wanted = {n: optimizer_hyperparameters(u.optimizer) for n, u in self.units.items() if u.optimizer is not None}
        opt = ck.read_optimizer(path)
        for name, u in self.units.items():
            state = opt if name == MAIN else (opt.get("units") or {}).get(name)
            if state is None:
                raise ZImageError(
                    f"checkpoint '{path}' holds no state for '{name}'; it was written by a run with other networks."
                )
            self._load_unit(path, name, u, state)
            if u.optimizer is not None:  # this run's lr, betas, weight decay (the checkpoint's were loaded)
                restore_hyperparameters(u.optimizer, u.schedule, wanted[name])
        rs = ck.read_rank_state(path, self.rank)
        if rs is None:
            rs = ck.read_rank_state(path, 0)
            log.warning(
                "checkpoint %s has no state for rank %d (world size was %s); RNG streams restart from rank 0's",
                path.name,
                self.rank,
                meta.get("world_size"),
            )
        random.setstate(rs["python"])
        np.random.set_state(rs["numpy"])
        torch.set_rng_state(rs["torch"])
        self.noise_gen.set_state(rs["noise"])
        if "cuda" in rs and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rs["cuda"])
        self.load_rank_extra(rs)
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ---- the loop ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current step (with a checkpoint), as SIGINT/SIGTERM do."""
        self._stop = True

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            log.warning("signal %d: stopping after this step (a checkpoint is saved); send it again to abort", signum)
            self._stop = True
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))

        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.getsignal(s)
            signal.signal(s, handler)
        return previous

    def sample(self) -> None:
        """Draw the sample images (:meth:`render_samples`) and add them to TensorBoard."""
        imgs = self.render_samples() or []
        if self.writer is not None:
            for name, img in imgs:
                self.writer.add_image(f"samples/{name}", np.asarray(img), self.step, dataformats="HWC")

    def log_metrics(self, record: dict) -> None:
        """Append ``record`` (with ``step``) to ``metrics.jsonl`` and its numbers to TensorBoard (main process)."""
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    _log = log_metrics

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Train until ``max_steps`` (or ``stop_after`` more steps, or a SIGINT/SIGTERM), saving a checkpoint on the
        way out; export the final weights when ``max_steps`` is reached."""
        if not self._ready:
            self.setup()
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        result = TrainResult(self.step)
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        previous = self._install_signals()
        # Adam's second moments of barely-moving weights reach denormal floats, which make CPU math (sqrt) ~100x
        # slower; flushing them to zero is harmless. Switched off again when the loop ends (process-wide flag).
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=cfg.name,
            unit="step",
            disable=None if (self.progress and acc.is_main_process) else True,
        )
        window, t0, saved_at = [], time.perf_counter(), None
        try:
            while self.step < end and not self._stop:
                loss, info = self.train_step()
                result.losses.append(loss)
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                saved_at = None
                if self.step % max(1, cfg.log_every) == 0 or self.step == end:
                    mean = float(acc.reduce(torch.tensor(sum(window) / len(window), device=self.device), "mean"))
                    fields = self.loop_fields()
                    rec = {
                        "step": self.step,
                        "loss": mean,
                        **fields,
                        "sec_per_step": (time.perf_counter() - t0) / len(window),
                        **info,
                    }
                    self.log_metrics(rec)
                    if "lr" in fields:
                        log.info("step %d loss %.5f lr %.3g", self.step, mean, fields["lr"])
                    else:
                        log.info("step %d loss %.5f", self.step, mean)
                    window, t0 = [], time.perf_counter()
                if cfg.samples.every and self.step % cfg.samples.every == 0:
                    self.sample()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    result.checkpoint, saved_at = self.save(), self.step
        finally:
            bar.close()
            if flush:
                torch.set_flush_denormal(False)
            for s, h in previous.items():
                signal.signal(s, h)
        result.stopped = self._stop or self.step < cfg.max_steps
        if saved_at != self.step and self.step > result.step:
            result.checkpoint = self.save()
        elif result.checkpoint is None:
            result.checkpoint = ck.latest_checkpoint(self.ckpt_root)
        if self.step >= cfg.max_steps and cfg.export.final and result.checkpoint is not None:
            if acc.is_main_process:
                (self.out / "export").mkdir(parents=True, exist_ok=True)
                result.export = self.export(result.checkpoint)
            acc.wait_for_everyone()
        result.step = self.step
        self.close()
        if self.writer is not None:
            self.writer.flush()
        return result
