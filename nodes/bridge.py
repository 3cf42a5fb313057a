"""The core ``MODEL`` bridge: a loaded Z-Image DiT shown to ComfyUI as what native ComfyUI makes of Z-Image.

Inside a ComfyUI with native Z-Image (0.3.74 or newer: ``comfy.model_base.Lumina2``, ``comfy.supported_models.ZImage``)
each :class:`~.handles.DiTSlot` registers ONE ``ModelPatcher`` (the slot's ``patcher``, "the base") over a
``comfy.model_base.Lumina2`` built from ``ZImage(unet_config, disable_unet_model_creation=True)``. Its
``diffusion_model`` is a :class:`NativeDiT`: the engine's DiT under ComfyUI's parameter names
(``diffusion_model.layers.N...``, so core LoRA key mapping works) called with native's convention
(:func:`zimage_core.native.native_forward`: timesteps = sigma, the DiT sees ``1 - sigma``, the raw output comes back
negated). The Z-Image sampler loads the base; ``Z-Image Model -> MODEL`` hands ComfyUI clones of it, so ComfyUI's
memory manager knows the DiT once, at its real size, and "Unload models" unloads it.

Who patches the weights (one owner at a time, never both on the same tensors):

- Z-Image Sampler: the engine merges the view's LoRAs after ComfyUI loaded the base (which takes ComfyUI's own
  patches off first: a clone's patches change ``patches_uuid``).
- A bridged MODEL: ComfyUI. The view's LoRAs become ComfyUI weight patches (``lora_state_dict`` -> ``comfy.lora``) on
  the clone, next to whatever core LoRA loaders add; before a clone loads, the engine's merges come off.
- Quantized DiTs (int8/nf4/fp8/GGUF linears keep packed integer storage that ComfyUI's patching would re-round as if
  it were a float weight): the view's LoRAs stay the engine's (runtime side paths on the quantized layers, merges on
  the rest), applied when the clone loads and taken off when another view samples; a core weight patch on a
  quantized layer is refused with one message (:meth:`Bridge.check_patchable`).
- Block-swap / sequential: the streamed blocks are not children of :class:`NativeDiT` (ComfyUI never moves or counts
  them) but are listed in its ``state_dict`` and reachable by name, so LoRA keys map onto them; ComfyUI's patches for
  them are applied in place in their host-memory home copies (:meth:`Bridge.patch_streamed`).
- Our modules are plain torch layers (not ``comfy.ops``), so ComfyUI's partial (lowvram) loading cannot stream them:
  the bridged model (its resident part) is loaded whole or unloaded whole.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..zimage_core.errors import ZImageError
from ..zimage_core.lora import lora_state_dict
from ..zimage_core.native import native_forward
from . import host

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."
NEEDS_COMFYUI = (
    "Z-Image Model -> MODEL needs ComfyUI with native Z-Image support (0.3.74 or newer: comfy.model_base.Lumina2 "
    "and comfy.supported_models.ZImage). Update ComfyUI, or sample with Z-Image Sampler."
)
# transformer_options entries that native NextDiT reads inside its blocks; the engine's forward cannot honour them.
_BLOCK_PATCHES = ("noise_refiner", "double_block")
_LOW_RANK = (".lora_down.weight", ".lora_up.weight", ".alpha")
# transformer_options entry of a bridged MODEL that carries a view's ControlNets (nodes.controlnet.BridgedControls):
# called as ``controls(dit, x, transformer_options, timesteps)``, it returns the ControlInputs of this call
CONTROLS = "zimage_controls"


# ---------------------------------------------------------------------------------------------
# The diffusion_model ComfyUI sees
# ---------------------------------------------------------------------------------------------
def _holds(module: nn.Module, ids: set[int]) -> bool:
    return any(id(m) in ids for m in module.modules())


class _Mirror(nn.Module):
    """One module of the DiT as ComfyUI sees it: the same parameter and buffer dicts (so ComfyUI's moves and weight
    patches land in the DiT), its children (themselves, or mirrors of those holding streamed blocks). Streamed blocks
    are no children: ``.to()``, ``parameters()`` and ``named_modules()`` never reach them, while ``state_dict()``
    lists them and attribute access finds them (ComfyUI's LoRA key map and ``get_attr``)."""

    def __init__(self, source: nn.Module, streamed: set[int]):
        super().__init__()
        d = self.__dict__
        d["_parameters"] = source._parameters
        d["_buffers"] = source._buffers
        d["_non_persistent_buffers_set"] = source._non_persistent_buffers_set
        d["_streamed"] = {}
        for name, child in source._modules.items():
            if child is None:
                continue
            if id(child) in streamed:
                d["_streamed"][name] = child
            elif _holds(child, streamed):
                self._modules[name] = _Mirror(child, streamed)
            else:
                self._modules[name] = child
        if d["_streamed"]:
            # public since torch 2.5; the private registration (same hook signature) before that
            register = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
            register(_list_streamed)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            streamed = self.__dict__.get("_streamed") or {}
            if name in streamed:
                return streamed[name]
            raise


def _list_streamed(module: _Mirror, state_dict, prefix: str, local_metadata) -> None:
    for name, block in module._streamed.items():
        block.state_dict(destination=state_dict, prefix=f"{prefix}{name}.")


def check_transformer_options(opts: dict) -> None:
    """One clear error for what native NextDiT does inside its blocks and the engine's forward cannot."""
    patches = opts.get("patches") or {}
    used = [f"patches['{k}']" for k in _BLOCK_PATCHES if patches.get(k)]
    if (opts.get("patches_replace") or {}).get("dit"):
        used.append("patches_replace['dit']")
    if opts.get("rope_options"):
        used.append("rope_options")
    if used:
        raise ZImageError(
            f"the model carries {', '.join(used)}: patches into native NextDiT's blocks (from nodes such as "
            "ZImageFunControlnet or ScaleROPE), which a Z-Image model bridged by 'Z-Image Model -> MODEL' cannot "
            "run. Use such nodes with a model loaded by core Load Diffusion Model, or the Z-Image pack's own nodes."
        )


class NativeDiT(_Mirror):
    """``diffusion_model`` of the bridged Lumina2: the DiT's weights under ComfyUI's names, native's forward.

    ``streamed``: blocks streamed from host memory (left out of what ComfyUI moves and counts). ``on_move`` runs
    before every move (a streamer drops its staged copies, e.g. on "Unload models")."""

    def __init__(self, dit: nn.Module, streamed=(), on_move=None):
        super().__init__(dit, {id(b) for b in streamed})
        self.__dict__["dit"] = dit  # reachable, but not a submodule (the mirror holds its parts)
        self.__dict__["_on_move"] = on_move

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    def _apply(self, fn, recurse=True):
        if self._on_move is not None:
            self._on_move()
        return super()._apply(fn, recurse)

    def forward(self, x, timesteps, context=None, num_tokens=None, attention_mask=None, **kwargs):
        pe = host.comfy_module("comfy.patcher_extension")
        if pe is None or not hasattr(pe, "WrapperExecutor"):
            return self._forward(x, timesteps, context, num_tokens, attention_mask, **kwargs)
        wrappers = pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, kwargs.get("transformer_options") or {})
        return pe.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timesteps, context, num_tokens, attention_mask, **kwargs
        )

    def _forward(
        self,
        x,
        timesteps,
        context,
        num_tokens=None,
        attention_mask=None,
        ref_latents=None,
        ref_contexts=None,
        siglip_feats=None,
        transformer_options=None,
        **unused,
    ):
        opts = transformer_options or {}
        check_transformer_options(opts)
        carried = opts.get(CONTROLS)
        controls = carried(self.dit, x, opts, timesteps) if carried is not None else None
        if siglip_feats and not self.dit.cfg.is_omni:
            host.warn_once(
                "bridge-siglip",
                "Z-Image: this model has no SigLIP branch (not Omni/Edit); the reference images' SigLIP "
                "features are ignored.",
            )
        return native_forward(
            self.dit,
            x,
            timesteps,
            context,
            num_tokens,
            attention_mask,
            ref_latents,
            ref_contexts,
            siglip_feats,
            controls,
        )


