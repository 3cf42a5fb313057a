"""Tiny random Qwen3 text encoders saved in the layouts Z-Image users have on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.factories import TOKENIZER_FIXTURE
from zimage_core.config import TextEncoderConfig
from zimage_core.weights import save_safetensors

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def hf_config(cfg: TextEncoderConfig):
    """The ``transformers.Qwen3Config`` of the full model, as in Qwen3-4B's config.json."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
        architectures=["Qwen3ForCausalLM"],
    )


def make_qwen3(cfg: TextEncoderConfig | None = None, seed: int = 0):
    """A full ``transformers.Qwen3Model`` (all layers and the final norm) with seeded random weights."""
    from transformers import Qwen3Model

    cfg = cfg or TextEncoderConfig.tiny()
    model = Qwen3Model(hf_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm gains around 1, so every layer matters
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.15))
    return model


def _state(model, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def save_hf_text_encoder(model, folder, prefix: str = "model.") -> Path:
    """``text_encoder/`` as in Tongyi-MAI/Z-Image-Turbo: config.json + model.safetensors.

    The real repo holds a Qwen3ForCausalLM checkpoint (keys ``model.*``, tied embeddings, no
    lm_head) that diffusers loads as ``Qwen3Model`` (model_index.json: ``["transformers",
    "Qwen3Model"]``); ``Qwen3Model.from_pretrained`` strips the ``model.`` prefix. ``prefix=""``
    writes the keys a bare ``Qwen3Model.save_pretrained`` produces.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = ["Qwen3ForCausalLM"]
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(_state(model, prefix), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def save_tokenizer(folder) -> Path:
    """Copy the fixture Qwen tokenizer files into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_FIXTURE / name).is_file():
            shutil.copy(TOKENIZER_FIXTURE / name, folder / name)
    return folder


def save_diffusers_root(model, root) -> Path:
    """A diffusers model root holding ``text_encoder/`` and ``tokenizer/``."""
    root = Path(root)
    save_hf_text_encoder(model, root / "text_encoder")
    save_tokenizer(root / "tokenizer")
    return root


def save_comfy_text_encoder(model, file, prefix: str = "", lm_head: bool = True) -> Path:
    """ComfyUI's ``qwen_3_4b.safetensors``: one file, ``model.*`` keys incl. the last layer and norm.

    ``prefix="text_encoders.qwen3_4b.transformer."`` gives the all-in-one layout.
    """
    state = _state(model, prefix + "model.")
    if lm_head:
        state[prefix + "lm_head.weight"] = model.embed_tokens.weight.detach().clone()
    save_safetensors(state, file)
    return Path(file)


def fp8_scaled_state(model, comfy_quant: bool = False) -> dict[str, torch.Tensor]:
    """The Qwen3 state as ComfyUI's ``qwen_3_4b_fp8_mixed.safetensors`` stores it: every ``*proj.weight`` in
    float8 e4m3 with a per-tensor ``weight_scale`` (and a ``comfy_quant`` recipe with ``comfy_quant=True``)."""
    state = _state(model)
    for k in [k for k in state if k.endswith("proj.weight")]:
        w = state[k]
        scale = w.abs().max() / 448.0
        state[k] = (w / scale).to(torch.float8_e4m3fn)
        state[k[: -len(".weight")] + ".weight_scale"] = scale.float()
        if comfy_quant:
            state[k[: -len(".weight")] + ".comfy_quant"] = torch.tensor(
                list(b'{"format":"float8_e4m3fn"}'), dtype=torch.uint8
            )
    return state
