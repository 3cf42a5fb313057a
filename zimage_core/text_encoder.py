"""The Qwen3-4B text encoder of Z-Image, exactly as diffusers' ``ZImagePipeline._encode_prompt``.

Each prompt is wrapped in Qwen3's chat template (:data:`ZIMAGE_TEMPLATE`), tokenized, run through
Qwen3 and read at ``hidden_states[-2]``: the residual stream after decoder layer ``n_layers - 2``,
*without* the final norm. The model is therefore built with ``n_layers - 1`` layers and an identity
norm, and the last layer, ``model.norm`` and ``lm_head`` are never read from the file.

diffusers pads every prompt to 512 tokens; with right padding and causal attention the real rows
do not depend on the padding, so prompts are encoded at their real length instead (a batch is
right-padded only to its longest prompt, with an attention mask). Truncation at ``max_length``
(template included) matches diffusers token for token and is logged with the number of tokens cut.

Accepted weights: a diffusers model root (``text_encoder/`` + ``tokenizer/``), a ``text_encoder/``
folder (HF Qwen3 shards, keys with or without ``model.``), or ComfyUI's ``qwen_3_4b.safetensors``
(also inside all-in-one files under ``text_encoders.qwen3_4b.transformer.``, and its fp8 variant).
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .config import TextEncoderConfig
from .dit_layout import describe_wrong_file
from .dtypes import dtype_from_name
from .errors import CheckpointError, ZImageError
from .quant import load as qload
from .quant.modes import check_mode
from .tokenizer import find_tokenizer, load_tokenizer
from .weights import FileProbe, TensorInfo, WeightSource, materialize

__all__ = [
    "ZIMAGE_TEMPLATE",
    "EncodeResult",
    "TextEncoder",
    "find_tokenizer",
    "format_prompt",
    "infer_text_encoder_config",
    "qwen3_weight_view",
]

log = logging.getLogger(__name__)

# Qwen3's chat template for one user turn with add_generation_prompt=True, enable_thinking=True.
ZIMAGE_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
# ComfyUI all-in-one checkpoints store the text encoder under this prefix.
AIO_PREFIXES = ("text_encoders.qwen3_4b.transformer.",)
_KEPT_ROOTS = ("embed_tokens.", "layers.", "norm.")
_LAYER = re.compile(r"^layers\.(\d+)\.")
# ComfyUI fp8 files: "<layer>.weight" (float8) times "<layer>.weight_scale" (new) or ".scale_weight" (legacy).
_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
_QUANT_AUX_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant", ".weight_scale_2")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
TE_HELP = (
    "Z-Image needs the Qwen3-4B text encoder: 'qwen_3_4b.safetensors' in ComfyUI/models/text_encoders "
    "or given with --text-encoder (or the text_encoder/ folder of Tongyi-MAI/Z-Image-Turbo)."
)


def format_prompt(prompt: str) -> str:
    """The text Z-Image feeds to the tokenizer: no BOS, no system prompt."""
    return ZIMAGE_TEMPLATE.format(prompt=prompt)


# ---------------------------------------------------------------------------------------------
# Weights: key normalisation, recognition, config inference
# ---------------------------------------------------------------------------------------------
def _normalise_key(key: str, prefix: str) -> str | None:
    if prefix:
        if not key.startswith(prefix):
            return None
        key = key[len(prefix) :]
    if key.startswith("model."):
        key = key[len("model.") :]
    return key if key.startswith(_KEPT_ROOTS) else None  # lm_head, logit_scale, markers: hidden


def _describe(keys: list[str]) -> str:

    stripped = {k.removeprefix("model.diffusion_model.") for k in keys}
    if (
        "cap_embedder.1.weight" in stripped
        or "x_embedder.weight" in stripped
        or "all_x_embedder.2-1.weight" in stripped
    ):
        return "expected the Qwen3-4B text encoder, but the file holds a Z-Image/Lumina diffusion model (DiT)."
    return describe_wrong_file(keys, "the Qwen3-4B text encoder")


def qwen3_weight_view(src: WeightSource, where: str | os.PathLike = "") -> WeightSource:
    """A view of ``src`` with the Qwen3 keys ``embed_tokens.*``, ``layers.*``, ``norm.*``.

    Strips ``model.`` and the all-in-one prefix, hides everything else, and raises a
    :class:`CheckpointError` saying what the file is when it is not a Qwen3 text encoder.
    """
    raw = list(src)
    prefix = next((p for p in AIO_PREFIXES if any(k.startswith(p) for k in raw)), "")
    view = src.renamed(partial(_normalise_key, prefix=prefix))
    if "embed_tokens.weight" in view and "layers.0.self_attn.q_proj.weight" in view:
        if "layers.0.self_attn.q_norm.weight" not in view:
            hidden = view.shape("embed_tokens.weight")[1]
            raise CheckpointError(
                f"text encoder: '{where}' is a language model without per-head q_norm (hidden size {hidden}; "
                "Qwen2/Qwen2.5, Llama or Mistral-like), not Qwen3. " + TE_HELP
            )
        return view
    raise CheckpointError(f"text encoder: '{where}': {_describe(raw)} " + TE_HELP)


def infer_text_encoder_config(
    shapes: Mapping[str, tuple[int, ...]], hf_config: Mapping | None = None
) -> TextEncoderConfig:
    """Qwen3 sizes from normalised tensor shapes; rope/eps/positions/layer count from an HF config.json if given."""
    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
        q_rows = shapes["layers.0.self_attn.q_proj.weight"][0]
        kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
        inter = shapes["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as e:
        raise CheckpointError(
            f"text encoder: the checkpoint lacks tensor {e}; the file is truncated or not Qwen3."
        ) from e
    if q_rows % head_dim or kv_rows % head_dim:
        raise CheckpointError(
            f"text encoder: q/k projections ({q_rows}, {kv_rows} rows) do not fit head_dim {head_dim}."
        )
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    f = dict(
        hidden_size=hidden,
        vocab_size=vocab,
        n_layers=max(layer_ids) + 1,
        n_heads=q_rows // head_dim,
        n_kv_heads=kv_rows // head_dim,
        head_dim=head_dim,
        intermediate_size=inter,
    )
    hf = dict(hf_config or {})
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    for ours, value, kind in (
        ("rope_theta", rope, float),
        ("rms_norm_eps", hf.get("rms_norm_eps"), float),
        ("max_position_embeddings", hf.get("max_position_embeddings"), int),
        ("n_layers", hf.get("num_hidden_layers"), int),
    ):
        if value is not None:
            f[ours] = kind(value)
    return TextEncoderConfig(**f)


def layers_used(cfg: TextEncoderConfig) -> int:
    """How many decoder layers produce ``hidden_states[cfg.hidden_state_index]`` (35 for Qwen3-4B)."""
    n = cfg.n_layers + 1 + cfg.hidden_state_index
    if cfg.hidden_state_index >= -1 or n < 1:
        raise ValueError(f"hidden_state_index {cfg.hidden_state_index} is not supported for {cfg.n_layers} layers")
    return n


def build_qwen3(cfg: TextEncoderConfig, n_layers: int):
    """A meta-device ``transformers.Qwen3Model`` with ``n_layers`` layers and an identity final norm.

    Returns ``(model, buffers)``: ``buffers`` holds the real (CPU) non-persistent RoPE buffers.
    """
    from transformers import Qwen3Config, Qwen3Model

    kw = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=False,
        use_cache=False,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    if "rope_parameters" in inspect.signature(Qwen3Config.__init__).parameters:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kw["rope_theta"] = cfg.rope_theta
    hf_cfg = Qwen3Config(**kw)
    with torch.device("meta"):
        model = Qwen3Model(hf_cfg)
    model.norm = torch.nn.Identity()
    rotary = type(model.rotary_emb)(config=hf_cfg)  # built on the CPU: its buffers are computed, not loaded
    buffers = {f"rotary_emb.{n}": b for n, b in rotary.named_buffers()}
    return model, buffers


def _dequant_fp8(src: WeightSource, key: str, scale_key: str) -> torch.Tensor:
    w = src[key].float()
    s = src[scale_key].float()
    if s.ndim == 1 and s.numel() == w.shape[0] and s.numel() > 1:
        s = s[:, None]
    return w * s


def _weight_getters(view: WeightSource, n_run: int, where, skip: frozenset | set = frozenset()) -> dict:
    """``{model key: getter}`` for embed_tokens and layers ``0..n_run-1``; nothing else is ever read.

    ``skip``: quantized linear weights that :mod:`zimage_core.quant.load` builds itself.
    """
    getters = {}
    for k in view:
        m = re.match(r"layers\.(\d+)\.", k)
        if not (k == "embed_tokens.weight" or (m and int(m.group(1)) < n_run)) or k in skip:
            continue  # the last layer(s), the final norm
        if k.endswith(_SCALE_SUFFIXES + _QUANT_AUX_SUFFIXES):
            continue
        scale = next(
            (
                k[: -len(".weight")] + s
                for s in _SCALE_SUFFIXES
                if k.endswith(".weight") and k[: -len(".weight")] + s in view
            ),
            None,
        )
        if scale is None:
            getters[k] = partial(view.__getitem__, k)
        elif view.dtype_name(k) in _FP8_DTYPES and k[: -len(".weight")] + ".weight_scale_2" not in view:
            getters[k] = partial(_dequant_fp8, view, k, scale)
        else:
            raise CheckpointError(
                f"text encoder: '{where}' stores '{k}' quantized as {view.dtype_name(k)}, which is not supported "
                "(only bf16/fp16/fp32 and fp8 scaled files are). Use qwen_3_4b.safetensors (bf16)."
            )
    return getters


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file or folder, its HF config.json or None) for a model root, a folder or a file."""
    if path.is_dir() and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    cfg = path / "config.json" if path.is_dir() else None
    return path, (cfg if cfg is not None and cfg.is_file() else None)