# ---------------------------------------------------------------------------------------------
# LoRA -> ComfyUI weight patches
# ---------------------------------------------------------------------------------------------
def lora_patch_states(lora) -> list[dict[str, torch.Tensor]]:
    """``lora`` in ComfyUI's native key layout (``diffusion_model.<module>.lora_down.weight`` ...), split in two
    state dicts so ``comfy.lora.load_lora`` (one patch per key and file) keeps a low-rank term and a full ``.diff``
    on the same module."""
    sd = lora_state_dict(lora)
    diffs = {k: v for k, v in sd.items() if k.endswith(".diff")}
    rest = {k: v for k, v in sd.items() if k not in diffs}
    return [s for s in (rest, diffs) if s]


def patch_targets(sd: dict) -> set[str]:
    """The weight keys ComfyUI patches for a native-layout LoRA state dict (its key map: ``<module>`` ->
    ``<module>.weight``; ``.diff_b`` patches ``<module>.bias``)."""
    out = set()
    for k in sd:
        for suffix in (*_LOW_RANK, ".diff", ".diff_b"):
            if k.endswith(suffix):
                out.add(k[: -len(suffix)] + (".bias" if suffix == ".diff_b" else ".weight"))
                break
        else:
            raise ZImageError(f"unexpected LoRA key '{k}' while converting a LoRA for ComfyUI.")
    return out


