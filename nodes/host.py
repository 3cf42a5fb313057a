"""Everything the nodes take from ComfyUI, imported lazily and guarded.

Each helper works where ComfyUI is absent (the test suite, a plain Python session) and then does the
obvious thing: no progress bar, no previews, no interruption, devices picked by PyTorch. Nothing here
is imported at module load, so ``import nodes`` never needs ComfyUI; every call imports what it needs
(a cached dictionary look-up after the first time), which also lets the tests put stand-ins in
``sys.modules``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()


def comfy_module(name: str):
    """The ComfyUI module ``name`` (``folder_paths``, ``comfy.utils``...) or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mm_device(fn_name: str, fallback: Callable[[], torch.device]) -> torch.device:
    mm = comfy_module("comfy.model_management")
    fn = getattr(mm, fn_name, None) if mm is not None else None
    if fn is None:
        return fallback()
    return torch.device(fn())


def dit_devices() -> tuple[torch.device, torch.device]:
    """(load device, offload device) for the diffusion model: ComfyUI's choice inside ComfyUI."""
    load = _mm_device("get_torch_device", _default_device)
    return load, _mm_device("unet_offload_device", lambda: load)


def text_encoder_devices() -> tuple[torch.device, torch.device]:
    load = _mm_device("text_encoder_device", _default_device)
    return load, _mm_device("text_encoder_offload_device", lambda: load)


def bf16_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    mm = comfy_module("comfy.model_management")
    fn = getattr(mm, "should_use_bf16", None) if mm is not None else None
    if fn is not None:
        try:
            return bool(fn(device))
        except Exception:  # noqa: BLE001 - the signature changed over the years
            pass
    return bool(torch.cuda.is_bf16_supported())


# ---------------------------------------------------------------------------------------------
# Memory management
# ---------------------------------------------------------------------------------------------
class ManagedModule(torch.nn.Module):
    """A plain holder ComfyUI's ModelPatcher can move: it sets ``device`` and bookkeeping attributes on
    the module it manages, which the engine's models (read-only ``device`` properties) must not get.

    With ``parts`` (``(modules, [(owner, name, tensor)])``) it holds only those: a model that streams some
    blocks from host memory shows ComfyUI just its resident part, so ComfyUI counts (and moves) only that.
    ``on_move`` runs before any move (a streamer drops its staged copies, e.g. on "Unload models").
    """

    def __init__(self, inner: torch.nn.Module, device: torch.device, parts=None, on_move: Callable | None = None):
        super().__init__()
        self._loose_buffers: list = []
        if parts is None:
            self.inner = inner
        else:
            object.__setattr__(self, "inner", inner)  # reachable, but not a submodule: its streamed blocks stay ours
            modules, loose = parts
            self.parts = torch.nn.ModuleList(modules)
            for i, (owner, key, _t) in enumerate(loose):
                if key in owner._parameters:
                    self.register_parameter(f"loose_{i}", owner._parameters[key])
                else:
                    self._loose_buffers.append((owner, key))
        self.device = device
        object.__setattr__(self, "_on_move", on_move)

    def _apply(self, fn, recurse=True):
        if self._on_move is not None:
            self._on_move()
        out = super()._apply(fn, recurse)
        for owner, key in self._loose_buffers:
            owner._buffers[key] = fn(owner._buffers[key])
        return out

    def get_dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype


def register(
    module: torch.nn.Module,
    load_device: torch.device,
    offload_device: torch.device,
    parts=None,
    on_move: Callable | None = None,
):
    """Wrap ``module`` in a ComfyUI ModelPatcher so "Unload models", "Free memory" and other models'
    loads can move it to the offload device. Returns None outside ComfyUI (or if this ComfyUI's
    ModelPatcher does not accept a plain module; then the model stays where it is and a warning says so).
    ``parts``/``on_move``: see :class:`ManagedModule` (block streaming registers only the resident part)."""
    mp = comfy_module("comfy.model_patcher")
    if mp is None:
        return None
    try:
        holder = ManagedModule(module, next(module.parameters()).device, parts, on_move)
        return mp.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)
    except Exception as e:  # noqa: BLE001 - internal API of ComfyUI: never fatal
        warn_once(
            "register",
            "Z-Image: could not register a model with ComfyUI's memory management (%s: %s); "
            "'Unload models' will not move it.",
            type(e).__name__,
            e,
        )
        return None


