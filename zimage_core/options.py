"""One generation request (:class:`GenerateOptions`): its fields, defaults and the checks it makes of itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import PIXEL_MULTIPLE
from .controls import ControlSpec, check_controls
from .errors import ZImageError
from .sampling import get_sampler


@dataclass
class GenerateOptions:
    """One generation request; defaults are Z-Image-Turbo's (8 steps, shift 3, no CFG)."""

    prompt: str | list[str]
    negative: str | list[str] | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 8
    cfg: float = 1.0
    shift: float = 3.0
    sampler: str = "euler"
    seed: int = 0
    batch: int = 1
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_length: int | None = 512
    denoise: float = 1.0
    loras: list[tuple[str, float]] = field(default_factory=list)
    #: ControlNets (:class:`~zimage_core.controls.ControlSpec`); several sum their hints.
    controls: list[ControlSpec] = field(default_factory=list)

    def validate(self) -> None:
        """Check every field (types, ranges, finiteness) and normalise whole-number floats to ints; one
        :class:`ZImageError` naming the field otherwise."""
        from . import validate as v

        for name in ("prompt", "negative"):
            value = getattr(self, name)
            if value is None and name == "negative":
                continue
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                raise ZImageError(f"{name} must be a string or a non-empty list of strings, got {value!r}.")
        for name in ("width", "height"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < PIXEL_MULTIPLE or val % PIXEL_MULTIPLE:
                try_ = (
                    max(PIXEL_MULTIPLE, round(val / PIXEL_MULTIPLE) * PIXEL_MULTIPLE) if isinstance(val, int) else 1024
                )
                raise ZImageError(
                    f"{name} {val} is not a positive multiple of {PIXEL_MULTIPLE} (VAE x8 times patch 2); try {try_}."
                )
        self.steps = v.int_in_range("steps", self.steps, 1, 10_000)
        self.batch = v.int_in_range("batch", self.batch, 1, 4096)
        self.seed = v.seed(self.seed)
        cfg = v.finite_float("cfg", self.cfg)
        if cfg < 1.0:
            raise ZImageError(f"cfg {self.cfg} is below 1 (ComfyUI convention: 1 = off, 4 = Base default).")
        v.finite_float("shift", self.shift, 0.0, lo_open=True)
        v.finite_float("cfg_normalization", self.cfg_normalization, 0.0)
        v.finite_float("cfg_truncation", self.cfg_truncation, 0.0)
        if self.max_length is not None:
            self.max_length = v.int_in_range("max_length (prompt tokens; None = no limit)", self.max_length, 1)
        if (
            not isinstance(self.denoise, (int, float))
            or isinstance(self.denoise, bool)
            or not 0.0 < self.denoise <= 1.0
        ):
            raise ZImageError(f"denoise must be in (0, 1], got {self.denoise}.")
        for item in self.loras:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ZImageError(f"loras must hold (file, strength) pairs, got {item!r}.")
            v.finite_float(f"the strength of LoRA '{item[0]}'", item[1])
        if not isinstance(self.sampler, str):
            raise ZImageError(f"sampler must be a name, got {self.sampler!r}.")
        get_sampler(self.sampler)
        check_controls(self.controls)

    def prompts(self) -> list[str]:
        p = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return [x for x in p for _ in range(self.batch)]

    def negatives(self) -> list[str]:
        n = self.negative if self.negative is not None else ""
        n = [n] if isinstance(n, str) else list(n)
        base = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if len(n) == 1:
            n = n * len(base)
        if len(n) != len(base):
            raise ZImageError(f"{len(n)} negative prompts for {len(base)} prompts; give one, or one per prompt.")
        return [x for x in n for _ in range(self.batch)]