def add_lora_patches(patcher, spec) -> None:
    """Add a :class:`~.handles.LoraSpec` to ``patcher`` as ComfyUI weight patches (every module, or one error)."""
    lora_mod = host.comfy_module("comfy.lora")
    key_map = lora_mod.model_lora_keys_unet(patcher.model, {})
    for sd in lora_patch_states(spec.lora):
        loaded = lora_mod.load_lora(sd, key_map, log_missing=False)
        added = set(patcher.add_patches(loaded, float(spec.strength)))
        missing = sorted(patch_targets(sd) - added)
        if missing:
            raise ZImageError(
                f"LoRA '{spec.name}': ComfyUI could not map {len(missing)} of its modules onto the bridged model "
                f"(e.g. {missing[0]}); the LoRA would be applied only in part."
            )


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def _unet_config(cfg) -> dict:
    """What ``ZImage`` and ComfyUI's Z-Image LoRA key map read from a unet config (the rest as native detects it)."""
    out = {
        "image_model": "lumina2",
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "dim": cfg.dim,
        "cap_feat_dim": cfg.cap_feat_dim,
        "n_layers": cfg.n_layers,
        "n_refiner_layers": cfg.n_refiner_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_heads,
        "qk_norm": True,
        "axes_dims": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens),
        "rope_theta": cfg.rope_theta,
        "z_image_modulation": True,
        "time_scale": cfg.t_scale,
        "pad_tokens_multiple": cfg.seq_multiple,
        "disable_unet_model_creation": True,
    }
    if cfg.siglip_feat_dim is not None:
        out["siglip_feat_dim"] = cfg.siglip_feat_dim
    return out


def _streamed_keys(dit: nn.Module, blocks) -> set[str]:
    names = {id(m): n for n, m in dit.named_modules()}
    return {f"{PREFIX}{names[id(b)]}.{k}" for b in blocks for k in b.state_dict()}


def _module_at(dit: nn.Module, path: str):
    try:
        mod = dit.get_submodule(path)
    except AttributeError:
        return None
    while getattr(mod, "is_lora_wrapper", False):
        mod = mod.base
    return mod


