"""Model files and folders the loaders offer, from ComfyUI's model folders.

Inside ComfyUI the roots are ``folder_paths.get_folder_paths(kind)`` (so ``extra_model_paths.yaml``
applies) and files come from ``folder_paths.get_filename_list``. Outside ComfyUI (tests, scripts) the
roots are ``$ZIMAGE_MODELS_DIR/<kind>`` (default ``./models/<kind>``).

Besides single files, the loaders accept the diffusers folders the engine reads: a model root with a
``transformer/`` or ``text_encoder/`` folder, or such a folder itself. Those folders are listed by their
path relative to the model root, and the shard files inside them are hidden from the list.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..zimage_core.errors import ZImageError
from . import host

WEIGHT_EXTENSIONS = (".safetensors", ".sft")
# GGUF files (city96-style quantized DiTs) are ours to list: ComfyUI's own list filters them out.
EXTRA_EXTENSIONS = {"diffusion_models": (".gguf",)}
# Where users are told to put each kind, and the ComfyUI key it lives under.
KIND_HELP = {
    "diffusion_models": "ComfyUI/models/diffusion_models (e.g. z_image_turbo_bf16.safetensors)",
    "text_encoders": "ComfyUI/models/text_encoders (e.g. qwen_3_4b.safetensors)",
    "loras": "ComfyUI/models/loras",
    "vae": "ComfyUI/models/vae (e.g. ae.safetensors)",
    "controlnet": "ComfyUI/models/controlnet (e.g. Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors)",
    "model_patches": "ComfyUI/models/model_patches (where native ComfyUI keeps the Z-Image Fun ControlNets)",
}
LEGACY = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}
# A folder is offered for a kind when it holds one of these sub-folders, or is itself such a folder.
FOLDER_MARKERS = {"diffusion_models": "transformer", "text_encoders": "text_encoder"}
_MAX_DEPTH = 3


def ensure_folder(kind: str) -> None:
    """Register ``models/<kind>`` with ComfyUI's folder_paths when this ComfyUI does not know the kind yet
    (``model_patches`` is newer than some ComfyUI versions); no-op outside ComfyUI."""
    fp = host.comfy_module("folder_paths")
    if fp is None or kind in fp.folder_names_and_paths:
        return
    fp.add_model_folder_path(kind, os.path.join(fp.models_dir, kind))


def roots(kind: str) -> list[Path]:
    fp = host.comfy_module("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(kind)]
        except Exception:  # noqa: BLE001 - unknown key in an old ComfyUI
            return []
    base = Path(os.environ.get("ZIMAGE_MODELS_DIR", "models"))
    return [base / k for k in (kind, *LEGACY.get(kind, ())) if (base / k).is_dir()]


def _is_weight_folder(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def model_folders(kind: str) -> dict[str, Path]:
    """``{name relative to its root: folder}`` of diffusers-layout folders for ``kind``."""
    marker = FOLDER_MARKERS.get(kind)
    if marker is None:
        return {}
    found: dict[str, Path] = {}
    for root in roots(kind):
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            d = Path(dirpath)
            depth = len(d.relative_to(root).parts)
            if depth >= _MAX_DEPTH:
                dirnames[:] = []
            if d == root:
                continue
            if ((d / marker).is_dir() and _is_weight_folder(d / marker)) or _is_weight_folder(d):
                found.setdefault(d.relative_to(root).as_posix(), d)
                dirnames[:] = []  # its insides are one model
    return found


def _scan(kind: str, extensions: tuple[str, ...]) -> list[str]:
    out = []
    for root in roots(kind):
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in extensions:
                out.append(p.relative_to(root).as_posix())
    return out


def _files(kind: str) -> list[str]:
    extra = EXTRA_EXTENSIONS.get(kind, ())
    fp = host.comfy_module("folder_paths")
    if fp is not None:
        try:
            names = fp.get_filename_list(kind)
        except Exception:  # noqa: BLE001
            names = []
        return [n for n in names if n.lower().endswith(WEIGHT_EXTENSIONS)] + (_scan(kind, extra) if extra else [])
    return _scan(kind, WEIGHT_EXTENSIONS + extra)


def list_models(kind: str) -> list[str]:
    """The names a loader's drop-down shows: model folders, then files not inside those folders."""
    folders = model_folders(kind)
    files = [f for f in _files(kind) if not any(f.replace("\\", "/").startswith(d + "/") for d in folders)]
    return sorted(folders) + sorted(dict.fromkeys(files))


def resolve(kind: str, name: str) -> Path:
    """The path behind a drop-down ``name``; a missing one raises a ZImageError saying where to put it."""
    if not isinstance(name, str) or not name:
        raise ZImageError(f"no {kind} file selected. Put one in {KIND_HELP.get(kind, kind)} and press 'r' to refresh.")
    folders = model_folders(kind)
    if name in folders:
        return folders[name]
    fp = host.comfy_module("folder_paths")
    if fp is not None and not name.lower().endswith(EXTRA_EXTENSIONS.get(kind, ())):
        full = fp.get_full_path(kind, name)
        if full:
            return Path(full)
    else:
        for root in roots(kind):
            cand = (root / name).resolve()
            if cand.is_relative_to(root.resolve()) and cand.exists():
                return cand
    raise ZImageError(
        f"{kind}: '{name}' was not found. Put it in {KIND_HELP.get(kind, kind)} (or a folder listed for "
        f"'{kind}' in extra_model_paths.yaml), then refresh the page (press 'r')."
    )
