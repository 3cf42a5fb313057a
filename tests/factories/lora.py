"""Random LoRAs written in every layout the loader reads, plus the merged weights they must give.

A *spec* is ``{diffusers module name: (down [r, in], up [out, r], alpha)}`` with split to_q/to_k/to_v
(one alpha shared by the three, as the fused musubi->ComfyUI conversion requires). Each writer turns
a spec into ``(state_dict, metadata)`` of one producer's layout.
"""

from __future__ import annotations

import json

import torch

from zimage_core.dit_layout import native_to_diffusers_key

QKV = ("to_q", "to_k", "to_v")


def diffusers_linears(model) -> dict[str, tuple[str, int, int, int]]:
    """``{diffusers name: (native name, row offset, out, in)}`` for every linear layer of a ZImageDiT."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        d = native_to_diffusers_key(name + ".weight")[: -len(".weight")]
        if name.endswith(".attention.qkv"):
            n = m.out_features // 3
            for i, proj in enumerate(QKV):
                out[d[: -len("qkv")] + proj] = (name, i * n, n, m.in_features)
        else:
            out[d] = (name, 0, m.out_features, m.in_features)
    return out


def make_spec(model, rank: int = 4, seed: int = 0, where=lambda name: True, std: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    spec = {}
    for d, (_, _, n_out, n_in) in diffusers_linears(model).items():
        if not where(d):
            continue
        block = d.rsplit(".", 1)[0]
        alpha = float(rank * (1 + (sum(map(ord, block)) % 3)) / 2) if d.endswith(QKV) else float(rank + len(d) % 5)
        down = torch.randn(rank, n_in, generator=g) * std
        up = torch.randn(n_out, rank, generator=g) * std
        spec[d] = (down, up, alpha)
    return spec


def expected_weights(model, specs: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    """The model's state dict with ``strength * alpha/r * up @ down`` added (float32)."""
    table = diffusers_linears(model)
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    for spec, strength in specs:
        for d, (down, up, alpha) in spec.items():
            native, off, n, _ = table[d]
            state[native + ".weight"][off : off + n] += strength * alpha / down.shape[0] * (up @ down)
    return state


def _native(d: str) -> str:
    from zimage_core.dit_layout import diffusers_to_native_key

    return diffusers_to_native_key(d + ".weight")[: -len(".weight")]


def _under(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def _fused(spec: dict) -> dict:
    """``{native name: (down, up, alpha)}`` with q/k/v fused: stacked downs, block-diagonal up, alpha x 3."""
    out = {}
    for d, (down, up, alpha) in spec.items():
        if d.endswith(QKV[1:]):
            continue
        if d.endswith(".to_q"):
            base = d[: -len("to_q")]
            parts = [spec[base + p] for p in QKV]
            out[_native(base + "qkv")] = (
                torch.cat([p[0] for p in parts]),
                torch.block_diag(*[p[1] for p in parts]),
                3 * alpha,
            )
        else:
            out[_native(d)] = (down, up, alpha)
    return out


def _kohya(items: dict, name) -> dict:
    sd = {}
    for m, (down, up, alpha) in items.items():
        sd[f"{name(m)}.lora_down.weight"] = down
        sd[f"{name(m)}.lora_up.weight"] = up
        sd[f"{name(m)}.alpha"] = torch.tensor(alpha)
    return sd


def _peft(items: dict, name, bake: bool = True) -> dict:
    sd = {}
    for m, (down, up, alpha) in items.items():
        sd[f"{name(m)}.lora_A.weight"] = down
        sd[f"{name(m)}.lora_B.weight"] = up * (alpha / down.shape[0]) if bake else up
    return sd


def peft_metadata(spec: dict) -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata``: a common lora_alpha plus an alpha_pattern for the others."""
    alphas = [a for _, _, a in spec.values()]
    common = max(set(alphas), key=alphas.count)
    meta = {
        "r": next(iter(spec.values()))[0].shape[0],
        "lora_alpha": common,
        "target_modules": sorted(spec),
        "alpha_pattern": {f"^{k}": a for k, (_, _, a) in spec.items() if a != common},
    }
    return {f"transformer.{k}": v for k, v in meta.items()}


WRITERS = {
    "diffusers": lambda s: (_peft(s, lambda m: f"transformer.{m}"), None),
    "diffusers-bare-alpha": lambda s: (
        {**_peft(s, lambda m: m, bake=False), **{f"{m}.alpha": torch.tensor(a) for m, (_, _, a) in s.items()}},
        None,
    ),
    "diffusers-metadata": lambda s: (
        _peft(s, lambda m: f"transformer.{m}", bake=False),
        {"lora_adapter_metadata": json.dumps(peft_metadata(s))},
    ),
    "peft-raw": lambda s: (_peft(s, lambda m: f"base_model.model.{m}"), None),
    "ai-toolkit": lambda s: (_peft(s, lambda m: f"diffusion_model.{m}"), None),
    "kohya": lambda s: (_kohya(s, lambda m: "lora_unet_" + _under(m)), None),
    "kohya-dash": lambda s: (_kohya(s, lambda m: "lora_unet_" + m.replace(".", "_")), None),
    "musubi-comfy-fused": lambda s: (_kohya(_fused(s), lambda m: "lora_unet_" + _under(m)), None),
    "peft-fused": lambda s: (_peft(_fused(s), lambda m: f"diffusion_model.{m}"), None),
    "comfy-native": lambda s: (_kohya(_fused(s), lambda m: f"diffusion_model.{m}"), None),
    "comfy-diffusers-names": lambda s: (_kohya(s, lambda m: f"diffusion_model.{m}"), None),
    "lycoris": lambda s: (_kohya(s, lambda m: "lycoris_" + _under(m)), None),
    "dot": lambda s: (
        {
            k.replace(".lora_down.", ".lora.down.").replace(".lora_up.", ".lora.up."): v
            for k, v in _kohya(s, lambda m: m.replace(".to_q", ".to.q")).items()
        },
        None,
    ),
}
