"""Text encoding into core ``CONDITIONING``, and reading ``CONDITIONING`` back for the sampler.

The form is native ComfyUI's for Z-Image (``CLIPTextEncode`` with the lumina2/Qwen3-4B CLIP):
``[[cond, {"pooled_output": None, "attention_mask": mask}]]`` with ``cond`` float32 ``[1, L, 2560]`` (the
templated prompt's hidden_states[-2], every token) and ``mask`` int64 ``[1, L]`` of ones. Core conditioning
nodes (ConditioningZeroOut, ConditioningConcat, ConditioningSetTimestepRange...) therefore work on it, and
native Z-Image conditioning works in the Z-Image sampler.
"""

from __future__ import annotations

import logging

import torch

from ..zimage_core.errors import ZImageError
from . import checks, host
from .checks import node_errors
from .handles import ZImageTextEncoderHandle

log = logging.getLogger(__name__)

CATEGORY = "Z-Image/conditioning"
DEFAULT_MAX_LENGTH = 512  # diffusers' and the CLI's limit (template included); 0 = no limit, as native ComfyUI
MAX_LENGTH = {"min": 0, "max": 32768}  # the widget's range, checked again in the node


class ZImageTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with Z-Image's Qwen3-4B text encoder into a core CONDITIONING, the same form native "
        "ComfyUI produces for Z-Image, so core conditioning nodes work on it. Prompts longer than max_length tokens "
        "are cut like the reference pipeline; the node then shows how many tokens were dropped."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The encoded prompt, for Z-Image Sampler's positive or negative input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (
                    "ZIMAGE_TEXT_ENCODER",
                    {"tooltip": "The text encoder from Z-Image Text Encoder Loader."},
                ),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The prompt. Z-Image understands long, detailed descriptions (English or Chinese).",
                    },
                ),
                "max_length": (
                    "INT",
                    {
                        "default": DEFAULT_MAX_LENGTH,
                        **MAX_LENGTH,
                        "step": 1,
                        "tooltip": "Token limit including the chat template (512 as in the reference "
                        "pipeline and the zimage CLI); 0 = no limit, as native ComfyUI.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @node_errors("Z-Image Text Encode")
    def encode(self, text_encoder, text, max_length=DEFAULT_MAX_LENGTH, unique_id=None):
        if not isinstance(text_encoder, ZImageTextEncoderHandle):
            raise ZImageError(
                f"the text_encoder input is {type(text_encoder).__name__}, not a Z-Image text encoder; "
                "connect Z-Image Text Encoder Loader to it."
            )
        text = checks.text("text", text)
        max_length = checks.whole("max_length (0 = no limit)", max_length, MAX_LENGTH)
        result = text_encoder.encode([text], max_length=max_length or None)
        emb = result.embeddings[0]
        cond = emb.to(device=host_intermediate_device(), dtype=torch.float32).unsqueeze(0)
        mask = torch.ones((1, cond.shape[1]), dtype=torch.long, device=cond.device)
        n, cut = result.n_tokens[0], result.n_cut[0]
        if cut:
            msg = (
                f"Prompt cut: {n + cut} tokens (with the template) is over max_length {max_length}; the last {cut} "
                f"tokens were dropped. Shorten the prompt or raise max_length (0 = no limit)."
            )
            log.warning("Z-Image Text Encode: %s", msg)
            host.send_text(unique_id, msg)
        else:
            host.send_text(unique_id, f"{n} tokens (with the template)")
        return ([[cond, {"pooled_output": None, "attention_mask": mask}]],)


def host_intermediate_device() -> torch.device:
    mm = host.comfy_module("comfy.model_management")
    fn = getattr(mm, "intermediate_device", None) if mm is not None else None
    return torch.device(fn()) if fn is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# CONDITIONING -> per-sample caption features
# ---------------------------------------------------------------------------------------------
IGNORED_KEYS = (
    "area",
    "mask",
    "strength",
    "set_area_to_bounds",
    "mask_strength",
    "control",
    "gligen",
    "hooks",
    "start_percent",
    "end_percent",
)


def caption_features(conditioning, which: str, batch: int, feat_dim: int) -> list[torch.Tensor]:
    """``[L_i, feat_dim]`` float32 caption features for each of ``batch`` latents.

    Accepts one entry ``[cond [n, L, D], opts]``; ``n`` is 1 (shared by the batch) or the batch size. An
    ``attention_mask`` in ``opts`` drops padded tokens, as native ComfyUI's Z-Image does.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ZImageError(f"the {which} input is empty or not a CONDITIONING; connect Z-Image Text Encode to it.")
    if len(conditioning) > 1:
        raise ZImageError(
            f"the {which} conditioning has {len(conditioning)} entries (from Conditioning (Combine) or area "
            "conditioning); the Z-Image sampler takes one. Use Conditioning (Concat) or a single text encode."
        )
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not torch.is_tensor(entry[0]):
        raise ZImageError(f"the {which} input is not a CONDITIONING ([[tensor, dict]]); connect Z-Image Text Encode.")
    cond, opts = entry[0], entry[1] or {}
    if cond.ndim == 2:
        cond = cond.unsqueeze(0)
    if cond.ndim != 3 or cond.shape[-1] != feat_dim:
        raise ZImageError(
            f"the {which} conditioning has shape {tuple(cond.shape)}, but this Z-Image model expects [1, tokens, "
            f"{feat_dim}]: it was encoded by another text encoder. Use Z-Image Text Encode with qwen_3_4b, or "
            "CLIPTextEncode with a lumina2-type Qwen3-4B CLIP."
        )
    used = [k for k in IGNORED_KEYS if opts.get(k) is not None]
    if used:
        host.warn_once(f"ignored-{'-'.join(used)}", "Z-Image sampler ignores conditioning options %s.", used)
    n = cond.shape[0]
    if n not in (1, batch):
        raise ZImageError(
            f"the {which} conditioning holds {n} prompts for a batch of {batch} latents; "
            "give one prompt, or one per latent."
        )
    mask = opts.get("attention_mask")
    feats = []
    for i in range(batch):
        row = cond[0 if n == 1 else i].float()
        if torch.is_tensor(mask) and mask.ndim >= 1:
            m = mask.reshape(-1, mask.shape[-1])
            m = m[0 if m.shape[0] == 1 else min(i, m.shape[0] - 1)]
            if m.shape[0] == row.shape[0]:
                row = row[m.to(torch.bool)]
        if row.shape[0] == 0:
            raise ZImageError(f"the {which} conditioning has no tokens; encode a prompt (it may be empty text).")
        feats.append(row)
    return feats
