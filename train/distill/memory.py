"""The memory plan of a distillation run, counted from the architecture (no weights, no GPU needed).

    python -m train.distill.memory train/configs/distill_turbo.toml --gpus 8
    python -m train.distill.memory train/configs/distill_lora.toml --gpus 1

Parameters are counted on a DiT built on the meta device (so the 6B numbers come from the same code as the model),
LoRA adapters from the configured target patterns. Per GPU:

- **teacher**: frozen, bf16, replicated (the real score; a LoRA fake score and a LoRA student run on these same
  tensors, so there is one base in memory);
- **student**: ``full`` = float32 master weights + float32 gradients + AdamW's two float32 moments (8-bit AdamW: 2
  bytes), sharded over the GPUs by FSDP2 (``sharding = "fsdp2"``), plus the bf16 copies of the two blocks FSDP2 has
  gathered at a time; ``lora`` = the same 16 bytes per adapter parameter, replicated;
- **fake score**: LoRA adapters (16 bytes per parameter, replicated) or a full float32 copy (replicated: not sharded);
- **activations**: one gradient-carrying forward at batch ``b`` per GPU (the student's generator turn, or the fake
  score's turn): with gradient checkpointing each block keeps its input (``tokens x dim`` bf16) and one block is
  recomputed at a time; without it every block keeps its working set. No-grad forwards (teacher, simulation) hold
  one block's working set. Attention is assumed memory-efficient (SDPA flash/efficient kernels on GPUs);
- the text encoder is not loaded while training (captions come from the cache), the VAE only to draw samples.

Estimates, not measurements: allocator fragmentation, CUDA context (~0.5-1 GB) and communication buffers come on
top, hence the 10% headroom the verdict keeps.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT

GB = 1e9


def meta_dit(cfg: DiTConfig) -> ZImageDiT:
    with torch.device("meta"):
        return ZImageDiT(cfg)


def dit_parameters(cfg: DiTConfig) -> int:
    return sum(p.numel() for p in meta_dit(cfg).parameters())


def block_parameters(cfg: DiTConfig) -> int:
    return sum(p.numel() for p in meta_dit(cfg).layers[0].parameters())


def lora_parameters(cfg: DiTConfig, rank: int, targets: list[str]) -> int:
    """What :func:`train.lora_train.add_lora` adds: ``rank (in + out)`` per matched linear layer."""
    patterns = [re.compile(p) for p in targets]
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in meta_dit(cfg).named_modules()
        if isinstance(m, nn.Linear) and any(p.search(n) for p in patterns)
    )


def _ceil(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def activation_bytes(
    cfg: DiTConfig, batch: int, height: int, width: int, text_tokens: int, checkpointing: bool, grad: bool = True
) -> int:
    """Activation memory of one DiT forward (+ backward) at ``batch`` images of ``height x width`` pixels (bf16)."""
    img = _ceil((height // 16) * (width // 16), cfg.seq_multiple)
    txt = _ceil(text_tokens, cfg.seq_multiple)
    tokens = img + txt
    d, f = cfg.dim, cfg.ffn_dim
    # one block's working set: norms, qkv, attention output, the SwiGLU's two inputs and product, the residuals
    block = batch * tokens * (10 * d + 3 * f) * 2
    n_blocks = cfg.n_layers + 2 * cfg.n_refiner_layers
    if not grad:
        return block
    if checkpointing:
        return batch * tokens * d * 2 * n_blocks + block
    return block * n_blocks


@dataclass
class Plan:
    rows: list[tuple[str, float, str]] = field(default_factory=list)  # (component, GB per GPU, how)
    params: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: float, how: str) -> None:
        self.rows.append((name, nbytes / GB, how))

    @property
    def total_gb(self) -> float:
        return sum(r[1] for r in self.rows)

    def fits(self, gpu_gb: float, headroom: float = 0.9) -> bool:
        return self.total_gb <= gpu_gb * headroom

    def table(self) -> str:
        lines = [f"{'component':<34} {'GB/GPU':>8}  how"]
        lines += [f"{n:<34} {g:>8.2f}  {h}" for n, g, h in self.rows]
        lines.append(f"{'total':<34} {self.total_gb:>8.2f}")
        return "\n".join(lines)


def plan(
    cfg: DiTConfig,
    gpus: int,
    student: str = "full",
    fake: str = "lora",
    student_rank: int = 64,
    fake_rank: int = 32,
    targets: list[str] | None = None,
    optimizer: str = "adamw",
    batch: int = 1,
    height: int = 1024,
    width: int = 1024,
    text_tokens: int = 512,
    checkpointing: bool = True,
    sharded: bool = True,
) -> Plan:
    """The per-GPU memory of a distillation run (see the module docstring for what each row assumes)."""
    from train.config import DEFAULT_LORA_TARGETS

    targets = list(targets or DEFAULT_LORA_TARGETS)
    p = Plan()
    n = dit_parameters(cfg)
    p.params["dit"] = n
    p.add("teacher (frozen bf16, shared base)", 2 * n, "replicated")
    state = 4 + 4 + (2 if optimizer == "adamw8bit" else 8)  # fp32 weights + fp32 grads + AdamW moments
    if student == "full":
        shards = gpus if sharded else 1
        p.add(
            "student weights+grads+AdamW",
            state * n / shards,
            f"{state} B/param, " + (f"FSDP2 over {shards}" if shards > 1 else "unsharded"),
        )
        if sharded and gpus > 1:
            p.add("student gathered blocks (bf16)", 2 * 2 * block_parameters(cfg), "2 blocks in flight")
    else:
        ns = lora_parameters(cfg, student_rank, targets)
        p.params["student_lora"] = ns
        p.add(f"student LoRA r{student_rank}", 16 * ns, "fp32 + grads + AdamW, replicated")
    if fake == "lora":
        nf = lora_parameters(cfg, fake_rank, targets)
        p.params["fake_lora"] = nf
        p.add(f"fake-score LoRA r{fake_rank}", 16 * nf, "fp32 + grads + AdamW, replicated")
    else:
        p.add("fake score (full copy)", 16 * n, "fp32 + grads + AdamW, replicated")
    act = activation_bytes(cfg, batch, height, width, text_tokens, checkpointing)
    p.add("activations (one grad forward)", act, f"batch {batch}/GPU, {height}x{width}, ckpt={checkpointing}")
    p.add("no-grad forwards", activation_bytes(cfg, batch, height, width, text_tokens, checkpointing, False), "1 block")
    return p


def plan_for_config(config, gpus: int) -> Plan:
    """The plan of a training configuration (its [distill], [model], [optim], [data] and [samples] settings)."""
    from zimage_core.dit_layout import DiTCheckpoint

    from ..model import preset_config

    d, m = config.distill, config.model
    try:
        cfg = DiTCheckpoint(d.teacher).config
    except Exception:  # noqa: BLE001 - the teacher file is not here: the preset's architecture
        cfg = preset_config(m)
    res = int(config.data.get("resolution", 1024))
    tokens = (res // 16) ** 2
    batch = max(1, min(int(config.data.get("max_batch", 1)), int(config.data.get("token_budget", tokens)) // tokens))
    return plan(
        cfg,
        gpus,
        d.student,
        d.fake,
        d.student_lora_rank,
        d.fake_lora_rank,
        d.lora_targets,
        config.optim.optimizer,
        batch,
        res,
        res,
        int(config.data.get("max_text_tokens", 0) or 512),
        m.gradient_checkpointing,
        config.sharding == "fsdp2" or gpus > 1,
    )


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config

    ap = argparse.ArgumentParser(prog="python -m train.distill.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args = ap.parse_args(argv)
    p = plan_for_config(load_config(args.config), args.gpus)
    print(p.table())
    print(f"fits a {args.gpu_gb:g} GB GPU (10% headroom): {'yes' if p.fits(args.gpu_gb) else 'no'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