class Bridge:
    """What one DiT slot shows ComfyUI: the base ModelPatcher and the rules its clones follow (module doc)."""

    def __init__(self, slot, patcher, streamed_keys: set[str]):
        self.slot = slot
        self.patcher = patcher
        self.streamed_keys = streamed_keys
        self.quantized = any(getattr(m, "is_quantized", False) is True for m in slot.dit.modules())

    @property
    def staging(self) -> int:
        return self.slot.residency.staging_bytes("dit")

    def finish(self) -> None:
        """Drop a pending prefetch (end of a run, before a move or an in-place patch)."""
        self.slot.residency.finish("dit")

    def check_patchable(self, patches) -> None:
        if not self.quantized:
            return
        bad = []
        for k in patches:
            key = k if isinstance(k, str) else k[0]
            if not key.startswith(PREFIX):
                continue
            mod = _module_at(self.slot.dit, key[len(PREFIX) :].rpartition(".")[0])
            if getattr(mod, "is_quantized", False) is True:
                bad.append(key)
        if bad:
            fmt = getattr(_module_at(self.slot.dit, bad[0][len(PREFIX) :].rpartition(".")[0]), "format", "quantized")
            raise ZImageError(
                f"this Z-Image model is quantized ({fmt}); ComfyUI's weight patches (core LoRA loaders, model "
                f"merging) cannot change its packed weights ({len(bad)} keys, e.g. {bad[0]}). Load the LoRA with "
                "Z-Image LoRA Loader before 'Z-Image Model -> MODEL' (it applies LoRAs to quantized layers as "
                "runtime side paths), or load the model with quant 'none'."
            )

    def check_unstreamed(self, patches) -> None:
        """Scheduled weight hooks (core "Create Hook LoRA" nodes) swap weights per step by replacing them, which
        streamed blocks cannot follow: one message instead of a model that silently ignores them."""
        keys = sorted({k if isinstance(k, str) else k[0] for k in patches} & self.streamed_keys)
        if keys:
            raise ZImageError(
                f"scheduled weight hooks (Create Hook LoRA / Set Model Hooks) cannot patch the {len(keys)} weights of "
                f"blocks that stream from host memory (e.g. {keys[0]}). Load the model with memory_mode full or "
                "auto (or connect the LoRA with a LoRA loader instead of a hook)."
            )

    def before_load(self, patcher) -> None:
        """Before ComfyUI loads ``patcher``: a bridged MODEL gets the engine state it wants (none, or a quantized
        view's LoRAs), after ComfyUI's patches of another clone came off. The base is left alone: the Z-Image
        sampler sets the engine's LoRAs itself once ComfyUI has loaded it."""
        self.finish()
        wanted = patcher.engine_loras
        if wanted is None or self.slot.has_loras(wanted):
            return
        current = patcher.model.current_weight_patches_uuid
        if current is not None and current != patcher.patches_uuid:
            patcher.unpatch_model(None, unpatch_weights=True)
        self.slot.apply(wanted)

    def patch_streamed(self, patcher) -> None:
        """Apply ``patcher``'s weight patches on streamed blocks, in place in their home copies (ComfyUI loads only
        the resident part, so its loader never reaches them; its unpatch restores them in place)."""
        keys = [k for k in patcher.patches if k in self.streamed_keys and k not in patcher.backup]
        if not keys:
            return
        self.finish()
        with torch.no_grad():
            for k in keys:
                patcher.patch_weight_to_device(k, device_to=patcher.load_device, inplace_update=True)
        log.info("Z-Image: patched %d weights of streamed blocks in host memory", len(keys))


@functools.lru_cache(maxsize=None)
def _patcher_class(base: type) -> type:
    """A ComfyUI ModelPatcher subclass for bridged DiTs (built once per ComfyUI ModelPatcher class)."""

    class ZImageBridgePatcher(base):
        zimage_bridge: Bridge | None = None
        engine_loras: tuple | None = None  # None: the base (the engine sets its LoRAs); a tuple on MODEL clones

        def clone(self, *args, **kwargs):
            n = super().clone(*args, **kwargs)
            n.zimage_bridge, n.engine_loras = self.zimage_bridge, self.engine_loras
            return n

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            self.zimage_bridge.check_patchable(patches)
            return super().add_patches(patches, strength_patch, strength_model)

        def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
            self.zimage_bridge.check_patchable(patches)
            self.zimage_bridge.check_unstreamed(patches)
            return super().add_hook_patches(hook, patches, strength_patch, strength_model)

        def add_weight_wrapper(self, name, function):
            raise ZImageError(
                "a node asked for a per-layer weight wrapper on a Z-Image model bridged by 'Z-Image Model -> "
                "MODEL'; its layers are not ComfyUI's cast layers, so the wrapper would never run."
            )

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            self.zimage_bridge.before_load(self)
            used = super().partially_load(device_to, extra_memory, force_patch_weights)
            self.zimage_bridge.patch_streamed(self)
            return used

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            # plain torch layers cannot be streamed by ComfyUI's lowvram mode: the resident part loads whole
            return super().load(device_to, lowvram_model_memory, force_patch_weights, True)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0  # nothing can go partially; ComfyUI then unloads the whole model

        def memory_required(self, *args, **kwargs):
            return super().memory_required(*args, **kwargs) + self.zimage_bridge.staging

        def cleanup(self):
            super().cleanup()
            self.zimage_bridge.finish()

    return ZImageBridgePatcher