def load(
    patcher, module: torch.nn.Module, device: torch.device, mover: Callable | None = None, memory_required: int = 0
) -> torch.device:
    """Put a model on its compute device, through ComfyUI (evicting others as needed) when registered.

    ``mover(device)`` replaces ``module.to(device)`` (a streamed model moves only its resident part);
    ``memory_required`` asks ComfyUI for that much room beyond the registered weights (staging buffers,
    activations). Returns the device the weights are on afterwards."""
    move = mover or module.to
    if patcher is not None:
        mm = comfy_module("comfy.model_management")
        extra = {"memory_required": int(memory_required)} if memory_required else {}
        try:
            try:
                mm.load_models_gpu([patcher], force_full_load=True, **extra)
            except TypeError:  # ComfyUI before force_full_load (2024)
                mm.load_models_gpu([patcher], **extra)
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ == "InterruptProcessingException" or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            warn_once(
                "load", "Z-Image: ComfyUI could not load the model (%s: %s); moving it by hand.", type(e).__name__, e
            )
            move(device)
    else:
        move(device)
    return next(module.parameters()).device


@contextlib.contextmanager
def loads_restored() -> Iterator[None]:
    """Around a load nested in a sampling run (a VAE encode from inside the model's forward): the models ComfyUI
    had loaded for the run are loaded again afterwards, in case the nested load evicted them (as native ComfyUI's
    model patches do). Nothing outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    before = mm.loaded_models(only_currently_used=True) if mm is not None and hasattr(mm, "loaded_models") else []
    yield
    if before:
        mm.load_models_gpu(before)


def vram_budget(device: torch.device) -> int | None:
    """Bytes a model may plan to use on ``device``: inside ComfyUI the whole card less ComfyUI's inference reserve
    (ComfyUI evicts other models to make room), elsewhere the free memory; None for the CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    mm = comfy_module("comfy.model_management")
    total = getattr(mm, "get_total_memory", None) if mm is not None else None
    if total is not None:
        try:
            reserve = mm.minimum_inference_memory() if hasattr(mm, "minimum_inference_memory") else 0
            return int(total(device)) - int(reserve)
        except Exception as e:  # noqa: BLE001 - internal API of ComfyUI
            warn_once("budget", "Z-Image: could not read ComfyUI's memory figures (%s); using free VRAM.", e)
    return int(torch.cuda.mem_get_info(device)[0])


# ---------------------------------------------------------------------------------------------
# Progress, previews, cancel, node text
# ---------------------------------------------------------------------------------------------
def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (no-op elsewhere)."""
    mm = comfy_module("comfy.model_management")
    if mm is not None and hasattr(mm, "throw_exception_if_processing_interrupted"):
        mm.throw_exception_if_processing_interrupted()


def cancel_check() -> bool:
    """For the engine's ``cancel`` hook: polled before every step. Inside ComfyUI an interrupt raises
    ComfyUI's own exception (so the run ends as 'interrupted', not as an error)."""
    throw_if_interrupted()
    return False


def step_callback(steps: int, device: torch.device) -> Callable | None:
    """``callback(i, total, x, denoised)`` for the engine's samplers: progress bar + latent previews.

    Previews use ComfyUI's own previewer for the Flux latent format (Latent2RGB or TAESD ``taef1``), so the
    global preview setting (``--preview-method`` / the settings dialog) is respected. The progress hook
    is also ComfyUI's cancellation point.
    """
    lp = comfy_module("latent_preview")
    formats = comfy_module("comfy.latent_formats")
    if lp is not None and formats is not None and hasattr(formats, "Flux"):
        try:
            shim = SimpleNamespace(load_device=device, model=SimpleNamespace(latent_format=formats.Flux()))
            cb = lp.prepare_callback(shim, steps)
            return lambda i, total, x, denoised: cb(i, denoised, x, total)
        except Exception as e:  # noqa: BLE001 - previews are never worth failing a run
            warn_once("preview", "Z-Image: latent previews unavailable (%s: %s).", type(e).__name__, e)
    utils = comfy_module("comfy.utils")
    if utils is not None and hasattr(utils, "ProgressBar"):
        bar = utils.ProgressBar(steps)
        return lambda i, total, x, denoised: bar.update_absolute(i + 1, total)
    return None


def send_text(node_id, text: str) -> None:
    """Show ``text`` on the node in the UI (ComfyUI's progress text; ignored where unsupported)."""
    if node_id is None:
        return
    server = comfy_module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and hasattr(instance, "send_progress_text"):
        try:
            instance.send_progress_text(text, node_id)
        except Exception:  # noqa: BLE001, S110 - a UI nicety only
            pass


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled Qwen2.5 tokenizer folder (``comfy/text_encoders/qwen25_tokenizer``), if any."""
    utils = comfy_module("comfy.utils")
    candidates = []
    if utils is not None and getattr(utils, "__file__", None):
        candidates.append(Path(utils.__file__).resolve().parent / "text_encoders" / "qwen25_tokenizer")
    fp = comfy_module("folder_paths")
    if fp is not None and getattr(fp, "base_path", None):
        candidates.append(Path(fp.base_path) / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return next((c for c in candidates if c.is_dir()), None)
