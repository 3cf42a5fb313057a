"""Regional ``torch.compile``: each repeated transformer block's forward is compiled, not the whole model.

One compiled function serves every block of a kind (the block is an argument, its weights are inputs), so
compilation happens once, not once per block, and with ``dynamic=True`` a new resolution or caption length
reuses the graph instead of recompiling. Only ``forward`` is compiled: module hooks (block streaming) stay
eager around it. Off by default; the first generation pays for compilation.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch
from torch import nn

from .errors import ZImageError
from .layers import TransformerBlock

log = logging.getLogger(__name__)
_MARK = "_zimage_compiled"


def compile_blocks(
    model: nn.Module,
    *,
    dynamic: bool | None = True,
    mode: str | None = None,
    backend: str = "inductor",
    compiler: Callable | None = None,
    block_type: type[nn.Module] = TransformerBlock,
) -> int:
    """Compile the forward of every ``block_type`` in ``model``; returns how many blocks now use it.

    ``compiler`` defaults to :func:`torch.compile` (tests pass a stand-in). Calling it again is a no-op.
    """
    compiler = compiler or torch.compile
    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    if not blocks:
        return 0
    try:
        kw = {"mode": mode} if mode is not None else {}
        fn = compiler(block_type.forward, dynamic=dynamic, backend=backend, **kw)
    except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor, or an unsupported Python
        raise ZImageError(f"torch.compile is not usable here ({type(e).__name__}: {e}); run without --compile.") from e
    n = 0
    for block in blocks:
        if getattr(block, _MARK, False):
            continue
        block.forward = types.MethodType(fn, block)
        setattr(block, _MARK, True)
        n += 1
    log.info("compiled %d %s forwards (dynamic=%s, mode=%s)", n, block_type.__name__, dynamic, mode)
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if getattr(m, _MARK, False):
            del m.forward
            delattr(m, _MARK)
            n += 1
    return n
