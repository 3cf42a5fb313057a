"""The node pack is loaded here the way ComfyUI loads a custom node: the repository root imported as a package
from its ``__init__.py`` (ComfyUI names it after its folder; the tests call it ``zimage_pack``). Inside it the
nodes reach the engine with relative imports (``from ..zimage_core import ...``), exactly as in
``ComfyUI/custom_nodes/``. Node tests therefore import ``zimage_pack.nodes`` and, for engine types that cross
into the nodes (errors, conditioning objects), ``zimage_pack.zimage_core``; engine-only tests import
``zimage_core`` itself.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "zimage_pack"

if PACK not in sys.modules:
    _spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    _pack = importlib.util.module_from_spec(_spec)
    sys.modules[PACK] = _pack
    _spec.loader.exec_module(_pack)
