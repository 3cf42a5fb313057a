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
import re
import sys

from zimage_core.commandline import Parser, add_debug_flag, run_command

PROG = "python -m train.run"
#: A dotted ``key=value`` override: taken out of the arguments wherever it stands (``--resume max_steps=6`` is an
#: override after a flag, not a checkpoint path).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Train or fine-tune a Z-Image DiT.")
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
    p.add_argument("--stop-after", type=_positive, default=None, metavar="N", help="train at most N steps in this call")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    add_debug_flag(p)
    return p


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with every ``key=value`` override collected wherever it stands (before or after flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}; overrides look like key=value, e.g. max_steps=10")
    args.overrides = [*args.overrides, *overrides]
    return args


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
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def body() -> int:
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        result = make_runner(cfg, resume=args.resume, progress=not args.no_progress).train(stop_after=args.stop_after)
        logging.getLogger("train").info(
            "stopped at step %d; checkpoint %s%s",
            result.step,
            result.checkpoint,
            f"; exported {result.export}" if result.export else "",
        )
        return 0

    return run_command("train.run", body, debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