def probe_text_encoder(
    path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, comfy_tokenizer_dir=None
) -> FileProbe:
    """What a Qwen3 text-encoder file holds, from its header: the config and the tensors the encoder would load
    (the embeddings and the layers that run). Finds the tokenizer too, so a missing one fails here."""
    p = Path(path).expanduser()
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        find_tokenizer(tokenizer, p, comfy_tokenizer_dir)
    weights, cfg_json = _locate(p)
    view = qwen3_weight_view(WeightSource.open(weights, what="text encoder"), p)
    shapes = {k: tuple(view.shape(k)) for k in view}
    hf = None
    if cfg_json is not None:
        try:
            hf = json.loads(cfg_json.read_text())
        except (OSError, ValueError):
            hf = None
    cfg = infer_text_encoder_config(shapes, hf)
    n_run = layers_used(cfg)
    tensors = {"embed_tokens.weight": TensorInfo(shapes["embed_tokens.weight"], quantizable=False)}
    for key, shape in shapes.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) < n_run:
            tensors[key] = TensorInfo(shape)
    return FileProbe(p, cfg, tensors, "qwen3")


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------
@dataclass
class EncodeResult:
    """Embeddings ``[L_i, hidden]`` per prompt, with the token counts (template included)."""

    embeddings: list[torch.Tensor]
    n_tokens: list[int] = field(default_factory=list)  # tokens encoded per prompt
    n_cut: list[int] = field(default_factory=list)  # tokens cut by max_length per prompt

    @property
    def truncated(self) -> bool:
        return any(self.n_cut)


