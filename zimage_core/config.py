"""Architecture numbers for every model of the Z-Image family, in one place.

Nothing else in the package hard-codes a size: models are built from these dataclasses, and the
loaders fill them in from tensor shapes (``from_state_dict`` helpers live next to the loaders),
so a tiny test file and the real 6B file go through the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Flux VAE latent normalisation: model space z = (vae_latent - SHIFT) * SCALE.
VAE_SCALE = 0.3611
VAE_SHIFT = 0.1159
VAE_DOWNSCALE = 8
# A pixel side must be a multiple of this (VAE x8 times the DiT patch 2).
PIXEL_MULTIPLE = 16


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of a head over (caption/frame, height, width): 32/48/48 for head_dim 128.

    Checkpoints do not store the split; Z-Image's 1/4, 3/8, 3/8 proportion is used for any size.
    """
    if head_dim % 8:
        raise ValueError(f"head_dim {head_dim} is not a multiple of 8; cannot split it over 3 RoPE axes")
    a = head_dim // 4
    b = (head_dim - a) // 2
    return (a, b, head_dim - a - b)


@dataclass(frozen=True)
class DiTConfig:
    """The S3-DiT transformer (``ZImageTransformer2DModel`` / ComfyUI ``NextDiT``)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    ffn_dim: int = 10240
    in_channels: int = 16
    patch_size: int = 2
    f_patch_size: int = 1
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    adaln_dim: int = 256
    t_mid_dim: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    axes_lens: tuple[int, int, int] = (1536, 512, 512)
    seq_multiple: int = 32

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"axes_dims {self.axes_dims} must sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.f_patch_size * self.in_channels

    @property
    def is_omni(self) -> bool:
        return self.siglip_feat_dim is not None

    def replace(self, **changes) -> DiTConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def turbo(cls) -> DiTConfig:
        """Z-Image-Turbo and Z-Image (Base): identical tensors."""
        return cls()

    @classmethod
    def omni(cls) -> DiTConfig:
        """Z-Image-Omni-Base / Edit: the Base DiT plus the SigLIP2 branch."""
        return cls(siglip_feat_dim=1152)

    @classmethod
    def tiny(cls, omni: bool = False, **changes) -> DiTConfig:
        """A few-hundred-thousand-parameter model for tests (same code path as the 6B one)."""
        base = dict(
            dim=64,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            ffn_dim=int(64 / 3 * 8),
            cap_feat_dim=32,
            adaln_dim=64,
            t_mid_dim=128,
            axes_dims=default_axes_dims(32),
            siglip_feat_dim=24 if omni else None,
        )
        base.update(changes)
        return cls(**base)

    @classmethod
    def mid(cls, **changes) -> DiTConfig:
        """The CPU benchmark size: dim 1536, 8 layers."""
        base = dict(dim=1536, n_layers=8, n_heads=12, ffn_dim=int(1536 / 3 * 8), axes_dims=default_axes_dims(128))
        base.update(changes)
        return cls(**base)


#: How a ControlNet's refiner stage works (see :mod:`zimage_core.controlnet`).
CONTROL_REFINERS = ("plain", "control", "control_layers")


def spread_places(n: int, n_layers: int) -> tuple[int, ...]:
    """``n`` control places spread evenly over ``n_layers`` main layers: 6 -> 0, 5, ..., 25 of 30 (VideoX-Fun)."""
    if not 0 < n <= n_layers:
        raise ValueError(f"cannot place {n} control layers on a DiT of {n_layers} layers")
    step = n_layers // n
    return tuple(i * step for i in range(n))


@dataclass(frozen=True)
class ControlNetConfig:
    """A Z-Image Fun ControlNet (alibaba-pai VideoX-Fun ``ZImageControlTransformer2DModel`` control branch).

    The block sizes equal the base DiT's (the control blocks are S3-DiT blocks and read its hidden states).
    ``control_places[k]``: the main DiT layer after which control layer ``k``'s hint is added;
    ``refiner_places[k]``: the base noise-refiner layer after which refiner hint ``k`` is added (2.x files).
    ``refiner``: ``plain`` (1.0: plain blocks refine the control tokens, no refiner hints), ``control`` (2.1:
    the control noise-refiner blocks make the refiner hints), ``control_layers`` (2.0: the control layers also
    make them, as 2.0 was trained; its own control noise-refiner weights are untrained and unused).
    ``in_channels``: 16 (control latent) or 33 (control latent 16 + keep-mask 1 + inpaint latent 16).
    """

    control_places: tuple[int, ...] = spread_places(15, 30)
    refiner_places: tuple[int, ...] = (0, 1)
    in_channels: int = 33
    refiner: str = "control"
    n_refiner_layers: int = 2
    dim: int = 3840
    n_heads: int = 30
    ffn_dim: int = 10240
    adaln_dim: int = 256
    norm_eps: float = 1e-5
    patch_size: int = 2

    def __post_init__(self) -> None:
        if self.refiner not in CONTROL_REFINERS:
            raise ValueError(f"refiner '{self.refiner}' is not one of {', '.join(CONTROL_REFINERS)}")
        if not self.control_places or list(self.control_places) != sorted(set(self.control_places)):
            raise ValueError(f"control_places {self.control_places} must be distinct and increasing")
        if self.refiner == "plain" and self.refiner_places:
            raise ValueError("a ControlNet with a plain control refiner makes no refiner hints (refiner_places=())")
        n_sources = len(self.control_places) if self.refiner == "control_layers" else self.n_refiner_layers
        if self.refiner != "plain" and len(self.refiner_places) > n_sources:
            raise ValueError(f"{len(self.refiner_places)} refiner places but only {n_sources} blocks make hints")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")

    @property
    def n_control_layers(self) -> int:
        return len(self.control_places)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    def block_config(self) -> DiTConfig:
        """The DiT numbers a control block is built from (only the block sizes matter)."""
        head_dim = self.dim // self.n_heads
        return DiTConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            ffn_dim=self.ffn_dim,
            adaln_dim=self.adaln_dim,
            norm_eps=self.norm_eps,
            patch_size=self.patch_size,
            axes_dims=default_axes_dims(head_dim),
        )

    def replace(self, **changes) -> ControlNetConfig:
        return dataclasses.replace(self, **changes)

    # ---- the published files (for a base of ``base.n_layers`` main layers; Z-Image has 30) ---------------
    @classmethod
    def for_base(cls, base: DiTConfig, n_control: int, in_channels: int, refiner: str, n_refiner: int = 2):
        return cls(
            control_places=spread_places(n_control, base.n_layers),
            refiner_places=() if refiner == "plain" else tuple(range(min(n_refiner, base.n_refiner_layers))),
            in_channels=in_channels,
            refiner=refiner,
            n_refiner_layers=n_refiner,
            dim=base.dim,
            n_heads=base.n_heads,
            ffn_dim=base.ffn_dim,
            adaln_dim=base.adaln_dim,
            norm_eps=base.norm_eps,
            patch_size=base.patch_size,
        )

    @classmethod
    def union_1_0(cls, base: DiTConfig | None = None) -> ControlNetConfig:
        """Z-Image-Turbo-Fun-Controlnet-Union: 6 control layers, 16-channel input, plain control refiner."""
        return cls.for_base(base or DiTConfig(), 6, 16, "plain")

    @classmethod
    def union_2_0(cls, base: DiTConfig | None = None) -> ControlNetConfig:
        """...-Union-2.0: 15 control layers, 33 channels; the control layers make the refiner hints."""
        return cls.for_base(base or DiTConfig(), 15, 33, "control_layers")

    @classmethod
    def union_2_1(cls, base: DiTConfig | None = None) -> ControlNetConfig:
        """...-Union-2.1 (and -8steps, Tile-2.1, Base Z-Image-Fun-Controlnet-Union-2.1): 15 + 2 layers, 33 ch."""
        return cls.for_base(base or DiTConfig(), 15, 33, "control")

    @classmethod
    def union_2_1_lite(cls, base: DiTConfig | None = None) -> ControlNetConfig:
        """The 2.1 "lite" files (Union and Tile): 3 control layers + 2 control refiner layers, 33 channels."""
        return cls.for_base(base or DiTConfig(), 3, 33, "control")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Qwen3 (4B for Z-Image). Only the first ``n_layers - 1`` layers are ever run."""

    hidden_size: int = 2560
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    # Z-Image reads hidden_states[-2]: the residual stream after layer n_layers - 2.
    hidden_state_index: int = -2
    max_length: int = 512

    def replace(self, **changes) -> TextEncoderConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def qwen3_4b(cls) -> TextEncoderConfig:
        return cls()

    @classmethod
    def tiny(cls, **changes) -> TextEncoderConfig:
        base = dict(hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64)
        base.update(changes)
        return cls(**base)


@dataclass(frozen=True)
class VAEConfig:
    """The 16-channel Flux autoencoder (``ae.safetensors`` / diffusers ``AutoencoderKL``)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = VAE_SCALE
    shift_factor: float = VAE_SHIFT
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def flux(cls) -> VAEConfig:
        return cls()

    @classmethod
    def tiny(cls, **changes) -> VAEConfig:
        """Four levels like the real one (so the x8 factor holds), 32-channel groups."""
        base = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
        base.update(changes)
        return cls(**base)
