"""Access to the engine package, ``zimage_core``, from the node modules.

Inside ComfyUI this folder is imported as ``<pack>.nodes`` and the engine is the sibling package
``<pack>.zimage_core`` (relative import; nothing is added to ``sys.path``). In the test suite and for
people who ``pip install`` the project, ``nodes`` is a top-level package and ``zimage_core`` is imported
by its own name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_PARENT = (__package__ or "").rpartition(".")[0]


def core(submodule: str) -> ModuleType:
    """``zimage_core.<submodule>``, preferring the copy that ships beside this folder."""
    if _PARENT:
        try:
            return importlib.import_module(f"{_PARENT}.zimage_core.{submodule}")
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith(f"{_PARENT}.zimage_core"):
                raise
    return importlib.import_module(f"zimage_core.{submodule}")


errors = core("errors")
ZImageError = errors.ZImageError
