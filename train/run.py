"""Run a training configuration.

    python -m train.run train/configs/synthetic_tiny.toml                     # one process (CPU or one GPU)
    python -m train.run CONFIG --resume                                      # continue from the latest checkpoint
    python -m train.run CONFIG max_steps=2000 optim.lr=5e-5                  # dotted key=value overrides (TOML values)
    accelerate launch --multi_gpu --num_processes 8 -m train.run CONFIG      # DDP
    accelerate launch --config_file fsdp2.yaml -m train.run CONFIG           # FSDP2 (see README: Training)

``--resume`` takes the newest checkpoint of the run's output folder, ``--resume PATH`` a given one.
``--stop-after N`` trains N more steps, saves a checkpoint and exits (for time-limited jobs); SIGINT/SIGTERM
do the same after the current step.
"""

from __future__ import annotations

import argparse
import logging
import sys

from zimage_core.errors import ZImageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.run", description="Train or fine-tune a Z-Image DiT.")
    p.add_argument("config", help="TOML file (see train/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. max_steps=100 optim.lr=1e-4")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the run's latest checkpoint, or from PATH",
    )
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="train at most N steps in this call")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def make_runner(cfg, resume=None, progress: bool = True):
    """The trainer a configuration asks for: :class:`train.rl.dmdr.DMDRTrainer` for ``[rl] method = "dmdr"``,
    :class:`train.distill.Distiller` with a ``[distill]`` section, :class:`train.rl.trainer.RLTrainer` with an
    ``[rl]`` section, else :class:`train.trainer.Trainer`."""
    if cfg.rl.get("method") == "dmdr":  # distillation with a reward: the distiller plus the RL rewards
        from .rl.dmdr import DMDRTrainer

        return DMDRTrainer(cfg, resume=resume, progress=progress)
    if cfg.distill.enabled:
        from .distill import Distiller

        return Distiller(cfg, resume=resume, progress=progress)
    if cfg.rl:  # RL post-training: DPO or GRPO on the same run infrastructure
        from .rl.trainer import RLTrainer

        return RLTrainer(cfg, resume=resume, progress=progress)
    from .trainer import Trainer

    return Trainer(cfg, resume=resume, progress=progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        result = make_runner(cfg, resume=args.resume, progress=not args.no_progress).train(stop_after=args.stop_after)
    except ZImageError as e:
        sys.stderr.write(f"train.run: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("train.run: interrupted\n")
        return 130
    logging.getLogger("train").info(
        "stopped at step %d; checkpoint %s%s",
        result.step,
        result.checkpoint,
        f"; exported {result.export}" if result.export else "",
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