@functools.lru_cache(maxsize=None)
def _model_class(base: type) -> type:
    """``comfy.model_base.Lumina2`` that also turns Omni/edit conditioning into the DiT's inputs where this ComfyUI's
    Lumina2 does not (ComfyUI before its Z-Image Omni support drops ``reference_latents`` and the rest silently; a
    ComfyUI that forwards them keeps its own conversion)."""

    class ZImageBridgeModel(base):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            conds = host.comfy_module("comfy.conds")
            refs = kwargs.get("reference_latents")
            if refs is not None and "ref_latents" not in out:
                out["ref_latents"] = conds.CONDList([self.process_latent_in(r) for r in refs])
            texts = kwargs.get("reference_latents_text_embeds")
            if texts is not None and "ref_contexts" not in out:
                out["ref_contexts"] = conds.CONDList(list(texts))
            feats = [_siglip_grid(o) for o in kwargs.get("clip_vision_outputs") or () if o is not None]
            if feats and "siglip_feats" not in out:
                out["siglip_feats"] = conds.CONDList(feats)
            return out

    # ComfyUI logs and reports the model by its class name ("Requested to load Lumina2"): keep native's
    ZImageBridgeModel.__name__ = ZImageBridgeModel.__qualname__ = base.__name__
    return ZImageBridgeModel


def _siglip_grid(output) -> torch.Tensor:
    """A CLIP-vision output's SigLIP tokens as the ``[B, h, w, C]`` grid native Z-Image reads (16-pixel patches)."""
    hidden, size = output["last_hidden_state"], output["image_sizes"][0]
    return hidden.reshape(hidden.shape[0], int(size[-2]) // 16, int(size[-1]) // 16, hidden.shape[-1])


def available() -> bool:
    mb, sm = host.comfy_module("comfy.model_base"), host.comfy_module("comfy.supported_models")
    return (
        hasattr(mb, "Lumina2")
        and hasattr(sm, "ZImage")
        and hasattr(host.comfy_module("comfy.model_patcher"), "ModelPatcher")
    )


def register(slot, load_device: torch.device, offload_device: torch.device) -> Bridge | None:
    """Register ``slot``'s DiT with ComfyUI as native Z-Image; None where this ComfyUI has no native Z-Image (or
    the registration failed: a warning says so and the slot falls back to a plain registration)."""
    if not available():
        return None
    mb, sm = host.comfy_module("comfy.model_base"), host.comfy_module("comfy.supported_models")
    mp = host.comfy_module("comfy.model_patcher")
    dit, residency = slot.dit, slot.residency
    streamer = residency.streamers.get("dit")
    blocks = list(streamer.blocks) if streamer is not None else []
    try:
        mc = sm.ZImage(_unet_config(dit.cfg))
        mc.set_inference_dtype(dit.dtype, None)
        model = _model_class(mb.Lumina2)(mc, device=None)
        model.diffusion_model = NativeDiT(dit, blocks, on_move=lambda: residency.finish("dit"))
        streamed = _streamed_keys(dit, blocks)
        size = sum(t.nbytes for k, t in model.state_dict().items() if k not in streamed)
        patcher = _patcher_class(mp.ModelPatcher)(
            model, load_device=load_device, offload_device=offload_device, size=size
        )
    except Exception as e:  # noqa: BLE001 - internal API of ComfyUI: fall back, never fatal
        host.warn_once(
            "bridge",
            "Z-Image: could not register the model as native Z-Image with ComfyUI (%s: %s); 'Z-Image Model -> "
            "MODEL' is unavailable.",
            type(e).__name__,
            e,
        )
        return None
    bridge = Bridge(slot, patcher, streamed)
    patcher.zimage_bridge = bridge
    return bridge


def core_model(view, controls=None):
    """A core ``MODEL`` for a :class:`~.handles.ZImageModel` view: a clone of its slot's base patcher carrying the
    view's LoRAs (ComfyUI weight patches, or the engine's for a quantized DiT) and ``controls`` (the view's
    ControlNets, a :class:`~.controlnet.BridgedControls`) in its transformer options."""
    bridge = getattr(view.slot, "bridge", None)
    if bridge is None:
        raise ZImageError(NEEDS_COMFYUI)
    clone = bridge.patcher.clone()
    if bridge.quantized:
        clone.engine_loras = tuple(view.loras)
    else:
        clone.engine_loras = ()
        for spec in view.loras:
            add_lora_patches(clone, spec)
    if controls is not None:
        clone.model_options.setdefault("transformer_options", {})[CONTROLS] = controls
    return clone
