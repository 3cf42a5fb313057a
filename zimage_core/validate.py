"""Small checks of user input, shared by the command lines, the library's options and the nodes.

Each raises one :class:`~zimage_core.errors.ZImageError` that names the input (``what``), the bad value and what
would be accepted, before any work starts.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path

import torch

from .errors import ZImageError

log = logging.getLogger(__name__)

#: Image formats an output path may name (Pillow writes them; PNG keeps the parameters as text chunks).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SEED_MAX = 2**64 - 1
GiB = 2**30


def finite_float(what: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """A finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ZImageError(f"{what} must be a number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v):
        raise ZImageError(f"{what} must be a finite number, got {value!r}.")
    low_bad = lo is not None and (v <= lo if lo_open else v < lo)
    if low_bad or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ZImageError(f"{what} must be in {left}{lo_s}, {hi_s}{']' if hi is not None else ')'}, got {value!r}.")
    return v


def int_in_range(what: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number (an int, or a float with no fractional part) in ``[lo, hi]``."""
    if isinstance(value, bool):
        raise ZImageError(f"{what} must be a whole number, got {value!r}.")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise ZImageError(f"{what} must be a whole number, got {value!r}.")
        value = int(value)
    if not isinstance(value, numbers.Integral):
        raise ZImageError(f"{what} must be a whole number, got {value!r}.")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}" if lo is not None else f"at most {hi}"
        raise ZImageError(f"{what} must be {rng}, got {v}.")
    return v


def seed(value, what: str = "seed") -> int:
    return int_in_range(what, value, 0, SEED_MAX)


def device(value, what: str = "--device") -> torch.device:
    """``auto`` or a torch device name that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ZImageError(f"{what} '{value}' is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ZImageError(f"{what} '{value}': PyTorch sees no CUDA GPU; use --device cpu or auto.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ZImageError(
                f"{what} '{value}': there are {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..."
                f"cuda:{torch.cuda.device_count() - 1})."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ZImageError(f"{what} '{value}': the Apple MPS device is not available here; use cpu.")
    elif dev.type != "cpu":
        raise ZImageError(f"{what} '{value}': {dev.type} devices are not supported; use auto, cpu, cuda or mps.")
    return dev


def readable_file(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ZImageError(f"{what} '{p}' does not exist.")
    if p.is_dir():
        raise ZImageError(f"{what} '{p}' is a folder; give a file.")
    if not os.access(p, os.R_OK):
        raise ZImageError(f"{what} '{p}' is not readable (permissions).")
    return p


def readable_image(path, what: str):
    """Open and fully decode an image (a truncated or corrupt file is refused here, not halfway through a run)."""
    from PIL import Image, UnidentifiedImageError

    p = readable_file(path, what)
    try:
        with Image.open(p) as probe:
            probe.verify()
        img = Image.open(p)
        img.load()
    except UnidentifiedImageError:
        raise ZImageError(f"{what} '{p}' is not an image PIL can read.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ZImageError(f"{what} '{p}' is damaged or truncated ({e}); re-export or replace it.") from None
    if img.width < 1 or img.height < 1:
        raise ZImageError(f"{what} '{p}' is empty ({img.width}x{img.height}).")
    return img


def writable_path(path, what: str, suffixes: tuple[str, ...] | None = None, folder_ok: bool = False) -> Path:
    """A path a file (or with ``folder_ok`` a folder) can be written to: a known suffix, not an existing folder,
    and a parent that is a writable folder or can be made (no file on the way)."""
    p = Path(path).expanduser()
    if str(path) == "" or p.name in ("", ".", ".."):
        raise ZImageError(f"{what} '{path}' names no file.")
    if p.is_dir() and not folder_ok:
        raise ZImageError(
            f"{what} '{path}' is an existing folder; give a file name (e.g. {p / ('out' + (suffixes or ('.png',))[0])})."
        )
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise ZImageError(
            f"{what} '{path}' has the extension '{p.suffix or '(none)'}'; use one of {', '.join(suffixes)}."
        )
    if p.exists() and not p.is_dir() and not os.access(p, os.W_OK):
        raise ZImageError(f"{what} '{path}' exists and is not writable.")
    parent = p.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ZImageError(f"{what} '{path}': '{parent}' is a file, so the folder for it cannot be made.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZImageError(f"{what} '{path}': the folder '{parent}' is not writable.")
    return p


# ---- resources ----------------------------------------------------------------------------------------------
def host_available_bytes() -> int | None:
    """Memory the OS can still give this process (Linux MemAvailable; None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def request_bytes(dit_cfg, width: int, height: int, batch: int, cfg: bool, text_tokens: int, elt: int) -> dict:
    """The memory one generation needs besides the weights, by part: the DiT's working set over its latent
    tokens (hidden states, qkv and attention output, the SwiGLU hidden) and the decoded images."""
    from .memory.planner import Workload, dit_activation

    work = Workload(width, height, batch, cfg, text_tokens)
    return {
        "latent tokens": (height // 16) * (width // 16),
        "DiT activations": dit_activation(dit_cfg, work, elt),
        "decoded images": batch * width * height * (3 * 4 + 3) + batch * 16 * (height // 8) * (width // 8) * 4 * 3,
    }


def check_request_memory(
    dit_cfg,
    width: int,
    height: int,
    batch: int,
    cfg: bool,
    text_tokens: int,
    dev: torch.device,
    elt: int,
    extra: int = 0,
) -> None:
    """Refuse a size/batch whose working memory cannot fit the device, with both numbers in the message."""
    parts = request_bytes(dit_cfg, width, height, batch, cfg, text_tokens, elt)
    need = parts["DiT activations"] + parts["decoded images"]
    if dev.type == "cuda" and torch.cuda.is_available():
        from .memory.components import device_free_bytes

        have, where = device_free_bytes(dev, extra), f"free on {dev}"
    else:
        avail = host_available_bytes()
        have, where = (None if avail is None else avail + extra), "available in host memory"
    if have is None or need <= have:
        return
    raise ZImageError(
        f"{width}x{height} with batch {batch}{' and CFG' if cfg else ''} needs about {need / GiB:.1f} GiB of working "
        f"memory ({parts['latent tokens']} latent tokens per image: {parts['DiT activations'] / GiB:.1f} GiB for the "
        f"DiT, {parts['decoded images'] / GiB:.1f} GiB for the images), but only {have / GiB:.1f} GiB is {where}; "
        "use a smaller size or batch."
    )


def start_latents(init: torch.Tensor | None, mask: torch.Tensor | None, shape: tuple) -> None:
    """img2img start latents ``[1 or B, C, h, w]`` and an inpainting mask ``[1 or B, 1, h, w]`` that fit ``shape``."""
    b, c, h, w = shape
    if mask is not None and init is None:
        raise ZImageError("a mask needs init_latents (the encoded picture to inpaint).")
    if init is None:
        return
    if (
        not isinstance(init, torch.Tensor)
        or init.ndim != 4
        or init.shape[0] not in (1, b)
        or init.shape[1:] != (c, h, w)
    ):
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ZImageError(
            f"init_latents must be [1 or {b}, {c}, {h}, {w}] (the VAE-encoded start image at this size), got {got}."
        )
    if not torch.isfinite(init).all():
        raise ZImageError("init_latents hold NaN/Inf values.")
    if mask is not None:
        if (
            not isinstance(mask, torch.Tensor)
            or mask.ndim != 4
            or mask.shape[0] not in (1, b)
            or mask.shape[1:] != (1, h, w)
        ):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ZImageError(f"mask must be [1 or {b}, 1, {h}, {w}] (see sampling.prepare_mask), got {got}.")


def warn_untrained_positions(cfg, tokens: int, h: int, w: int) -> None:
    """Warn when a prompt or image reaches RoPE positions the model was not trained with (they still work)."""
    p = cfg.patch_size
    for axis, top, what in (
        (0, tokens + 32, "prompt tokens"),
        (1, h // p, "latent rows"),
        (2, w // p, "latent columns"),
    ):
        if top >= cfg.axes_lens[axis]:
            log.warning(
                "%d %s reach beyond the %d positions the model was trained with; expect weaker results "
                "(shorten the prompt with --max-length, or use a smaller size).",
                top,
                what,
                cfg.axes_lens[axis],
            )
