"""Random-weight Z-Image Fun ControlNets, made with diffusers' ``ZImageControlNetModel``, written with exactly the
key layouts of the published alibaba-pai files (at tiny sizes).

The published files hold the control branch only, with diffusers-style names (``control_all_x_embedder.2-1.*``,
``control_layers.N.attention.to_q.weight``, ``...to_out.0.weight``, ``...norm_q.weight``, ``before_proj`` on block
0, ``after_proj`` on every control block); 2.0 and 2.1 have the same keys, 2.0's ``control_noise_refiner``
projections being all zero. ComfyUI's converter (and re-packs made from it) fuse q/k/v into ``attention.qkv`` and
use ``attention.out`` / ``q_norm`` / ``k_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tests.factories.dit import randomize_
from zimage_core.config import DiTConfig, spread_places
from zimage_core.weights import save_safetensors

# variant -> (control layers, input channels, diffusers add_control_noise_refiner, zero refiner projections)
VARIANTS: dict[str, tuple[int, int, str | None, bool]] = {
    "1.0": (6, 16, None, False),  # Z-Image-Turbo-Fun-Controlnet-Union
    "2.0": (15, 33, "control_layers", True),  # ...-Union-2.0
    "2.1": (15, 33, "control_noise_refiner", False),  # ...-Union-2.1 / -2.1-8steps
    "lite": (3, 33, "control_noise_refiner", False),  # ...-Union-2.1-lite / Tile-2.1-lite
    "tile": (15, 33, "control_noise_refiner", False),  # Z-Image-Turbo-Fun-Controlnet-Tile-2.1
    "base-2.1": (15, 33, "control_noise_refiner", False),  # Z-Image-Fun-Controlnet-Union-2.1 (for Base)
}
# The same layouts with 2 control layers, for a tiny DiT of a few layers (end-to-end pipeline tests).
TINY_VARIANTS = {"tiny-1.0": (2, 16, None, False), "tiny-2.1": (2, 33, "control_noise_refiner", False)}
EXPECTED_REFINER = {None: "plain", "control_layers": "control_layers", "control_noise_refiner": "control"}


def base_config(**changes) -> DiTConfig:
    """A tiny DiT with Z-Image's 30 main + 2 refiner layers, so the published control layer counts apply."""
    return DiTConfig.tiny(n_layers=30, n_refiner_layers=2, t_mid_dim=1024, **changes)


@dataclass
class TinyControlNet:
    reference: object  # diffusers ZImageControlNetModel (not yet bound to a transformer)
    state: dict[str, torch.Tensor]  # the file's tensors, published (split) names
    variant: str


def _diffusers_model(base: DiTConfig, n: int, in_ch: int, mode: str | None, seed: int):
    from diffusers import ZImageControlNetModel

    model = ZImageControlNetModel(
        control_layers_places=list(spread_places(n, base.n_layers)),
        control_refiner_layers_places=list(range(base.n_refiner_layers)),
        control_in_dim=in_ch,
        add_control_noise_refiner=mode,
        dim=base.dim,
        n_refiner_layers=base.n_refiner_layers,
        n_heads=base.n_heads,
        n_kv_heads=base.n_heads,
        norm_eps=base.norm_eps,
    )
    return randomize_(model, seed).eval()


def make_controlnet(variant: str, base: DiTConfig | None = None, seed: int = 10) -> TinyControlNet:
    base = base or base_config()
    n, in_ch, mode, zero_refiner = {**VARIANTS, **TINY_VARIANTS}[variant]
    model = _diffusers_model(base, n, in_ch, mode, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if zero_refiner:
        # 2.0 files carry an untrained control noise refiner: random blocks whose projections were never moved
        # from their zero init (diffusers drops them when it loads such a file)
        donor = _diffusers_model(base, n, in_ch, "control_noise_refiner", seed + 1)
        for k, v in donor.state_dict().items():
            if k.startswith("control_noise_refiner."):
                state[k] = torch.zeros_like(v) if "_proj." in k else v.detach().clone()
    return TinyControlNet(model, state, variant)


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's conversion of these files: fused qkv, Lumina attention names, embedder name kept."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attention.to_q.weight"):
            base = k[: -len("to_q.weight")]
            out[base + "qkv.weight"] = torch.cat([v, state[base + "to_k.weight"], state[base + "to_v.weight"]])
        elif k.endswith((".attention.to_k.weight", ".attention.to_v.weight")):
            continue
        else:
            k = k.replace(".attention.to_out.0.", ".attention.out.")
            k = k.replace(".attention.norm_q.", ".attention.q_norm.").replace(
                ".attention.norm_k.", ".attention.k_norm."
            )
            out[k] = v
    return out


def save_controlnet(
    tiny: TinyControlNet, file: Path, fused: bool = False, prefix: str = "", dtype: torch.dtype | None = None
) -> Path:
    state = fuse_qkv(tiny.state) if fused else dict(tiny.state)
    state = {prefix + k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
    save_safetensors(state, file, metadata={"format": "pt"})
    return Path(file)


def save_diffusers_controlnet(tiny: TinyControlNet, folder: Path) -> Path:
    """diffusers' ``save_pretrained`` folder (the hlky/Z-Image-Turbo-Fun-Controlnet-Union* repos' layout)."""
    tiny.reference.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
