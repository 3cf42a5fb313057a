"""Checks of node inputs at the node's edge, shared by the nodes.

A value from an API prompt or another node's output skips the widget's min/max (and its type), so each node checks
its inputs here before any work, with :mod:`zimage_core.validate` underneath. :func:`node_errors` puts the node's
display name in front of every :class:`ZImageError` its function raises, so the one message a user sees says which
node, which input, what is wrong and what to do.
"""

from __future__ import annotations

import functools

import torch

from ..zimage_core import validate
from ..zimage_core.errors import Cancelled, ZImageError


def node_errors(node: str):
    """Decorate a node's FUNCTION: a :class:`ZImageError` it raises reads ``"<node>: <message>"`` (same class,
    same traceback; a cancelled run is left as it is)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Cancelled:
                raise
            except ZImageError as e:
                if e.args and isinstance(e.args[0], str) and not e.args[0].startswith(f"{node}: "):
                    e.args = (f"{node}: {e.args[0]}", *e.args[1:])
                raise

        run.node_name = node
        return run

    return wrap


def number(what: str, value, limits: dict) -> float:
    """A finite FLOAT widget value inside the widget's ``{"min": .., "max": ..}``."""
    return validate.finite_float(what, value, limits.get("min"), limits.get("max"))


def whole(what: str, value, limits: dict) -> int:
    """An INT widget value inside the widget's ``{"min": .., "max": ..}``."""
    return validate.int_in_range(what, value, limits.get("min"), limits.get("max"))


def boolean(what: str, value) -> bool:
    """A BOOLEAN widget value (True/False; a string such as 'false' would count as true, so it is refused)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ZImageError(f"{what} must be true or false, got {value!r}.")


def text(what: str, value) -> str:
    """A STRING input (empty is allowed: an empty negative prompt is a real choice)."""
    if not isinstance(value, str):
        raise ZImageError(f"{what} must be text, got {type(value).__name__}; connect a STRING or type it in.")
    return value


def image(what: str, value, source: str = "Load Image") -> torch.Tensor:
    """An IMAGE: a float tensor ``[batch >= 1, height >= 1, width >= 1, 3 or 4]`` with finite values."""
    if not torch.is_tensor(value):
        raise ZImageError(f"{what} is {type(value).__name__}, not an IMAGE; connect {source} to it.")
    if value.ndim != 4 or value.shape[-1] not in (3, 4) or min(value.shape[:3]) < 1:
        raise ZImageError(
            f"{what} has shape {tuple(value.shape)}, but an IMAGE is [batch, height, width, 3] with at least one "
            f"picture; connect {source} (or a node that returns an IMAGE) to it."
        )
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise ZImageError(f"{what} holds NaN/Inf or non-float values; check the node that made it.")
    return value


def mask(what: str, value, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A MASK ``[height, width]`` or ``[batch, height, width]`` of the size of IMAGE ``like`` (batch 1 or its)."""
    if not torch.is_tensor(value):
        raise ZImageError(f"{what} is {type(value).__name__}, not a MASK; connect Load Image's MASK or a mask node.")
    m = value[None] if value.ndim == 2 else value
    if m.ndim != 3 or min(m.shape) < 1:
        raise ZImageError(
            f"{what} has shape {tuple(value.shape)}, but a MASK is [height, width] or [batch, height, width]."
        )
    if tuple(m.shape[-2:]) != tuple(like.shape[1:3]):
        raise ZImageError(
            f"{what} is {m.shape[-1]}x{m.shape[-2]} pixels but {like_name} is {like.shape[2]}x{like.shape[1]}; "
            f"the mask must cover {like_name} pixel for pixel: resize one of them (e.g. Upscale Image / Resize Mask)."
        )
    if not m.is_floating_point() or not torch.isfinite(m).all():
        raise ZImageError(f"{what} holds NaN/Inf or non-float values; a MASK is 0..1 (1 = generate there).")
    return value


def same_batch(*named: tuple[str, int]) -> None:
    """Batch sizes that broadcast: each is 1 or the one other size."""
    sizes = {n for _, n in named if n != 1}
    if len(sizes) > 1:
        listed = ", ".join(f"{name} {n}" for name, n in named)
        raise ZImageError(f"batch sizes do not match ({listed}); give each the same batch, or a batch of 1.")


def vae(what: str, value) -> None:
    """A core VAE (something with ``encode``; core's class is ComfyUI's, so it is checked by what it can do)."""
    if value is None or isinstance(value, (str, bytes)) or not callable(getattr(value, "encode", None)):
        raise ZImageError(
            f"{what} is {type(value).__name__}, not a VAE; connect Load VAE with ae.safetensors (the Flux VAE) to it."
        )
