"""Export a training checkpoint as files zimage, our ComfyUI nodes and native ComfyUI load.

    python -m train.export runs/my_run --out my_model.safetensors [--ema] [--layout comfyui] [--dtype bf16]

- a full (fine-)tune becomes a DiT file written by :func:`zimage_core.checkpoints.save_dit`: by default the
  ComfyUI single-file layout (``ComfyUI/models/diffusion_models/``; ``zimage generate --transformer FILE``);
  ``--layout diffusers`` writes a ``transformer/`` folder, ``--layout zimage`` adds the config to the metadata;
- a LoRA run becomes a LoRA file in ComfyUI's native layout (``diffusion_model.<module>.lora_down/lora_up/alpha``,
  ``ComfyUI/models/loras/``; ``zimage generate --lora FILE``).

``CKPT`` is a ``step-*`` checkpoint folder, or a run folder (its newest checkpoint is taken). ``--ema`` exports
the EMA weights (an error when the run kept none). Without ``--out`` the file goes to ``<run>/export/``.
A run exports itself this way when it reaches ``max_steps`` (``[export]`` section).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from zimage_core.checkpoints import save_dit
from zimage_core.commandline import Parser, add_debug_flag, run_command
from zimage_core.config import DiTConfig
from zimage_core.dtypes import resolve_dtype
from zimage_core.errors import ZImageError
from zimage_core.validate import writable_path

from . import checkpoint as ck
from .lora_train import save_trained_lora

log = logging.getLogger(__name__)


def dit_config_from_meta(meta: dict) -> DiTConfig:
    d = dict(meta["dit_config"])
    for k in ("axes_dims", "axes_lens"):
        d[k] = tuple(d[k])
    return DiTConfig(**d)


def _weights(folder: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint: the EMA (required to exist) or the raw weights."""
    if ema and not (folder / "ema.safetensors").is_file():
        raise ZImageError(f"checkpoint '{folder}' has no EMA weights (the run had ema.enabled = false); drop --ema.")
    return ck.read_tensors(folder, "ema.safetensors" if ema else "trainable.safetensors")


def default_name(folder: Path, meta: dict, layout: str) -> str:
    run = meta.get("config", {}).get("name", "model")
    stem = f"{run}_step{int(meta['step'])}"
    if meta.get("kind") == "lora":
        return stem + "_lora.safetensors"
    return stem if layout == "diffusers" else stem + ".safetensors"


def export_checkpoint(
    ckpt: str | Path, out: str | Path, ema: bool = False, layout: str = "comfyui", dtype: str = "bf16"
) -> Path:
    """Write the model (or LoRA) of checkpoint ``ckpt`` (raw or ``ema`` weights) to ``out``; when ``out`` is an
    existing folder the file gets a default name inside it (``<run>_step<N>[_lora].safetensors``)."""
    folder = ck.resolve_checkpoint(ckpt)
    meta = ck.read_meta(folder)
    if str(meta.get("kind", "")).startswith("distill"):  # the student as a DiT file and as a LoRA over the teacher
        from .distill.export import export_distilled

        target = Path(out) if Path(out).is_dir() or not Path(out).suffix else Path(out).parent
        d = meta.get("distill", {})
        return export_distilled(folder, target, ema, dtype, int(d.get("lora_rank", 32)), layout == "diffusers")[
            "student"
        ]
    out = Path(out)
    if out.is_dir() and not (out / "config.json").is_file():
        out = out / default_name(folder, meta, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    state, used_ema = _weights(folder, ema), bool(ema)
    info = {"zimage_train_step": str(meta["step"]), "zimage_train_ema": str(used_ema).lower()}
    if meta.get("kind") == "lora":
        alpha = float(meta["lora"]["alpha"])
        path = save_trained_lora(state, alpha, out, metadata=info)
        log.info("exported the LoRA of step %s (%s) to %s", meta["step"], "EMA" if used_ema else "raw", path)
        return path
    cfg = dit_config_from_meta(meta)
    target = resolve_dtype(dtype, "cpu")
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
    path = save_dit(state, cfg, out, layout)
    log.info(
        "exported the DiT of step %s (%s, %s layout, %s) to %s",
        meta["step"],
        "EMA" if used_ema else "raw",
        layout,
        dtype,
        path,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a step-* checkpoint folder, or a run folder (newest checkpoint)")
    p.add_argument("--out", help="output file (or folder); default <run>/export/")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--layout", default="comfyui", choices=["comfyui", "diffusers", "zimage"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        folder = ck.resolve_checkpoint(args.ckpt)
        if args.out:  # checked before anything is read: a folder, or a file whose folder can be made
            writable_path(args.out, "--out", folder_ok=True)
        out = Path(args.out) if args.out else folder.parent.parent / "export"
        if not args.out:
            out.mkdir(parents=True, exist_ok=True)
        path = export_checkpoint(folder, out, ema=args.ema, layout=args.layout, dtype=args.dtype)
        sys.stdout.write(f"{path}\n")
        return 0

    return run_command("train.export", body, debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
