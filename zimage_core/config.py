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
