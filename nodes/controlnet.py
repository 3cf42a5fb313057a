"""ControlNet nodes: ``Z-Image ControlNet Loader`` and ``Z-Image ControlNet Apply``.

The loader lists ``models/controlnet`` and ``models/model_patches`` (where native ComfyUI users keep the
alibaba-pai Fun ControlNet files) and returns a ``ZIMAGE_CONTROLNET`` (the file, read when first applied, for
the model it is applied to). Apply binds it to a control image (and, for 2.x files, an inpaint image and mask)
on a ``ZIMAGE_MODEL`` view, like the LoRA loader: the result feeds Z-Image Sampler (and LoRA loaders, before or
after). The sampler encodes the images with the given VAE at the latent's size and samples through the engine's
:func:`~zimage_core.pipeline.denoise_latents` with the controls, exactly as ``zimage generate --controlnet``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..zimage_core.controlnet import ControlNet, load_controlnet
from ..zimage_core.controlnet_layouts import ControlNetCheckpoint, open_controlnet
from ..zimage_core.controls import ControlSpec, build_control_inputs
from ..zimage_core.denoiser import SigmaLookup
from ..zimage_core.errors import ZImageError
from ..zimage_core.native import controls_for_call
from ..zimage_core.vae import to_model_space
from . import checks, host, paths
from .checks import node_errors
from .handles import ZImageModel

log = logging.getLogger(__name__)

CATEGORY = "Z-Image/controlnet"
FOLDERS = ("controlnet", "model_patches")
QUANT_MODES = ["none", "int8", "nf4", "fp8"]
# Widget ranges, checked again in the node (an API prompt or a linked value skips the widget's own limits).
STRENGTH = {"min": 0.0, "max": 2.0}
FRACTION = {"min": 0.0, "max": 1.0}


def _names() -> list[str]:
    paths.ensure_folder("model_patches")
    out = []
    for kind in FOLDERS:
        out += [n for n in paths.list_models(kind) if n not in out]
    return out


def resolve_controlnet(name: str) -> Path:
    """The file behind a drop-down name, looked up in ``controlnet`` then ``model_patches``."""
    paths.ensure_folder("model_patches")
    for kind in FOLDERS:
        if name in paths.list_models(kind):
            return paths.resolve(kind, name)
    raise ZImageError(
        f"ControlNet '{name}' was not found. Put the Z-Image Fun ControlNet file in ComfyUI/models/controlnet or "
        "ComfyUI/models/model_patches, then refresh the page (press 'r')."
    )


class ZImageControlNetFile:
    """``ZIMAGE_CONTROLNET``: a ControlNet file, loaded for the model it is applied to (one at a time) and registered
    with ComfyUI's memory management (so *Unload models* frees its VRAM). When the model's memory mode streams DiT
    blocks (block-swap / sequential), every control block streams too (the engine's placement,
    :meth:`~zimage_core.memory.Residency.stream_extra`) and only the rest is registered with ComfyUI."""

    def __init__(self, path: Path, name: str, quant: str = "none"):
        self.path, self.name, self.quant = path, name, quant
        self._loaded: dict[tuple, tuple] = {}

    def in_channels(self, config) -> int:
        """16 (1.0) or 33 (2.x), from the file's header, checked against the DiT's ``config``."""
        return ControlNetCheckpoint(self.path, config).config.in_channels

    def load(self, model: ZImageModel) -> tuple[ControlNet, object, object]:
        """``(ControlNet, ComfyUI patcher or None, the model's DiT slot)`` for ``model``."""
        slot = model.slot
        key = (id(slot), model.dtype)
        if key not in self._loaded:
            self.release()
            res = slot.residency
            streams = res.streamed_blocks("dit") > 0
            device = "cpu" if streams else slot.offload_device
            net = load_controlnet(self.path, base=model.config, dtype=model.dtype, device=device, quant=self.quant)
            parts = res.stream_extra(net, slot.dit, label=f"ControlNet {self.name}")
            if parts is not None:
                patcher = host.register(
                    net, slot.load_device, slot.offload_device, parts=parts, on_move=lambda: res.finish_extra(net)
                )
            else:
                patcher = host.register(net, slot.load_device, slot.offload_device)
            self._loaded = {key: (net, patcher, slot)}
        return self._loaded[key]

    def release(self) -> None:
        """Forget the loaded ControlNet (its streaming removed)."""
        for net, _, slot in self._loaded.values():
            slot.residency.drop_extra(net)
        self._loaded = {}

    def __repr__(self) -> str:
        return f"<ZImageControlNet {self.name}>"


@dataclass(frozen=True, eq=False)
class ControlApplication:
    """One ControlNet bound to its images on a model view (the sampler encodes them at the latent's size)."""

    file: ZImageControlNetFile
    vae: object  # core VAE: encode(IMAGE [B, H, W, 3] in 0..1) -> raw Flux latents
    image: torch.Tensor  # IMAGE
    strength: float
    start: float
    end: float
    inpaint_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` in 0..1 -> ``[B, 3, H, W]`` in [-1, 1]."""
    return image[..., :3].permute(0, 3, 1, 2).float() * 2.0 - 1.0


def control_inputs(model: ZImageModel, dit, width: int, height: int) -> list:
    """The engine's ControlInputs for a view's controls at a ``width`` x ``height`` generation, with each
    ControlNet loaded through ComfyUI onto the DiT's device."""
    specs, nets, encoders = [], [], []
    for app in model.controls:
        net, patcher, slot = app.file.load(model)
        res = slot.residency
        host.load(
            patcher,
            net,
            dit.device,
            mover=lambda d, net=net, res=res: res.move_extra(net, d),
            memory_required=res.extra_staging_bytes(net),
        )
        nets.append(net)
        specs.append(
            ControlSpec(
                net,
                _pixels(app.image),
                app.strength,
                app.start,
                app.end,
                None if app.inpaint_image is None else _pixels(app.inpaint_image),
                app.mask,
            )
        )
        encoders.append(app.vae)
    out = []
    for spec, net, vae in zip(specs, nets, encoders):

        def encode(px: torch.Tensor, vae=vae) -> torch.Tensor:
            raw = vae.encode(((px + 1.0) / 2.0).permute(0, 2, 3, 1))
            return to_model_space(raw.float()).to(dit.device)

        out += build_control_inputs([spec], [net], encode, width, height)
    return out


class BridgedControls:
    """A view's ControlNets riding on its bridged core ``MODEL`` (``transformer_options[bridge.CONTROLS]``; the
    bridged forward calls it). Per call it returns the engine's ControlInputs active at that call: the step is the
    call's sigma in the schedule ComfyUI's sampler was given (``sample_sigmas``), by the rule of the engine's
    sampler, so start/end mean the same in core KSampler / SamplerCustomAdvanced as in Z-Image Sampler. The control
    images are encoded (and the ControlNets loaded through ComfyUI) at the first call for a latent size, like the
    Z-Image sampler does per run; both CFG branches get the hints."""

    def __init__(self, view: ZImageModel):
        self.view = view
        self._inputs: tuple | None = None  # (key, [ControlInput])
        self._schedule: tuple | None = None  # (sample_sigmas tensor, SigmaLookup)

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options with every clone: share, never copy weights
        return self

    def __call__(self, dit, x: torch.Tensor, transformer_options: dict, timesteps: torch.Tensor):
        h, w = x.shape[-2:]
        nets = [app.file.load(self.view)[0] for app in self.view.controls]
        key = (h, w, dit.device, tuple(id(n) for n in nets))
        if self._inputs is None or self._inputs[0] != key or any(n.device != dit.device for n in nets):
            with host.loads_restored():
                self._inputs = (key, control_inputs(self.view, dit, w * 8, h * 8))
        sample = transformer_options.get("sample_sigmas")
        schedule = None
        if torch.is_tensor(sample):
            if self._schedule is None or self._schedule[0] is not sample:
                self._schedule = (sample, SigmaLookup(sample))
            schedule = self._schedule[1]
        sigma = transformer_options.get("sigmas")
        return controls_for_call(self._inputs[1], schedule, sigma if torch.is_tensor(sigma) else timesteps)


class ZImageControlNetLoader:
    DESCRIPTION = (
        "Loads a Z-Image Fun ControlNet (alibaba-pai Z-Image-Turbo-Fun-Controlnet-Union 1.0 / 2.0 / 2.1 / 2.1-lite / "
        "Tile for Turbo; Z-Image-Fun-Controlnet-Union-2.1 for Base) from ComfyUI/models/controlnet or "
        "ComfyUI/models/model_patches. The variant is read from the file. Connect it to Z-Image ControlNet Apply."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ZIMAGE_CONTROLNET",)
    RETURN_NAMES = ("controlnet",)
    OUTPUT_TOOLTIPS = ("The ControlNet file, for Z-Image ControlNet Apply.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet_name": (
                    _names(),
                    {
                        "tooltip": "Z-Image Fun ControlNet file in models/controlnet or models/model_patches, e.g. "
                        "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors."
                    },
                ),
            },
            "optional": {
                "quant": (
                    QUANT_MODES,
                    {
                        "default": "none",
                        "tooltip": "Quantize the control blocks while loading (int8/fp8 about halve their memory, "
                        "nf4 quarters it). ComfyUI fp8 files stay as they are.",
                    },
                ),
            },
        }

    @node_errors("Z-Image ControlNet Loader")
    def load(self, controlnet_name, quant="none"):
        if quant not in QUANT_MODES:
            raise ZImageError(f"quant '{quant}' is not one of {', '.join(QUANT_MODES)}.")
        path = resolve_controlnet(controlnet_name)
        open_controlnet(path)  # a DiT, VAE, LoRA or damaged file is refused here, not when sampling
        return (ZImageControlNetFile(path, controlnet_name, quant),)


class ZImageControlNetApply:
    DESCRIPTION = (
        "Adds a ControlNet to a Z-Image model: the control image (a Canny, depth, pose, HED/lineart or tile image "
        "from a preprocessor) steers Z-Image Sampler. Chain several Apply nodes for several ControlNets; LoRA "
        "loaders can come before or after. 2.x files also take an inpaint image and mask (white = generate): the "
        "ControlNet then fills the masked region to match the rest."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("ZIMAGE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this ControlNet added, for Z-Image Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        frac = {**FRACTION, "step": 0.01}
        return {
            "required": {
                "model": ("ZIMAGE_MODEL", {"tooltip": "The Z-Image model (loader, LoRA loader or another Apply)."}),
                "controlnet": ("ZIMAGE_CONTROLNET", {"tooltip": "From Z-Image ControlNet Loader."}),
                "vae": ("VAE", {"tooltip": "ae.safetensors: encodes the control image (as for the latents)."}),
                "image": ("IMAGE", {"tooltip": "The preprocessed control image; resized to the output size."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.75,
                        **STRENGTH,
                        "step": 0.01,
                        "tooltip": "How strongly the control steers (0.6-1.0 is typical).",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {"default": 0.0, **frac, "tooltip": "Fraction of the steps after which the control starts."},
                ),
                "end_percent": (
                    "FLOAT",
                    {"default": 1.0, **frac, "tooltip": "Fraction of the steps after which the control stops."},
                ),
            },
            "optional": {
                "inpaint_image": ("IMAGE", {"tooltip": "2.x files: the picture to keep outside the mask."}),
                "mask": ("MASK", {"tooltip": "2.x files, with inpaint_image: white = generate there."}),
            },
        }

    @node_errors("Z-Image ControlNet Apply")
    def apply(self, model, controlnet, vae, image, strength, start_percent, end_percent, inpaint_image=None, mask=None):
        if not isinstance(model, ZImageModel):
            raise ZImageError(
                f"the model input is {type(model).__name__}, not a Z-Image model; connect Z-Image Model Loader."
            )
        if not isinstance(controlnet, ZImageControlNetFile):
            raise ZImageError("the controlnet input is not a Z-Image ControlNet; connect Z-Image ControlNet Loader.")
        strength = checks.number("strength", strength, STRENGTH)
        start_percent = checks.number("start_percent", start_percent, FRACTION)
        end_percent = checks.number("end_percent", end_percent, FRACTION)
        if not start_percent <= end_percent:
            raise ZImageError(
                f"start_percent {start_percent} / end_percent {end_percent}: need 0 <= start <= end <= 1 (the "
                "fractions of the steps the control applies between); lower start_percent or raise end_percent."
            )
        checks.vae("the vae input", vae)
        checks.image("image (the control image)", image, "a preprocessor (Canny, depth, pose...) or Load Image")
        if (inpaint_image is None) != (mask is None):
            raise ZImageError("connect both inpaint_image and mask (white = generate), or neither.")
        if inpaint_image is not None:
            checks.image("inpaint_image", inpaint_image)
            checks.mask("mask", mask, inpaint_image, "inpaint_image")
            m = mask.shape[0] if mask.ndim == 3 else 1
            checks.same_batch(("image", image.shape[0]), ("inpaint_image", inpaint_image.shape[0]), ("mask", m))
        spec = ControlSpec(controlnet.path, image, strength, start_percent, end_percent, inpaint_image, mask)
        spec.check_channels(controlnet.in_channels(model.config), f"ControlNet '{controlnet.name}'")
        if strength == 0:
            return (model,)
        app = ControlApplication(
            controlnet, vae, image, float(strength), float(start_percent), float(end_percent), inpaint_image, mask
        )
        return (dataclasses.replace(model, controls=model.controls + (app,)),)
