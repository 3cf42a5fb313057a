"""Z-Image Fun ControlNet files (alibaba-pai "Controlnet-Union" family): key tables and detection from the tensors.

Every published file holds only the control branch of VideoX-Fun's ``ZImageControlTransformer2DModel``
(diffusers-style names, split ``to_q/to_k/to_v``); ComfyUI's converter and re-packs fuse q/k/v and use the
Lumina names. Both are read here; optional ``model.diffusion_model.`` / ``diffusion_model.`` prefixes are dropped. diffusers
folders (``config.json`` + weights, e.g. hlky/Z-Image-Turbo-Fun-Controlnet-Union*) are read too; diffusers writes
2.0 without its unused control noise refiner, and its ``control_layers_places`` are used when given.

=========================  ===========  ========  ==========================================  =====================
file                        control      input     control noise refiner                       ``refiner`` mode
=========================  ===========  ========  ==========================================  =====================
Union (1.0)                 6 layers     16 ch     2 plain blocks (no ``before/after_proj``)   ``plain``
Union-2.0                   15 layers    33 ch     2 control blocks, projections all zero      ``control_layers``
Union-2.1, -2.1-8steps,     15 layers    33 ch     2 control blocks (trained)                  ``control``
Tile-2.1, Base Union-2.1
2.1 lite (Union, Tile)      3 layers     33 ch     2 control blocks (trained)                  ``control``
=========================  ===========  ========  ==========================================  =====================

2.0 and 2.1 have the same keys; 2.0 is told apart by its all-zero control noise-refiner projections (that
stage was never trained: VideoX-Fun's ``add_control_noise_refiner_correctly = False`` ran the control layers
there instead, so that is how a 2.0 file runs here, with a warning).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .config import ControlNetConfig, DiTConfig
from .dit_layout import NATIVE_PREFIXES, describe_wrong_file, native_view
from .errors import CheckpointError
from .weights import WeightSource, resolve_weight_files

log = logging.getLogger(__name__)

WHAT = "a Z-Image Fun ControlNet (alibaba-pai Z-Image-Turbo-Fun-Controlnet-Union / -Tile / Z-Image-Fun-Controlnet)"

# (file fragment, native fragment), applied with str.replace in this order.
FILE_TO_NATIVE: tuple[tuple[str, str], ...] = (
    ("control_all_x_embedder.2-1.", "control_x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
EMBEDDER = "control_x_embedder.weight"
GROUPS = ("control_layers", "control_noise_refiner")
# Parameters of one block, native names; ``before_proj`` only on the first block of a control group.
BLOCK_PARAMS = (
    "attention.qkv.weight",
    "attention.out.weight",
    "attention.q_norm.weight",
    "attention.k_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm1.weight",
    "attention_norm2.weight",
    "ffn_norm1.weight",
    "ffn_norm2.weight",
    "adaLN_modulation.0.weight",
    "adaLN_modulation.0.bias",
)
PROJ_PARAMS = ("before_proj.weight", "before_proj.bias", "after_proj.weight", "after_proj.bias")
_KEY = re.compile(r"(control_layers|control_noise_refiner)\.(\d+)\.(.+)")

# (name, control layers, input channels, refiner mode) of the published files, for messages and logs.
KNOWN_VARIANTS: tuple[tuple[str, int, int, str], ...] = (
    ("Union 1.0", 6, 16, "plain"),
    ("Union 2.0", 15, 33, "control_layers"),
    ("Union/Tile 2.1", 15, 33, "control"),
    ("Union/Tile 2.1 lite", 3, 33, "control"),
)


def variant_name(n_control: int, in_channels: int, refiner: str) -> str:
    for name, n, c, r in KNOWN_VARIANTS:
        if (n, c, r) == (n_control, in_channels, refiner):
            return name
    return f"custom ({n_control} control layers, {in_channels}-channel input, {refiner} refiner)"


def to_native_key(key: str) -> str:
    for p in NATIVE_PREFIXES:
        if key.startswith(p):
            key = key[len(p) :]
            break
    for a, b in FILE_TO_NATIVE:
        key = key.replace(a, b)
    return key


def _not_a_controlnet(keys: list[str]) -> str:
    native = {to_native_key(k) for k in keys}
    if "cap_embedder.1.weight" in native or "x_embedder.weight" in native:
        found = "a Z-Image diffusion model (DiT), not its ControlNet"
    elif any(
        k.startswith(("controlnet_cond_embedding.", "controlnet_blocks.", "controlnet_x_embedder.")) for k in keys
    ):
        found = "a ControlNet for another model family (SD/SDXL/Flux/Qwen-Image)"
    else:
        return describe_wrong_file(keys, WHAT) + " Use one of the alibaba-pai Z-Image Fun ControlNet files."
    return f"expected {WHAT}, but the file holds {found}. Use one of the alibaba-pai Z-Image Fun ControlNet files."


def _count(shapes: Mapping[str, tuple[int, ...]], group: str) -> int:
    idx = {int(m.group(2)) for k in shapes if (m := _KEY.fullmatch(k)) and m.group(1) == group}
    if idx and idx != set(range(max(idx) + 1)):
        raise CheckpointError(f"ControlNet: {group} {sorted(set(range(max(idx) + 1)) - idx)} are missing.")
    return max(idx) + 1 if idx else 0


def _is_zero(t: torch.Tensor) -> bool:
    return not torch.count_nonzero(t.to(torch.float32)).item()


def open_controlnet(path: str | os.PathLike) -> WeightSource:
    """The tensors of a ControlNet file or folder (its header only), refused with what the file holds when it is
    not a Z-Image Fun ControlNet; needs no DiT, so a loader can check the file before it knows the model."""
    path = Path(path)
    src = WeightSource(resolve_weight_files(path, "ControlNet"), "ControlNet")
    if not any(to_native_key(k) == EMBEDDER for k in src):
        raise CheckpointError(f"ControlNet '{path}': " + _not_a_controlnet(list(src)))
    return src


class ControlNetCheckpoint:
    """A ControlNet file seen through the native layout: ``getters`` yields each native tensor lazily.

    ``base`` is the DiT the ControlNet will drive (its layer count places the hints; default Z-Image's).
    """

    def __init__(self, path: str | os.PathLike, base: DiTConfig | None = None):
        self.path = Path(path)
        self.source = open_controlnet(self.path)
        self.base = base or DiTConfig()
        self.getters: dict[str, Callable[[], torch.Tensor]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fused_from: dict[str, list[str]] = {}  # native qkv -> stored to_q/to_k/to_v keys
        self.declared: dict = {}  # a diffusers folder's config.json (hlky/Z-Image-Turbo-Fun-Controlnet-Union*)
        if self.path.is_dir() and (self.path / "config.json").is_file():
            try:
                self.declared = json.loads((self.path / "config.json").read_text())
            except ValueError as e:
                raise CheckpointError(f"ControlNet: '{self.path / 'config.json'}' is not valid JSON ({e}).") from e
        self.why_2_0 = ""
        self._index()
        self.layout = "diffusers" if self.fused_from else "comfyui"
        self.config = self._infer_config()
        self.variant = variant_name(self.config.n_control_layers, self.config.in_channels, self.config.refiner)
        if self.config.refiner == "control_layers":
            # 2.0: its control noise-refiner is not part of the model that runs
            for k in [k for k in self.getters if k.startswith("control_noise_refiner.")]:
                del self.getters[k], self.shapes[k]
            log.warning(
                "ControlNet '%s' is a Union 2.0 file: %s, so it runs as 2.0 was trained, with the control layers "
                "also driving the noise refiner (about twice the control cost per step). The 2.1 files fix this: "
                "prefer Z-Image-Turbo-Fun-Controlnet-Union-2.1.",
                self.path.name,
                self.why_2_0,
            )

    def _index(self) -> None:
        src = self.source
        unknown = []
        for k, (get, shape, parts) in native_view(src, to_native_key, "ControlNet").items():
            self.getters[k] = get
            self.shapes[k] = shape
            if len(parts) > 1:
                self.fused_from[k] = parts
            m = _KEY.fullmatch(k)
            if not (k in (EMBEDDER, "control_x_embedder.bias") or m and m.group(3) in BLOCK_PARAMS + PROJ_PARAMS):
                unknown.append(parts[0])
        if unknown:
            raise CheckpointError(
                f"ControlNet '{self.path}': tensors {unknown[:6]}{' ...' if len(unknown) > 6 else ''} are not part "
                f"of {WHAT}. The file is another model, or a full VideoX-Fun transformer save; use the published "
                "ControlNet file."
            )

    def _infer_config(self) -> ControlNetConfig:
        s, base = self.shapes, self.base
        try:
            dim, patch_dim = s[EMBEDDER]
            head_dim = s["control_layers.0.attention.q_norm.weight"][0]
            ffn_dim = s["control_layers.0.feed_forward.w1.weight"][0]
            adaln_dim = s["control_layers.0.adaLN_modulation.0.weight"][1]
        except KeyError as e:
            raise CheckpointError(f"ControlNet '{self.path}' lacks tensor {e}; the file is truncated.") from e
        p = base.patch_size
        in_channels = patch_dim // (p * p)
        if patch_dim % (p * p) or in_channels not in (16, 33):
            raise CheckpointError(
                f"ControlNet '{self.path}': its input embedder takes {patch_dim} values per patch, which is neither "
                f"16 nor 33 latent channels; it is not a Z-Image Fun ControlNet."
            )
        found = dict(dim=dim, n_heads=dim // head_dim, ffn_dim=ffn_dim, adaln_dim=adaln_dim)
        want = dict(dim=base.dim, n_heads=base.n_heads, ffn_dim=base.ffn_dim, adaln_dim=base.adaln_dim)
        if found != want:
            diff = ", ".join(f"{k} {found[k]} (DiT: {want[k]})" for k in found if found[k] != want[k])
            raise CheckpointError(
                f"ControlNet '{self.path}' does not fit this diffusion model: {diff}. Use a ControlNet made for it."
            )
        n_control, n_refiner = _count(s, "control_layers"), _count(s, "control_noise_refiner")
        has_proj = "control_noise_refiner.0.before_proj.weight" in s
        refiner = "control" if has_proj else "plain"
        if has_proj and self._refiner_untrained(n_refiner):
            refiner = "control_layers"
            self.why_2_0 = "its control noise refiner was never trained (its projections are all zero)"
        elif n_refiner == 0 and in_channels == 33:  # diffusers' 2.0 folders leave the untrained refiner out
            refiner, n_refiner = "control_layers", base.n_refiner_layers
            self.why_2_0 = "it has no control noise refiner (the layout diffusers writes for 2.0)"
        if refiner != "plain" and n_refiner != base.n_refiner_layers:
            raise CheckpointError(
                f"ControlNet '{self.path}' has {n_refiner} control noise-refiner layers, but the DiT has "
                f"{base.n_refiner_layers} noise-refiner layers; it was made for another model."
            )
        if n_control > base.n_layers:
            raise CheckpointError(
                f"ControlNet '{self.path}' has {n_control} control layers, more than the DiT's {base.n_layers} layers."
            )
        cfg = ControlNetConfig.for_base(base, n_control, in_channels, refiner, n_refiner)
        places = self.declared.get("control_layers_places")
        if places:  # a diffusers folder says where its hints go
            if len(places) != n_control or max(places) >= base.n_layers:
                raise CheckpointError(
                    f"ControlNet: config.json of '{self.path}' places {len(places)} control layers at {places}, but "
                    f"the weights have {n_control} control layers for a DiT of {base.n_layers} layers."
                )
            cfg = cfg.replace(control_places=tuple(places))
        return cfg

    def _refiner_untrained(self, n_refiner: int) -> bool:
        """2.0 files: every before/after projection of the control noise refiner is zero (never trained)."""
        keys = [f"control_noise_refiner.{i}.{p}" for i in range(n_refiner) for p in PROJ_PARAMS]
        return all(_is_zero(self.getters[k]()) for k in keys if k in self.getters)

    def nbytes(self) -> int:
        return self.source.nbytes()
