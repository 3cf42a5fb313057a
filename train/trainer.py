"""The training loop: one process on a CPU or GPU, DDP or FSDP2 across GPUs and nodes, all through ``accelerate``.

Order of work: (1) optionally write the synthetic dataset; (2) build or reuse the latent/text cache with the
frozen VAE and text encoder, pre-encode the sample prompts (and the Omni prompt segments for edit data),
then free the text encoder (the VAE stays only when samples are drawn); (3) build the DiT (from scratch or a
file), add LoRA adapters if configured; (4) train: flow-matching loss, gradient accumulation, clipping,
AdamW / 8-bit AdamW, warm-up + constant/cosine LR, EMA; checkpoints, samples, logs; (5) export at the end.

Exact resume: weights, optimizer, LR schedule, EMA, every RNG (python, numpy, torch, CUDA) and the data position
are restored, so a run stopped at step k and resumed produces the same weights as one that never stopped (bit for
bit on the CPU). Noise and timesteps come from a generator keyed by the micro-batch's global index
(:mod:`train.parallel`), so the number of processes does not change a run either. The run infrastructure
(accelerator, checkpoints, loop, logs, signals) is :class:`train.runner.RunBase`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from zimage_core.errors import ZImageError

from .ema import EMA
from .objective import FlowModel, flow_loss
from .parallel import global_micro_index, keyed_generator
from .runner import MAIN, LRSchedule, RunBase, TrainResult, Unit, make_optimizer, make_schedule

log = logging.getLogger(__name__)

__all__ = ["LRSchedule", "TrainResult", "Trainer", "make_optimizer", "prepare_synthetic", "write_synthetic_edits"]


class Trainer(RunBase):
    """``Trainer(cfg).train()``; ``resume`` = True (latest checkpoint of the run) or a checkpoint path.

    The run infrastructure (accelerator, checkpoints, loop, logs, signals) is :class:`train.runner.RunBase`'s;
    this class adds the data, the DiT (full or LoRA), its optimizer, schedule and EMA, and the flow-matching step.
    """

    # ---- set-up ---------------------------------------------------------------------------------
    def find_unused_parameters(self) -> bool:
        cfg = self.cfg
        find_unused = cfg.ddp_find_unused_parameters
        if find_unused is None:
            find_unused = cfg.model.omni or cfg.model.preset == "omni"
        return bool(find_unused)

    def build(self) -> None:
        cfg, acc = self.cfg, self.acc
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
        if cfg.sharding == "fsdp2" and self.world > 1:
            # our own FSDP2 (any backend, CPU/gloo included); the optimizer sees the DTensor shards
            from .parallel import shard_dit

            shard_dit(dit, self.device, acc.mixed_precision)
            self.model = FlowModel(dit)
            self.optimizer = make_optimizer([p for p in dit.parameters() if p.requires_grad], cfg.optim)
            self.schedule = make_schedule(self.optimizer, cfg.optim, cfg.max_steps)
            self.optimizer = acc.prepare(self.optimizer)
            self.sharded, self.fsdp_root = True, dit
        else:
            self.optimizer = make_optimizer([p for p in dit.parameters() if p.requires_grad], cfg.optim)
            # The scheduler is stepped by hand: accelerate would step it once per process.
            self.schedule = make_schedule(self.optimizer, cfg.optim, cfg.max_steps)
            self.model, self.optimizer = acc.prepare(FlowModel(dit), self.optimizer)
            self.sharded = acc.is_fsdp2 if hasattr(acc, "is_fsdp2") else False
            self.fsdp_root = self.model
        self.dit = acc.unwrap_model(self.model).dit
        self.params = {n: p for n, p in self.dit.named_parameters() if n in names}
        e = cfg.ema
        self.ema = EMA(self.params, e.decay, e.start_step, e.every, e.warmup) if e.enabled else None
        self.units[MAIN] = Unit(self.params, self.optimizer, self.schedule, self.ema, self.model, self.sharded)
        self.batches = self.data.batches(cfg.seed, self.rank, self.world)

    def _prepare_data(self) -> None:
        self.data, self.segments, self.renderer = prepare_run_data(
            self.cfg, self.data_cfg, self.acc, self.device, self.out, self.progress
        )

    # ---- checkpoints ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "lora" if self.cfg.lora.enabled else "full"

    def meta_extra(self) -> dict:
        import dataclasses

        return {
            "epoch": self.batches.epoch,
            "dit_config": dataclasses.asdict(self.dit_config),
            "lora": dataclasses.asdict(self.cfg.lora),
        }

    def rank_extra(self) -> dict:
        return {"data": self.batches.state_dict()}

    def load_rank_extra(self, state: dict) -> None:
        self.batches.load_state_dict(state["data"])

    # ---- the loop -------------------------------------------------------------------------------
    def loop_fields(self) -> dict:
        return {"lr": self.schedule.get_last_lr()[0], "epoch": self.batches.epoch}

    def train_step(self) -> tuple[float, dict]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (this process)."""
        cfg, acc = self.cfg, self.acc
        n = cfg.optim.grad_accum
        total, info = 0.0, {}
        for micro in range(n):
            batch = next(self.batches)
            # noise and timesteps keyed by the micro-batch's global index: the process count does not change a run
            gen = keyed_generator(cfg.seed, global_micro_index(self.step, micro, n, self.rank, self.world))
            ctx = acc.no_sync(self.model) if micro < n - 1 else nullcontext()
            with ctx:
                loss, info = flow_loss(self.model, batch, cfg.objective, gen, self.device, self.segments)
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

    def render_samples(self) -> list:
        """Draw the fixed prompts with the current (or EMA) weights; the main process writes the images."""
        if self.renderer is None:
            return []
        acc = self.acc
        if self.sharded:
            self.fsdp_root.unshard()  # FSDP2: every rank runs the same sampling on gathered weights
        elif not acc.is_main_process:
            return []
        use_ema = self.ema is not None and self.cfg.samples.use_ema
        self.renderer.vae.to(self.device)
        try:
            with self.ema.applied(self.params) if use_ema else nullcontext():
                return self.renderer.render(
                    self.dit, self.device, self.step, self.out / "samples", acc.autocast, write=acc.is_main_process
                )
        finally:
            if self.sharded:
                self.fsdp_root.reshard()

    def export(self, checkpoint: Path) -> Path:
        from .export import export_checkpoint

        cfg = self.cfg
        return export_checkpoint(
            checkpoint,
            self.out / "export",
            ema=cfg.export.ema and self.ema is not None,
            layout=cfg.export.layout,
            dtype=cfg.export.dtype,
        )

    def close(self) -> None:
        self.batches.close()


