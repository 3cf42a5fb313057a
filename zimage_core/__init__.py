"""zimage_core: the Z-Image family (S3-DiT, Qwen3 text encoder, Flux VAE, samplers) in plain PyTorch.

Importing this package does no work and never imports ComfyUI. Public entry points live in the
submodules (``zimage_core.pipeline``, ``zimage_core.dit``, ``zimage_core.cli``...). The version is written once,
in ``pyproject.toml`` (where the Comfy Registry reads it); :func:`version` reads it back.
"""

from __future__ import annotations


def version() -> str:
    """The project's version: from ``pyproject.toml`` beside the package (a checkout, or the node pack inside
    ComfyUI), else from the installed distribution's metadata."""
    import re
    from importlib import metadata
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if m:
            return m.group(1)
    return metadata.version("zimage")
