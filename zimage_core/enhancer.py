"""The prompt enhancer: a local LLM rewrites a short idea into the long, layout-explicit prompts Z-Image learned.

Z-Image was fine-tuned on the output of a prompt enhancer (the report's "PE-aware" SFT: a frozen LLM with a
structured system prompt turns user prompts into detailed descriptions), so detailed prompts that spell out the
layout work best. This module runs such a rewrite locally, never over the network:

- :meth:`CausalLM.from_text_encoder` turns the loaded Z-Image text encoder into a causal LM. Qwen3-4B ties its
  output head to its input embeddings, and the encoder already holds the embeddings and the first
  ``n_layers - 1`` decoder layers, so only the last layer(s) and the final norm are read from the same weight
  file; every other module is shared (no second copy of the embeddings or of the 35 layers);
- :meth:`CausalLM.load` reads a separate local LLM instead: a Hugging Face folder (``config.json``, weights,
  tokenizer; any causal LM transformers knows) or a single Qwen3 ``.safetensors`` file.

Generation is seeded (a CPU ``torch.Generator``: the same tokens on every device for the same logits), greedy at
temperature 0, nucleus sampling otherwise, bounded by ``max_new_tokens``, and stops at ``<|im_end|>`` /
``<|endoftext|>`` / the tokenizer's EOS. The chat is Qwen3's (system + user turn, thinking switched off) and any
``<think>...</think>`` block in the answer is dropped.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, ZImageError
from .weights import WeightSource, materialize

__all__ = ["DEFAULT_SYSTEM_PROMPT", "CausalLM", "EnhanceResult", "build_tied_lm", "pick_token", "strip_think"]

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You turn a short image idea into a prompt for a text-to-image model that was trained on long, precise "
    "captions. Write one paragraph of 80 to 200 words, in the language of the idea. Cover, in this order: the main "
    "subject or subjects with concrete attributes (count, age, clothing, material, color, expression, pose); where "
    "each element sits in the frame (foreground or background, left, center or right, top or bottom) and how large "
    "it appears; the setting and background; the camera viewpoint, framing and lens; the lighting and time of day; "
    "the color palette and mood; the medium or style (photograph, oil painting, 3D render, flat illustration and so "
    "on). If the idea asks for visible text such as a sign, title or label, quote the exact words in double quotes "
    "and say where they appear and in what lettering. Keep every detail of the idea and never contradict it; add "
    "only plausible details that make the picture concrete. Output only the description: no preamble, no "
    "explanation, no lists or headings."
)
# Qwen3's chat template for a system + user turn, generation prompt on, thinking off.
QWEN3_CHAT = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_THINK = re.compile(r"<think>.*?</think>", re.S)
_QUANT_SUFFIXES = (".weight_scale", ".scale_weight", ".input_scale", ".scale_input", ".comfy_quant", ".weight_scale_2")


def strip_think(text: str) -> str:
    """Drop ``<think>...</think>`` blocks (and an unclosed one, or the tail of one opened in the prompt)."""
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def pick_token(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float) -> int:
    """Next token from float logits ``[V]``: argmax at temperature 0, else nucleus sampling with ``generator``.

    The probabilities are moved to the CPU before drawing, so a seed gives the same draw on every device.
    """
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / float(temperature), dim=-1).cpu()
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < float(top_p)  # the first token always stays
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class EnhanceResult:
    text: str  # the rewritten prompt (thinking removed, stripped)
    raw: str  # everything the model generated, decoded
    prompt_tokens: int
    new_tokens: int
    finished: bool  # stopped at an end token (False: cut at max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Building the LM
# ---------------------------------------------------------------------------------------------
def _lm_config(base, n_layers: int):
    """A Qwen3 causal-LM config: ``base`` (a Qwen3Config) with ``n_layers`` layers, tied head, KV cache on."""
    from transformers import Qwen3Config

    d = base.to_dict()
    for k in ("layer_types", "architectures", "_name_or_path", "transformers_version", "model_type"):
        d.pop(k, None)
    d.update(num_hidden_layers=n_layers, tie_word_embeddings=True, use_cache=True)
    return Qwen3Config(**d)


def _getters(view: WeightSource, wanted: Callable[[str], str | None], where) -> dict:
    """``{module key: getter}`` for the keys ``wanted`` maps (fp8 "scaled" weights are dequantized)."""
    out = {}
    for k in view:
        name = wanted(k)
        if name is None or k.endswith(_QUANT_SUFFIXES):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        scale = next((base + s for s in (".weight_scale", ".scale_weight") if base and base + s in view), None)
        if scale is None:
            out[name] = lambda k=k: view[k]
        elif view.dtype_name(k).startswith("F8") and base + ".weight_scale_2" not in view:
            out[name] = lambda k=k, s=scale: _dequant(view[k], view[s])
        else:
            raise CheckpointError(
                f"prompt enhancer: '{where}' stores '{k}' in a quantized format this loader does "
                "not read; use qwen_3_4b.safetensors (bf16)."
            )
    return out


def _dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = s.float()
    if s.ndim == 1 and s.numel() == w.shape[0] and s.numel() > 1:
        s = s[:, None]
    return w.float() * s


def build_tied_lm(text_encoder):
    """A ``transformers.Qwen3ForCausalLM`` over a loaded :class:`~zimage_core.text_encoder.TextEncoder`.

    Shares the encoder's embeddings, decoder layers and RoPE; reads only the remaining layer(s) and the final
    norm from ``text_encoder.source``; the output head is the embedding matrix itself (Qwen3-4B's tied head).
    Returns ``(lm, extra)``: ``extra`` holds the modules the encoder does not have (to move them with it).
    """
    from transformers import Qwen3ForCausalLM

    from .text_encoder import qwen3_weight_view

    enc = text_encoder.model
    if enc is None:
        raise ZImageError("the text encoder was unloaded; load it again to use the prompt enhancer.")
    source = text_encoder.source
    if source is None:
        raise ZImageError(
            "this text encoder does not know its weight file, so its last layer cannot be read; load "
            "it with Z-Image Text Encoder Loader (or give the enhancer a separate LLM)."
        )
    n_all, n_run = text_encoder.config.n_layers, len(enc.layers)
    hf_cfg = _lm_config(enc.config, n_all)
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(hf_cfg)
    lm.model.embed_tokens = enc.embed_tokens
    for i, layer in enumerate(enc.layers):
        lm.model.layers[i] = layer
    lm.model.rotary_emb = enc.rotary_emb
    extra = torch.nn.Module()
    extra.layers = torch.nn.ModuleList(lm.model.layers[n_run:])
    extra.norm = lm.model.norm

    def wanted(key: str) -> str | None:
        if key == "norm.weight":
            return key
        m = re.match(r"layers\.(\d+)\.(.+)$", key)
        if m and int(m.group(1)) >= n_run:
            return f"layers.{int(m.group(1)) - n_run}.{m.group(2)}"
        return None

    view = qwen3_weight_view(WeightSource.open(source, what="prompt enhancer"), source)
    p = enc.embed_tokens.weight
    materialize(extra, _getters(view, wanted, source), p.dtype, p.device, what="prompt enhancer (last layer + norm)")
    lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.eval().requires_grad_(False)
    log.info(
        "prompt enhancer: causal LM over the text encoder (%d shared layers, %d read from '%s')",
        n_run,
        n_all - n_run,
        source,
    )
    return lm, extra


def _load_qwen3_file(path: Path, dtype: torch.dtype, device):
    """A full Qwen3 causal LM from one safetensors file (ComfyUI layout), head tied unless the file has one."""
    from transformers import Qwen3ForCausalLM

    from .text_encoder import build_qwen3, infer_text_encoder_config, qwen3_weight_view

    src = WeightSource.open(path, what="prompt enhancer")
    view = qwen3_weight_view(src, path)
    cfg = infer_text_encoder_config({k: view.shape(k) for k in view})
    base, buffers = build_qwen3(cfg, cfg.n_layers)
    hf_cfg = _lm_config(base.config, cfg.n_layers)
    head = next((k for k in ("lm_head.weight", "model.lm_head.weight") if k in src), None)
    hf_cfg.tie_word_embeddings = head is None
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(hf_cfg)
    getters = _getters(view, lambda k: "model." + k, path)
    getters.update({f"model.{n}": (lambda b=b: b) for n, b in buffers.items()})
    if head is not None:
        getters["lm_head.weight"] = lambda: src[head]
    materialize(lm, getters, dtype, device, keep_dtype=lambda n: "rotary_emb." in n, what="prompt enhancer")
    if head is None:  # tied: named_parameters() lists the shared matrix once, as the embeddings
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return lm.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The enhancer
# ---------------------------------------------------------------------------------------------
class CausalLM:
    """A causal LM + tokenizer that rewrites prompts (see the module docstring)."""

    def __init__(self, model, tokenizer, extra: torch.nn.Module | None = None, chat_template: str | None = QWEN3_CHAT):
        self.model = model
        self.tokenizer = tokenizer
        self.extra = extra
        self.chat_template = chat_template  # None: the tokenizer's own chat template
        vocab = tokenizer.get_vocab()
        self.vocab_limit = min(model.get_output_embeddings().weight.shape[0], len(tokenizer))
        ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self.stop_ids = {i for i in ids if i < self.vocab_limit}
        self._think = (vocab.get("<think>"), vocab.get("</think>"))
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def from_text_encoder(cls, text_encoder) -> CausalLM:
        lm, extra = build_tied_lm(text_encoder)
        return cls(lm, text_encoder.tokenizer, extra=extra)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tokenizer=None,
        comfy_tokenizer_dir: str | os.PathLike | None = None,
    ) -> CausalLM:
        """A separate local LLM: a Hugging Face folder (config.json + weights + tokenizer) or a Qwen3 file."""
        from .tokenizer import find_tokenizer, load_tokenizer

        p = Path(path).expanduser()
        if not p.exists():
            raise CheckpointError(
                f"prompt enhancer: the LLM '{p}' does not exist. Put a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files) or a Qwen3 .safetensors file there."
            )
        if p.is_dir() and (p / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            try:
                try:
                    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
                except TypeError:  # transformers 4.x
                    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f"prompt enhancer: cannot load the LLM folder '{p}' ({type(e).__name__}: {e})."
                ) from e
            model = model.to(device).eval().requires_grad_(False)
            if tokenizer is None:
                tokenizer = load_tokenizer(find_tokenizer(None, p, comfy_tokenizer_dir))
            template = None if getattr(tokenizer, "chat_template", None) else QWEN3_CHAT
            return cls(model, tokenizer, chat_template=template)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(find_tokenizer(tokenizer, p, comfy_tokenizer_dir))
        return cls(_load_qwen3_file(p, dtype, device), tokenizer)

    # ---- placement -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _follow(self) -> None:
        """Keep the LM's own modules where the (shared) encoder weights are now."""
        if self.extra is None:
            return
        embed = self.model.get_input_embeddings().weight
        p = next(self.extra.parameters())
        if p.device != embed.device or p.dtype != embed.dtype:
            self.extra.to(embed.device, embed.dtype)

    # ---- text ----------------------------------------------------------------------------
    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        system = DEFAULT_SYSTEM_PROMPT if not system else system
        if self.chat_template is None:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
            except Exception as e:  # noqa: BLE001 - a broken template in a user's folder
                raise ZImageError(f"prompt enhancer: the LLM's chat template failed ({type(e).__name__}: {e}).") from e
        else:
            text = self.chat_template.format(system=system, prompt=prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> tuple[str, str]:
        """(clean text, raw text) for generated ``ids``; thinking is removed from the clean text."""
        raw = self.tokenizer.decode(ids, skip_special_tokens=False)
        start, end = self._think
        if end is not None and end in ids:
            ids = ids[len(ids) - ids[::-1].index(end) :]
        if start is not None and start in ids:
            ids = ids[: ids.index(start)]
        return strip_think(self.tokenizer.decode(ids, skip_special_tokens=True)), raw

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        cancel: Callable[[], None] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> tuple[list[int], bool]:
        """New token ids (end token excluded) and whether an end token was reached."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ZImageError(f"max_new_tokens must be a positive number, got {max_new_tokens!r}.")
        if not 0.0 < float(top_p) <= 1.0:
            raise ZImageError(f"top_p must be in (0, 1], got {top_p}.")
        if temperature < 0:
            raise ZImageError(f"temperature must be 0 (greedy) or more, got {temperature}.")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(input_ids) >= limit:
            raise ZImageError(f"the prompt is {len(input_ids)} tokens long; this LLM reads at most {limit}.")
        if limit is not None:
            max_new_tokens = min(max_new_tokens, limit - len(input_ids))
        self._follow()
        gen = torch.Generator("cpu").manual_seed(int(seed))
        dev = self.device
        x = torch.tensor([input_ids], dtype=torch.long, device=dev)
        kw = {"logits_to_keep": 1} if self._keep_arg else {}
        past, out_ids, finished = None, [], False
        with torch.inference_mode():
            for i in range(max_new_tokens):
                if cancel is not None:
                    cancel()
                out = self.model(input_ids=x, past_key_values=past, use_cache=True, **kw)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                if self.vocab_limit < logits.shape[0]:
                    logits[self.vocab_limit :] = float("-inf")  # rows the tokenizer cannot decode
                tok = pick_token(logits, gen, float(temperature), float(top_p))
                if tok in self.stop_ids:
                    finished = True
                    break
                out_ids.append(tok)
                if on_token is not None:
                    on_token(i + 1, max_new_tokens)
                x = torch.tensor([[tok]], dtype=torch.long, device=dev)
        return out_ids, finished

    def enhance(
        self,
        prompt: str,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int = 0,
        system: str | None = None,
        cancel: Callable[[], None] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> EnhanceResult:
        """Rewrite ``prompt`` (see :data:`DEFAULT_SYSTEM_PROMPT`)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ZImageError("the prompt to enhance is empty; type a short idea first.")
        ids = self.chat_ids(prompt, system)
        new, finished = self.generate(ids, max_new_tokens, temperature, top_p, seed, cancel, on_token)
        text, raw = self.decode(new)
        return EnhanceResult(text=text, raw=raw, prompt_tokens=len(ids), new_tokens=len(new), finished=finished)