def prepare_run_data(cfg, data_cfg, acc, device, out: Path, progress: bool = True):
    """Build or reuse the latent/text cache with the frozen encoders, pre-encode the sample prompts (and the Omni
    prompt segments for edit data), then free the text encoder. Returns ``(CachedData, segments or None,
    SampleRenderer or None)``; every process must call it. Shared by the trainers that read the data cache."""
    from train.data import CachedData, build_cache

    from .encoders import load_text_encoder, load_vae_for, load_vision
    from .model import dit_config_for

    rank, world = acc.process_index, acc.num_processes
    m = cfg.model
    has_edits = any(s.get("type") == "edit_jsonl" for s in data_cfg.sources)
    want_samples = cfg.samples.every > 0
    # The encoders are always loaded: build_cache compares them with the ones the cache was made with,
    # so a changed text encoder or VAE can never train on stale features.
    te, vae = load_text_encoder(m, device), load_vae_for(m, device)
    expected = dit_config_for(m).cap_feat_dim
    if te.config.hidden_size != expected:
        raise ZImageError(
            f"the text encoder '{m.text_encoder}' produces features of width {te.config.hidden_size}, but the DiT "
            f"reads width {expected} (cap_feat_dim): they do not belong together (model.text_encoder / model.dims)."
        )
    vision = load_vision(m, device)
    build_cache(
        data_cfg,
        vae,
        te,
        vision,
        progress=progress and acc.is_main_process,
        rank=rank,
        world_size=world,
    )
    acc.wait_for_everyone()
    if acc.is_main_process and world > 1:  # writes the manifest once every shard is done
        build_cache(data_cfg, vae, te, vision, progress=False)
    acc.wait_for_everyone()
    data = CachedData(data_cfg)
    segments = None
    if has_edits:
        from .omni_prompts import PromptStore, build_store, edit_texts

        store = out / "omni_prompts.safetensors"
        if acc.is_main_process:
            identity = {"text_encoder": m.text_encoder, "tokenizer": m.tokenizer, "seed": m.encoder_seed}
            build_store(store, te, edit_texts(data), data_cfg.max_text_tokens or None, identity)
        acc.wait_for_everyone()
        segments = PromptStore(store).segments()
    renderer = None
    if want_samples:
        from .samples import SampleRenderer

        max_len = data_cfg.max_text_tokens or None
        renderer = SampleRenderer(cfg.samples, te, vae, max_length=max_len)
        vae = None  # kept by the renderer
    del te, vae, vision
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return data, segments, renderer


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
