"""The training loop: one process on a CPU or GPU, DDP or FSDP2 across GPUs and nodes, all through ``accelerate``.

Order of work: (1) optionally write the synthetic dataset; (2) build or reuse the latent/text cache with the
frozen VAE and text encoder, pre-encode the sample prompts (and the Omni prompt segments for edit data),
then free the text encoder (the VAE stays only when samples are drawn); (3) build the DiT (from scratch or a
file), add LoRA adapters if configured; (4) train: flow-matching loss, gradient accumulation, clipping,
AdamW / 8-bit AdamW, warm-up + constant/cosine LR, EMA; checkpoints, samples, logs; (5) export at the end.

Exact resume: weights, optimizer, LR schedule, EMA, every RNG (python, numpy, torch, CUDA and the trainer's
CPU noise generator) and the data position are restored, so a run stopped at step k and resumed produces the
same weights as one that never stopped (bit for bit on the CPU).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zimage_core.errors import ZImageError

from . import checkpoint as ck
from .config import TrainConfig
from .ema import EMA
from .objective import FlowModel, flow_loss

log = logging.getLogger(__name__)


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


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # this process's loss per optimizer step of this call
    checkpoint: Path | None = None
    export: Path | None = None
    stopped: bool = False


class Trainer:
    """``Trainer(cfg).train()``; ``resume`` = True (latest checkpoint of the run) or a checkpoint path."""

    def __init__(self, cfg: TrainConfig, resume: bool | str | Path | None = None, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.step = 0
        self._stop = False
        self._ready = False

    # ---- set-up ---------------------------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
        find_unused = cfg.ddp_find_unused_parameters
        if find_unused is None:
            find_unused = cfg.model.omni or cfg.model.preset == "omni"
        acc = Accelerator(
            cpu=cpu,
            mixed_precision=mp,
            log_with=None,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))],
        )
        kind = str(acc.distributed_type).rsplit(".", 1)[-1]
        if kind == "DEEPSPEED" or (kind == "FSDP" and not getattr(acc, "is_fsdp2", False)):
            raise ZImageError(
                f"accelerate is configured for {kind}{' v1' if kind == 'FSDP' else ''}; this trainer supports one "
                "process, DDP (--multi_gpu) and FSDP2 (fsdp_version: 2 in the accelerate config)."
            )
        return acc

    def setup(self) -> None:
        cfg = self.cfg
        self.acc = acc = self._accelerator()
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.out = cfg.out_dir
        self.ckpt_root = self.out / "checkpoints"
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ck.clean_stale(self.ckpt_root)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        acc.wait_for_everyone()
        random.seed(cfg.seed + self.rank)
        np.random.seed((cfg.seed + self.rank) % 2**32)
        torch.manual_seed(cfg.seed + self.rank)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (self.rank + 1))

        self.data_cfg = cfg.data_config()
        if cfg.synthetic:
            if acc.is_main_process:
                prepare_synthetic(cfg.synthetic)
            acc.wait_for_everyone()
        self._prepare_data()

        from .lora_train import add_lora
        from .model import build_dit

        dit = build_dit(cfg.model, cfg.seed, trainable=not cfg.lora.enabled)
        if cfg.lora.enabled:
            add_lora(dit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init_seed)
            dit.train()
        text_dim = self.data.text_dim
        if text_dim is not None and text_dim != dit.cfg.cap_feat_dim:
            raise ZImageError(
                f"the DiT reads caption features of width {dit.cfg.cap_feat_dim}, but the data cache holds width "
                f"{text_dim}: the text encoder does not belong to this DiT (model.text_encoder / model.dims)."
            )
        self.dit_config = dit.cfg
        names = {n for n, p in dit.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer([p for p in dit.parameters() if p.requires_grad], cfg.optim)
        o = cfg.optim
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRSchedule(o.warmup_steps, cfg.max_steps, o.schedule, o.min_lr_ratio)
        )
        # The scheduler is stepped by hand: accelerate would step it once per process.
        self.model, self.optimizer = acc.prepare(FlowModel(dit), self.optimizer)
        self.sharded = acc.is_fsdp2 if hasattr(acc, "is_fsdp2") else False
        self.dit = acc.unwrap_model(self.model).dit
        self.params = {n: p for n, p in self.dit.named_parameters() if n in names}
        e = cfg.ema
        self.ema = EMA(self.params, e.decay, e.start_step, e.every, e.warmup) if e.enabled else None
        self.batches = self.data.batches(cfg.seed, self.rank, self.world)
        self.writer = self._tensorboard() if acc.is_main_process else None
        if self.resume is True and ck.latest_checkpoint(self.ckpt_root) is None:
            log.info("--resume: %s holds no checkpoint yet; starting from step 0", self.ckpt_root)
        elif self.resume:
            self.load(ck.resolve_checkpoint(self.out if self.resume is True else self.resume))
        self._ready = True

    def _prepare_data(self) -> None:
        from train.data import CachedData, build_cache

        from .encoders import load_text_encoder, load_vae_for, load_vision
        from .model import dit_config_for

        cfg, acc = self.cfg, self.acc
        m = cfg.model
        has_edits = any(s.get("type") == "edit_jsonl" for s in self.data_cfg.sources)
        want_samples = cfg.samples.every > 0
        # The encoders are always loaded: build_cache compares them with the ones the cache was made with,
        # so a changed text encoder or VAE can never train on stale features.
        te, vae = load_text_encoder(m, self.device), load_vae_for(m, self.device)
        expected = dit_config_for(m).cap_feat_dim
        if te.config.hidden_size != expected:
            raise ZImageError(
                f"the text encoder '{m.text_encoder}' produces features of width {te.config.hidden_size}, but the DiT "
                f"reads width {expected} (cap_feat_dim): they do not belong together (model.text_encoder / model.dims)."
            )
        vision = load_vision(m, self.device)
        build_cache(
            self.data_cfg,
            vae,
            te,
            vision,
            progress=self.progress and acc.is_main_process,
            rank=self.rank,
            world_size=self.world,
        )
        acc.wait_for_everyone()
        if acc.is_main_process and self.world > 1:  # writes the manifest once every shard is done
            build_cache(self.data_cfg, vae, te, vision, progress=False)
        acc.wait_for_everyone()
        self.data = CachedData(self.data_cfg)
        self.segments = None
        if has_edits:
            from .omni_prompts import PromptStore, build_store, edit_texts

            store = self.out / "omni_prompts.safetensors"
            if acc.is_main_process:
                identity = {"text_encoder": m.text_encoder, "tokenizer": m.tokenizer, "seed": m.encoder_seed}
                build_store(store, te, edit_texts(self.data), self.data_cfg.max_text_tokens or None, identity)
            acc.wait_for_everyone()
            self.segments = PromptStore(store).segments()
        self.renderer = None
        if want_samples:
            from .samples import SampleRenderer

            max_len = self.data_cfg.max_text_tokens or None
            self.renderer = SampleRenderer(cfg.samples, te, vae, max_length=max_len)
            vae = None  # kept by the renderer
        del te, vae, vision
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            log.info("TensorBoard is not installed; logging to metrics.jsonl only (pip install tensorboard)")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ---- checkpoints ----------------------------------------------------------------------------
    def _meta(self) -> dict:
        import dataclasses

        return {
            "step": self.step,
            "epoch": self.batches.epoch,
            "world_size": self.world,
            "kind": self.kind,
            "dit_config": dataclasses.asdict(self.dit_config),
            "lora": dataclasses.asdict(self.cfg.lora),
            "config": self.cfg.to_dict(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    @property
    def kind(self) -> str:
        return "lora" if self.cfg.lora.enabled else "full"

    def _rank_state(self) -> dict:
        st = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "noise": self.noise_gen.get_state(),
            "data": self.batches.state_dict(),
            "step": self.step,
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def save(self) -> Path:
        """Write the checkpoint of the current step (all processes must call this)."""
        acc = self.acc
        trainable = ck.full_cpu(self.params)
        ema = ck.full_cpu(self.ema.shadow) if self.ema is not None else None
        optim = {
            "optimizer": ck.optimizer_state(self.optimizer, self.model, self.sharded),
            "scheduler": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
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

    def load(self, path: Path) -> None:
        meta = ck.read_meta(path)
        if meta.get("kind") != self.kind:
            raise ZImageError(
                f"checkpoint '{path}' is a {meta.get('kind')} run; this configuration trains {self.kind}."
            )
        ck.copy_into(self.params, ck.read_tensors(path, "trainable.safetensors"), f"checkpoint '{path}'")
        opt = ck.read_optimizer(path)
        ck.load_optimizer_state(self.optimizer, opt["optimizer"], self.model, self.sharded)
        self.schedule.load_state_dict(opt["scheduler"])
        o = self.cfg.optim  # the schedule's shape comes from this run's config (e.g. a longer max_steps)
        self.schedule.lr_lambdas[0] = LRSchedule(o.warmup_steps, self.cfg.max_steps, o.schedule, o.min_lr_ratio)
        if self.ema is not None:
            shadow = ck.read_tensors(path, "ema.safetensors") if (path / "ema.safetensors").is_file() else None
            if shadow is None:
                log.warning("checkpoint %s has no EMA; the EMA starts from the current weights", path.name)
                self.ema.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
            else:
                self.ema.load_state_dict(
                    opt.get("ema") or {}, {n: ck.like(shadow[n], t) for n, t in self.ema.shadow.items()}
                )
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
        self.batches.load_state_dict(rs["data"])
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ---- the loop -------------------------------------------------------------------------------
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

    def train_step(self) -> tuple[float, dict]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (this process)."""
        cfg, acc = self.cfg, self.acc
        n = cfg.optim.grad_accum
        total, info = 0.0, {}
        for micro in range(n):
            batch = next(self.batches)
            ctx = acc.no_sync(self.model) if micro < n - 1 else nullcontext()
            with ctx:
                loss, info = flow_loss(self.model, batch, cfg.objective, self.noise_gen, self.device, self.segments)
                acc.backward(loss / n)
            total += float(loss.detach())
        if cfg.optim.grad_clip > 0:
            norm = acc.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip)
            info["grad_norm"] = float(norm) if norm is not None else float("nan")
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.params, self.step)
        if not math.isfinite(total):
            raise ZImageError(
                f"the loss became {total} at step {self.step}; lower optim.lr, keep optim.grad_clip on, or use "
                "bf16 instead of fp16 mixed precision."
            )
        return total / n, info

    def sample(self) -> None:
        """Draw the fixed prompts with the current (or EMA) weights; the main process writes the images."""
        if self.renderer is None:
            return
        acc = self.acc
        if self.sharded:
            self.model.unshard()  # FSDP2: every rank runs the same sampling on gathered weights
        elif not acc.is_main_process:
            return
        use_ema = self.ema is not None and self.cfg.samples.use_ema
        self.renderer.vae.to(self.device)
        try:
            with self.ema.applied(self.params) if use_ema else nullcontext():
                imgs = self.renderer.render(
                    self.dit, self.device, self.step, self.out / "samples", acc.autocast, write=acc.is_main_process
                )
        finally:
            if self.sharded:
                self.model.reshard()
        if self.writer is not None:
            for name, img in imgs:
                self.writer.add_image(f"samples/{name}", np.asarray(img), self.step, dataformats="HWC")

    def _log(self, record: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

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
                    rec = {
                        "step": self.step,
                        "loss": mean,
                        "lr": self.schedule.get_last_lr()[0],
                        "epoch": self.batches.epoch,
                        "sec_per_step": (time.perf_counter() - t0) / len(window),
                        **info,
                    }
                    self._log(rec)
                    log.info("step %d loss %.5f lr %.3g", self.step, mean, rec["lr"])
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
                from .export import export_checkpoint

                (self.out / "export").mkdir(parents=True, exist_ok=True)
                result.export = export_checkpoint(
                    result.checkpoint,
                    self.out / "export",
                    ema=cfg.export.ema and self.ema is not None,
                    layout=cfg.export.layout,
                    dtype=cfg.export.dtype,
                )
            acc.wait_for_everyone()
        result.step = self.step
        self.batches.close()
        if self.writer is not None:
            self.writer.flush()
        return result


def prepare_synthetic(spec: dict) -> None:
    """Write the synthetic shapes dataset (and, with ``edits = true``, an edit-pair JSONL) unless present."""
    from train.data import make_synthetic_dataset

    allowed = {"folder", "n_per_class", "size", "seed", "edits"}
    unknown = sorted(set(spec) - allowed)
    if unknown or "folder" not in spec:
        raise ZImageError(f"[synthetic] needs 'folder' and takes {sorted(allowed)}; got {sorted(spec)}.")
    folder = Path(spec["folder"])
    if not any(folder.glob("*.png")):
        make_synthetic_dataset(
            folder, int(spec.get("n_per_class", 16)), int(spec.get("size", 64)), int(spec.get("seed", 0))
        )
        log.info("wrote the synthetic dataset to %s", folder)
    if spec.get("edits"):
        write_synthetic_edits(folder, folder.parent / f"{folder.name}_edits" / "edits.jsonl")


def write_synthetic_edits(folder: Path, jsonl: Path) -> Path:
    """Edit pairs between the synthetic classes: each image turned into the next class's image of the same index."""
    if jsonl.is_file():
        return jsonl
    from train.data.synthetic import CLASSES

    jsonl.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (_, slug, _, _, _) in enumerate(CLASSES):
        caption, nxt = CLASSES[(k + 1) % len(CLASSES)][0], CLASSES[(k + 1) % len(CLASSES)][1]
        for src in sorted(folder.glob(f"{slug}_*.png")):
            tgt = folder / src.name.replace(slug, nxt)
            if tgt.is_file():
                lines.append(
                    json.dumps(
                        {
                            "source": str(src.resolve()),
                            "target": str(tgt.resolve()),
                            "instruction": f"turn it into {caption}",
                            "caption": caption,
                        }
                    )
                )
    tmp = jsonl.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(jsonl)
    return jsonl
