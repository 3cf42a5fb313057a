"""ZImagePromptEnhancer: a short idea in, the detailed, layout-explicit prompt Z-Image was trained on out (STRING).

By default the loaded Qwen3-4B text encoder generates (its head is tied to its embeddings; only its last layer
and final norm are read in addition, see ``zimage_core.enhancer``). A separate local LLM can be picked instead.
Nothing goes over the network. The result is shown in the node and returned as a STRING for Z-Image Text Encode.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

from ..zimage_core import enhancer, validate
from ..zimage_core.errors import ZImageError
from . import checks, host, paths
from .checks import node_errors
from .edit import hf_folders
from .handles import ZImageTextEncoderHandle
from .loaders import pick_dtype

log = logging.getLogger(__name__)

USE_TEXT_ENCODER = "(text encoder)"
LLM_KIND = "LLM"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
# Widget ranges, checked again in the node (an API prompt or a linked value skips the widget's own limits).
MAX_NEW_TOKENS = {"min": 1, "max": 4096}
TEMPERATURE = {"min": 0.0, "max": 2.0}
TOP_P = {"min": 0.05, "max": 1.0}


def llm_folders() -> dict[str, Path]:
    """Hugging Face causal-LM folders (config.json + safetensors) in ComfyUI/models/LLM."""
    return hf_folders(LLM_KIND)


def llm_choices() -> list[str]:
    names = [USE_TEXT_ENCODER] + sorted(llm_folders())
    return names + [n for n in paths.list_models("text_encoders") if n not in names]


def resolve_llm(name: str) -> Path:
    folders = llm_folders()
    if name in folders:
        return folders[name]
    try:
        return paths.resolve("text_encoders", name)
    except ZImageError:
        raise ZImageError(
            f"LLM '{name}' was not found. Put a Hugging Face model folder (config.json, *.safetensors, tokenizer "
            "files) in ComfyUI/models/LLM, or a Qwen3 .safetensors in ComfyUI/models/text_encoders, and refresh."
        ) from None


class ZImagePromptEnhancer:
    DESCRIPTION = (
        "Rewrites a short prompt into the long, detailed, layout-explicit description Z-Image was trained on (the "
        "paper's prompt enhancer): subjects, positions in the frame, setting, camera, light, palette, style, quoted "
        "text. Runs locally on the Z-Image text encoder (Qwen3-4B) or on a separate local LLM; never online. The same "
        "seed gives the same text; temperature 0 is deterministic greedy decoding. Connect the output to Z-Image "
        "Text Encode's text."
    )
    CATEGORY = "Z-Image/conditioning"
    FUNCTION = "enhance"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The rewritten prompt, for Z-Image Text Encode (convert its text widget to an input).",)

    def __init__(self):
        self._tied = None  # (weakref to the TextEncoder, CausalLM over it)
        self._llm = None  # (path, dtype, CausalLM, memory patcher)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The short idea to expand, e.g. 'a cozy bookshop cafe on a rainy "
                        'evening, sign reading "Chapter One"\'.',
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "Seed of the sampling (drawn on the CPU). Same seed, same text.",
                    },
                ),
                "max_new_tokens": (
                    "INT",
                    {
                        "default": 512,
                        **MAX_NEW_TOKENS,
                        "step": 1,
                        "tooltip": "Upper bound on the length of the rewrite, in tokens (about "
                        "0.75 words each). Generation stops earlier at the end of "
                        "the answer.",
                    },
                ),
                "temperature": (
                    "FLOAT",
                    {
                        "default": 0.7,
                        **TEMPERATURE,
                        "step": 0.05,
                        "tooltip": "Randomness: 0 = greedy (always the most likely word); "
                        "0.5-0.9 gives varied rewrites per seed.",
                    },
                ),
                "top_p": (
                    "FLOAT",
                    {
                        "default": 0.9,
                        **TOP_P,
                        "step": 0.01,
                        "tooltip": "Nucleus sampling: only the most likely words covering this much "
                        "probability are drawn from (1 = all).",
                    },
                ),
            },
            "optional": {
                "text_encoder": (
                    "ZIMAGE_TEXT_ENCODER",
                    {
                        "tooltip": "The Z-Image text encoder (Z-Image Text Encoder Loader): its own weights generate; "
                        "only its last layer is read in addition."
                    },
                ),
                "llm": (
                    llm_choices(),
                    {
                        "default": USE_TEXT_ENCODER,
                        "tooltip": "A separate local LLM instead of the text encoder: a Hugging Face folder in "
                        "ComfyUI/models/LLM, or a Qwen3 file in models/text_encoders.",
                    },
                ),
                "system_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Instructions for the LLM; empty = the built-in ones "
                        "(detailed, layout-explicit descriptions).",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # ---- models --------------------------------------------------------------------------
    def _tied_lm(self, handle: ZImageTextEncoderHandle):
        encoder = handle.ready()
        if self._tied is not None and self._tied[0]() is encoder:
            return self._tied[1]
        lm = enhancer.CausalLM.from_text_encoder(encoder)
        self._tied = (weakref.ref(encoder), lm)
        return lm

    def _separate_lm(self, name: str):
        path = resolve_llm(name)
        load_device, offload_device = host.text_encoder_devices()
        dtype = pick_dtype("auto", load_device)
        if self._llm is None or self._llm[:2] != (path, dtype):
            self._llm = None
            inside = host.comfy_module("comfy.model_patcher") is not None
            lm = enhancer.CausalLM.load(
                path,
                dtype=dtype,
                device=offload_device if inside else load_device,
                comfy_tokenizer_dir=host.comfy_tokenizer_dir(),
            )
            self._llm = (path, dtype, lm, host.register(lm.model, load_device, offload_device))
        _, _, lm, patcher = self._llm
        host.load(patcher, lm.model, load_device)
        return lm

    # ---- run -----------------------------------------------------------------------------
    @node_errors("Z-Image Prompt Enhancer")
    def enhance(
        self,
        prompt,
        seed,
        max_new_tokens,
        temperature,
        top_p,
        text_encoder=None,
        llm=USE_TEXT_ENCODER,
        system_prompt="",
        unique_id=None,
    ):
        if not checks.text("prompt", prompt).strip():
            raise ZImageError("the prompt is empty; type a short idea to expand.")
        seed = validate.seed(seed)
        max_new_tokens = checks.whole("max_new_tokens", max_new_tokens, MAX_NEW_TOKENS)
        temperature = checks.number("temperature (0 = greedy)", temperature, TEMPERATURE)
        top_p = checks.number("top_p", top_p, TOP_P)
        system_prompt = checks.text("system_prompt", "" if system_prompt is None else system_prompt)
        if not isinstance(llm, (str, type(None))):
            raise ZImageError(f"llm must be a name from the list, got {type(llm).__name__}.")
        if llm not in (None, "", USE_TEXT_ENCODER):
            lm = self._separate_lm(llm)
        elif isinstance(text_encoder, ZImageTextEncoderHandle):
            lm = self._tied_lm(text_encoder)
        elif text_encoder is None:
            raise ZImageError(
                "nothing to generate with: connect Z-Image Text Encoder Loader to text_encoder, or pick "
                "a separate LLM in 'llm'."
            )
        else:
            raise ZImageError(
                f"the text_encoder input is {type(text_encoder).__name__}, not a Z-Image text encoder; "
                "connect Z-Image Text Encoder Loader to it."
            )
        bar = _progress_bar(max_new_tokens)
        result = lm.enhance(
            prompt,
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            seed=int(seed),
            system=system_prompt or None,
            cancel=host.throw_if_interrupted,
            on_token=(lambda i, n: bar.update_absolute(i, n)) if bar is not None else None,
        )
        text = result.text
        if not text:
            log.warning("Z-Image Prompt Enhancer: the LLM produced no text; the original prompt is used.")
            text = prompt
            note = "The LLM produced no text (raise max_new_tokens?); the original prompt is passed on."
        elif not result.finished:
            note = f"Cut at max_new_tokens ({max_new_tokens}); raise it for a complete rewrite."
        else:
            note = f"{result.new_tokens} tokens"
        host.send_text(unique_id, note)
        log.info("Z-Image Prompt Enhancer: %s", note)
        return {"ui": {"text": [text]}, "result": (text,)}


def _progress_bar(total: int):
    utils = host.comfy_module("comfy.utils")
    if utils is None or not hasattr(utils, "ProgressBar"):
        return None
    return utils.ProgressBar(total)