class TextEncoder:
    """Qwen3 (first ``n_layers - 1`` layers) + tokenizer, with a small LRU cache of prompt embeddings."""

    def __init__(self, model, tokenizer, config: TextEncoderConfig, cache_size: int = 16, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.last_result: EncodeResult | None = None
        self.source: Path | None = None  # the weights file or folder (set by load; the prompt enhancer reads it)
        self._cache: OrderedDict[tuple[str, int | None, str | None], tuple[torch.Tensor, int, int]] = OrderedDict()
        p = next(model.parameters())
        self._device, self._dtype = p.device, p.dtype

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        tokenizer=None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        comfy_tokenizer_dir: str | os.PathLike | None = None,
        quant: str = "none",
    ) -> TextEncoder:
        """Load from a diffusers root, a ``text_encoder/`` folder or a single ``qwen_3_4b.safetensors``.

        ``tokenizer`` is a tokenizer folder, an already loaded tokenizer, or None to look one up
        (:func:`~zimage_core.tokenizer.find_tokenizer`; ``comfy_tokenizer_dir`` is the last resort).
        ``quant`` (``none``, ``int8``, ``nf4``, ``fp8``) quantizes the attention/MLP linears while loading;
        ComfyUI's fp8/int8 files keep their quantized linears either way (see :mod:`zimage_core.quant`).
        """
        mode = check_mode(quant)
        p = Path(path).expanduser()
        if isinstance(dtype, str):
            dtype = dtype_from_name(dtype)
        tok_dir = None
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_dir = find_tokenizer(tokenizer, p, comfy_tokenizer_dir)  # fail fast, before any weight is read
        weights, cfg_json = _locate(p)
        src = WeightSource.open(weights, what="text encoder")
        view = qwen3_weight_view(src, p)
        if tok_dir is not None:
            tokenizer = load_tokenizer(tok_dir)
        hf = None
        if cfg_json is not None:
            try:
                hf = json.loads(cfg_json.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"text encoder: cannot read '{cfg_json}' ({e}).") from e
        cfg = infer_text_encoder_config({k: view.shape(k) for k in view}, hf)
        n_run = layers_used(cfg)
        model, buffers = build_qwen3(cfg, n_run)
        getters = _weight_getters(view, n_run, p, skip=qload.text_encoder_quantized_keys(view, n_run))
        getters.update({n: (lambda b=b: b) for n, b in buffers.items()})
        qload.prepare_text_encoder(model, view, n_run, getters, dtype, device, mode)
        materialize(
            model, getters, dtype, device, keep_dtype=lambda n: n.startswith("rotary_emb."), what="text encoder"
        )
        model.eval().requires_grad_(False)
        log.info(
            "text encoder: Qwen3 hidden %d, %d layers (%d run), %d heads / %d kv, from '%s' as %s on %s",
            cfg.hidden_size,
            cfg.n_layers,
            n_run,
            cfg.n_heads,
            cfg.n_kv_heads,
            p,
            dtype,
            device,
        )
        encoder = cls(model, tokenizer, cfg)
        encoder.source = weights
        return encoder

    # ---- placement -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the model (and cached embeddings); a dtype change empties the cache."""
        if self.model is None:
            raise ZImageError("the text encoder was unloaded; load it again before moving it.")
        device = torch.device(device) if device is not None else self._device
        if dtype is not None and dtype != self._dtype:
            self._cache.clear()
        self.model.to(device=device, dtype=dtype or self._dtype)
        self.model.rotary_emb.to(torch.float32)  # RoPE frequencies stay fp32
        self._device, self._dtype = device, dtype or self._dtype
        for k, (emb, n, cut) in self._cache.items():
            self._cache[k] = (emb.to(device), n, cut)
        return self

    def set_compute_device(self, device: torch.device | str) -> None:
        """Compute on ``device`` without moving the weights (some layers stream there from host memory)."""
        self.model.rotary_emb.to(torch.float32)  # RoPE frequencies stay fp32
        self._device = torch.device(device)
        for k, (emb, n, cut) in self._cache.items():
            self._cache[k] = (emb.to(self._device), n, cut)

    def unload(self) -> None:
        """Drop the model and the cache, freeing their memory."""
        self.model = None
        self._cache.clear()
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def clear_cache(self) -> None:
        self._cache.clear()

    def cached(
        self, prompts: list[str] | str, max_length: int | None = 512, template: str | None = ZIMAGE_TEMPLATE
    ) -> bool:
        """True when every prompt's embedding is cached, so encoding them needs no model (nor moving it)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return all((p, max_length, template) in self._cache for p in prompts)

    # ---- encoding ------------------------------------------------------------------------
    def tokenize(
        self, prompt: str, max_length: int | None = 512, template: str | None = ZIMAGE_TEMPLATE
    ) -> tuple[list[int], int]:
        """Token ids of the templated prompt, truncated like diffusers, and the number of tokens cut.

        ``template`` has a ``{prompt}`` slot; None tokenizes ``prompt`` exactly as given (the Omni caption
        segments carry their own chat-template pieces).
        """
        text = prompt if template is None else template.format(prompt=prompt)
        ids = list(self.tokenizer(text)["input_ids"])
        cut = 0
        if max_length is not None and len(ids) > max_length:
            # The reference's own truncation, so special-token handling cannot differ.
            full = len(ids)
            ids = list(self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
            cut = full - len(ids)
        limit = self.config.max_position_embeddings
        if len(ids) > limit:
            raise ZImageError(
                f"the prompt is {len(ids)} tokens long (template included), but the text encoder handles at most "
                f"{limit} positions. Shorten it, or set a max length (diffusers uses 512)."
            )
        return ids, cut

    def encode(
        self, prompts: list[str] | str, max_length: int | None = 512, template: str | None = ZIMAGE_TEMPLATE
    ) -> list[torch.Tensor]:
        """One ``[L_i, hidden]`` embedding per prompt (see :meth:`encode_detailed`)."""
        return self.encode_detailed(prompts, max_length, template=template).embeddings

    def encode_detailed(
        self, prompts: list[str] | str, max_length: int | None = 512, template: str | None = ZIMAGE_TEMPLATE
    ) -> EncodeResult:
        """Encode ``prompts``; ``max_length=None`` means no limit (ComfyUI), 512 is diffusers' default.

        Unchanged prompts come from the cache. Truncation is logged as a warning with the number
        of tokens cut; the result (also kept as ``self.last_result``) carries the counts.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ZImageError(f"max_length must be a positive number of tokens or None, got {max_length!r}.")
        found: dict[str, tuple[torch.Tensor, int, int]] = {}
        todo = []
        for p in dict.fromkeys(prompts):
            hit = self._cache.get((p, max_length, template))
            if hit is not None:
                self._cache.move_to_end((p, max_length, template))
                found[p] = hit
            else:
                todo.append(p)
        if todo:
            if self.model is None:
                raise ZImageError("the text encoder was unloaded; load it again to encode new prompts.")
            tokens = {p: self.tokenize(p, max_length, template) for p in todo}
            todo.sort(key=lambda p: len(tokens[p][0]))  # similar lengths share a batch: little padding
            for i in range(0, len(todo), max(1, self.batch_size)):
                chunk = todo[i : i + max(1, self.batch_size)]
                for p, emb in zip(chunk, self._run([tokens[p][0] for p in chunk])):
                    found[p] = (emb, len(tokens[p][0]), tokens[p][1])
                    self._cache[(p, max_length, template)] = found[p]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        for p, (_, n, cut) in found.items():
            if cut:
                short = p if len(p) <= 60 else p[:57] + "..."
                log.warning(
                    "prompt '%s' is %d tokens long with the template; the last %d tokens were cut to fit "
                    "max_length=%d (as diffusers does). Shorten the prompt or raise the max length.",
                    short,
                    n + cut,
                    cut,
                    max_length,
                )
        result = EncodeResult(
            embeddings=[found[p][0].clone() for p in prompts],
            n_tokens=[found[p][1] for p in prompts],
            n_cut=[found[p][2] for p in prompts],
        )
        self.last_result = result
        return result

    def _run(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Forward right-padded ids; return each prompt's real rows."""
        lengths = [len(ids) for ids in batch]
        longest = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        if int(ids.max()) >= self.config.vocab_size:
            raise ZImageError(
                f"the tokenizer produced token id {int(ids.max())}, beyond the text encoder's vocabulary "
                f"({self.config.vocab_size}); the tokenizer does not belong to this model."
            )
        needs_mask = min(lengths) != longest
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(self._device),
                attention_mask=mask.to(self._device) if needs_mask else None,
                use_cache=False,
            ).last_hidden_state
        return [out[i, :n].clone() for i, n in enumerate(lengths)]
