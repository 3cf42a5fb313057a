"""LoRA file layouts for Z-Image, read into one canonical form.

A :class:`LoRA` maps a native (ComfyUI) module name of :class:`~zimage_core.dit.ZImageDiT`, e.g.
``layers.0.attention.qkv``, to a list of terms. Each term is a :class:`LowRank` (``scale * up @ down``),
a :class:`Kron` (LoKr, ``scale * kron(w1, w2)``) or a :class:`Diff` (a full weight or bias delta).
A term may cover only a block of the target's output rows: ``chunk = (i, n)`` is the i-th of n
equal blocks, which is how split ``to_q/to_k/to_v`` updates land on the fused ``qkv``.

Module paths are matched against the real module names of the model (native and diffusers
spellings, with ``.``/``_``/``-`` treated alike and known prefixes stripped), never by guessing
where to split an underscored name. Key suffixes: ``lora_A/lora_B`` (PEFT, ai-toolkit),
``lora_down/lora_up`` + ``alpha`` (kohya, musubi, ComfyUI), ``lora.down/lora.up``, ``lokr_*``,
``diff``/``diff_b``. PEFT scaling without ``.alpha`` keys comes from diffusers'
``lora_adapter_metadata`` when the file has it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiTConfig
from .dit_layout import describe_wrong_file, native_to_diffusers_key
from .errors import LoraError

log = logging.getLogger(__name__)

Chunk = tuple[int, int] | None  # (index, count) of equal output-row blocks; None = every row


def rows(chunk: Chunk, out_features: int) -> tuple[int, int]:
    """``(offset, length)`` of the output rows a term with ``chunk`` covers."""
    if chunk is None:
        return 0, out_features
    n = out_features // chunk[1]
    return chunk[0] * n, n


@dataclass
class LowRank:
    """``delta = scale * up @ down``; ``down`` ``[r, in]``, ``up`` ``[rows, r]``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    chunk: Chunk = None
    source: str = ""
    param: ClassVar[str] = "weight"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1])

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale

    def side(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def to(self, device, dtype=None) -> LowRank:
        return dataclasses.replace(
            self, down=self.down.to(device=device, dtype=dtype), up=self.up.to(device=device, dtype=dtype)
        )


@dataclass
class Kron:
    """LoKr: ``delta = scale * kron(w1, w2)``."""

    w1: torch.Tensor
    w2: torch.Tensor
    scale: float = 1.0
    chunk: Chunk = None
    source: str = ""
    param: ClassVar[str] = "weight"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1])

    def delta(self) -> torch.Tensor:
        return torch.kron(self.w1.float(), self.w2.float()) * self.scale

    def side(self, x: torch.Tensor) -> torch.Tensor:
        # kron(A, B) @ vec(X) = vec(A @ X @ B^T) with X = x viewed as [a_in, b_in]; never builds the full matrix.
        xs = x.unflatten(-1, (self.w1.shape[1], self.w2.shape[1]))
        return (self.w1 @ xs @ self.w2.T).flatten(-2) * self.scale

    def to(self, device, dtype=None) -> Kron:
        return dataclasses.replace(
            self, w1=self.w1.to(device=device, dtype=dtype), w2=self.w2.to(device=device, dtype=dtype)
        )


@dataclass
class Diff:
    """A full delta for the target's ``weight`` (or ``bias``) rows."""

    value: torch.Tensor
    param: str = "weight"
    chunk: Chunk = None
    source: str = ""
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def delta(self) -> torch.Tensor:
        return self.value.float() * self.scale

    def side(self, x: torch.Tensor) -> torch.Tensor:
        return self.value * self.scale if self.param == "bias" else F.linear(x, self.value) * self.scale

    def to(self, device, dtype=None) -> Diff:
        return dataclasses.replace(self, value=self.value.to(device=device, dtype=dtype))


Term = LowRank | Kron | Diff


class LoRA(dict):
    """``{native module name: [terms]}``, plus the detected ``format`` and a display ``name``."""

    def __init__(self, targets: Mapping[str, list[Term]] | None = None, format: str = "", name: str = "LoRA"):
        super().__init__(targets or {})
        self.format, self.name = format, name

    def add(self, module: str, term: Term) -> None:
        self.setdefault(module, []).append(term)


# ---------------------------------------------------------------------------------------------
# Module names of the model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A module a LoRA may patch: ``shape`` is ``(out, in)`` for linear layers, None when unknown."""

    shape: tuple[int, ...] | None
    linear: bool | None
    has_bias: bool


_PREFIXES = tuple(
    re.sub(r"[._-]+", "_", p).lower()
    for p in (
        "base_model.model.",
        "model.diffusion_model.",
        "diffusion_model.",
        "transformer.",
        "lora_unet_",
        "lora_transformer_",
        "lycoris_",
        "default.",
        "unet.",
    )
)


def _norm(path: str) -> str:
    return re.sub(r"[._-]+", "_", path).lower()


def _aliases(name: str):
    yield name, None
    diff = native_to_diffusers_key(name + ".weight")[: -len(".weight")]
    if diff != name:
        yield diff, None
    if name.endswith(".attention.qkv"):
        for i, proj in enumerate(("to_q", "to_k", "to_v")):
            yield diff[: -len("qkv")] + proj, (i, 3)


class TargetTable:
    """Every patchable module of a model and every spelling a LoRA file may use for it."""

    def __init__(self, targets: Mapping[str, Target]):
        self.targets = dict(targets)
        self.index: dict[str, tuple[str, Chunk]] = {}
        clash = set()
        for name in self.targets:
            for alias, chunk in _aliases(name):
                key = _norm(alias)
                if self.index.setdefault(key, (name, chunk)) != (name, chunk):
                    clash.add(key)
        for key in clash:
            del self.index[key]

    def resolve(self, path: str) -> tuple[str, Chunk] | None:
        key = _norm(path)
        while key not in self.index:
            prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
            if prefix is None:
                return None
            key = key[len(prefix) :]
        return self.index[key]


def module_targets(model: nn.Module) -> dict[str, Target]:
    """Patchable modules (those with a ``weight``) of ``model``; runtime LoRA wrappers count as their base."""
    out, inner = {}, []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in inner):
            continue
        if getattr(m, "is_lora_wrapper", False):
            inner.append(name + ".")
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        linear = hasattr(m, "in_features") and hasattr(m, "out_features")
        shape = (m.out_features, m.in_features) if linear else tuple(w.shape)
        out[name] = Target(shape, linear, getattr(m, "bias", None) is not None)
    return out


@functools.lru_cache(maxsize=4)
def _config_table(cfg: DiTConfig) -> TargetTable:
    from .dit import ZImageDiT

    with torch.device("meta"):
        return TargetTable(module_targets(ZImageDiT(cfg)))


@functools.lru_cache(maxsize=1)
def _names_only() -> TargetTable:
    full = _config_table(DiTConfig.omni())
    return TargetTable({n: dataclasses.replace(t, shape=None) for n, t in full.targets.items()})


def target_table(model=None) -> TargetTable:
    """Table for a ZImageDiT, a DiTConfig, a state dict, parameter names, or (None) the released Omni layout."""
    if isinstance(model, TargetTable):
        return model
    if model is None:
        return _names_only()
    if isinstance(model, DiTConfig):
        return _config_table(model)
    if isinstance(model, nn.Module):
        return TargetTable(module_targets(model))
    keys = set(model)
    shapes = (
        {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in model.items()}
        if isinstance(model, Mapping)
        else {}
    )
    targets = {}
    for k in keys:
        if k.endswith(".weight"):
            name, shape = k[: -len(".weight")], shapes.get(k)
            linear = None if shape is None else len(shape) == 2
            targets[name] = Target(shape, linear, name + ".bias" in keys)
    return TargetTable(targets)


# ---------------------------------------------------------------------------------------------
# Keys of a LoRA file
# ---------------------------------------------------------------------------------------------
_PARTS = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
    (".lokr_w1", "w1"),
    (".lokr_w1_a", "w1_a"),
    (".lokr_w1_b", "w1_b"),
    (".lokr_w2", "w2"),
    (".lokr_w2_a", "w2_a"),
    (".lokr_w2_b", "w2_b"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
    (".w_norm", "diff"),
    (".b_norm", "diff_b"),
)
_UNSUPPORTED = (
    (".dora_scale", "DoRA"),
    (".hada_w1_a", "LoHa"),
    (".hada_w2_a", "LoHa"),
    (".lokr_t2", "LoKr with Tucker"),
    (".lora_mid.weight", "LoCon with Tucker"),
    (".a1.weight", "GLoRA"),
    (".oft_blocks", "OFT"),
    (".oft_diag", "OFT"),
    (".lora_B.bias", "LoRA with bias"),
    (".lora_up.bias", "LoRA with bias"),
)
_PEFT_SUFFIXES = (".lora_A.default.weight", ".lora_A.weight")


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(module path, part, suffix)`` for a LoRA key, or None when the suffix is not a LoRA one."""
    for suffix, part in _PARTS:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part, suffix
    return None


def detect_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """A short name of the producer a LoRA's keys look like (for messages)."""
    ks = list(keys)

    def has(pred) -> bool:
        return any(pred(k) for k in ks)

    if metadata and metadata.get("zimage_format") == "lora":
        return "zimage (ComfyUI native)"
    if has(lambda k: ".lokr_" in k):
        return "LoKr (ai-toolkit/LyCORIS)"
    if has(lambda k: ".lora_A." in k):
        if has(lambda k: k.startswith("base_model.model.")):
            return "PEFT (raw save)"
        if has(lambda k: ".attention.qkv." in k):
            return "PEFT on fused ComfyUI names"
        return "ai-toolkit" if has(lambda k: k.startswith("diffusion_model.")) else "diffusers/PEFT"
    if has(lambda k: k.startswith(("lora_unet_", "lora_te"))):
        return "musubi->ComfyUI (fused qkv)" if has(lambda k: "_attention_qkv." in k) else "kohya/musubi"
    if has(lambda k: k.startswith("lycoris_")):
        return "LyCORIS"
    if has(lambda k: ".lora.down." in k):
        return "dot-style lora.down/lora.up"
    if has(lambda k: ".lora_down." in k):
        return "ComfyUI native"
    if has(lambda k: k.endswith((".diff", ".diff_b"))):
        return "ComfyUI weight diff"
    return "unknown"


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _listing(keys: list[str], n: int = 10) -> str:
    keys = sorted(keys, key=_natural)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _peft_alpha(metadata: Mapping[str, str] | None) -> Callable[[str, int], float] | None:
    """PEFT scale from diffusers' ``lora_adapter_metadata`` (lora_alpha, alpha_pattern, use_rslora)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        log.warning("ignoring unreadable lora_adapter_metadata")
        return None
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer.") :]: v for k, v in cfg.items() if k.startswith("transformer.")}
    if cfg.get("lora_alpha") is None:
        return None
    patterns = cfg.get("alpha_pattern") or {}

    def scale(path: str, rank: int) -> float:
        path = re.sub(r"^(base_model\.model\.|transformer\.|diffusion_model\.)+", "", path)
        alpha = cfg["lora_alpha"]
        for pat, value in patterns.items():
            if re.match(rf"(.*\.)?({pat})$", path):  # PEFT's get_pattern_key
                alpha = value
                break
        return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    return scale


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """Linear LoRA factors sometimes come as ``[a, b, 1, 1]`` (1x1 conv); drop the unit dims."""
    return t.flatten(1) if t.ndim == 4 and t.shape[2:] == (1, 1) else t


def _terms(path: str, parts: dict[str, str], sd: Mapping[str, torch.Tensor], peft_scale, chunk: Chunk) -> list[Term]:
    def get(p):
        return sd[parts[p]]

    alpha = None
    if "alpha" in parts:
        a = get("alpha")
        if a.numel() != 1:
            raise LoraError(f"LoRA key '{parts['alpha']}' should be a single number, got shape {tuple(a.shape)}")
        alpha = float(a.reshape(-1)[0])
    out: list[Term] = []
    if ("down" in parts) != ("up" in parts):
        have, lack = ("down", "up") if "down" in parts else ("up", "down")
        raise LoraError(f"LoRA key '{parts[have]}' has no matching {lack} weight; the file is incomplete.")
    if "down" in parts:
        down, up = _matrix(get("down")), _matrix(get("up"))
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(
                f"LoRA '{path}': down {tuple(down.shape)} and up {tuple(up.shape)} do not form a "
                "low-rank pair; the file is damaged or not a linear LoRA."
            )
        rank = down.shape[0]
        if alpha is not None:
            scale = alpha / rank
        elif peft_scale is not None and parts["down"].endswith(_PEFT_SUFFIXES):
            scale = peft_scale(path, rank)
        else:
            scale = 1.0
        out.append(LowRank(down, up, scale, chunk, path))
    if any(p.startswith("w1") or p.startswith("w2") for p in parts):
        factors, dim = [], None
        for w in ("w1", "w2"):
            if w in parts:
                factors.append(get(w).float())
            elif w + "_a" in parts and w + "_b" in parts:
                factors.append(get(w + "_a").float() @ get(w + "_b").float())
                dim = get(w + "_b").shape[0]  # the rank of the last decomposed factor, as LyCORIS
            else:
                raise LoraError(f"LoKr '{path}' lacks lokr_{w} (or lokr_{w}_a/_b); the file is incomplete.")
        scale = alpha / dim if alpha is not None and dim else 1.0
        out.append(Kron(factors[0], factors[1], scale, chunk, path))
    for part, param in (("diff", "weight"), ("diff_b", "bias")):
        if part in parts:
            out.append(Diff(get(part), param, chunk, path))
    if not out:
        raise LoraError(f"LoRA key '{parts['alpha']}' has no weights next to it; the file is incomplete.")
    return out


def check_term(name: str, term: Term, target: Target) -> str | None:
    """Why ``term`` does not fit ``target`` (None when it does or the shape is unknown)."""
    if target.shape is None:
        return None
    out = target.shape[0]
    if term.chunk is not None and out % term.chunk[1]:
        return f"{term.source}: '{name}' has {out} rows, not divisible into {term.chunk[1]} blocks"
    n = rows(term.chunk, out)[1]
    if term.param == "bias":
        if not target.has_bias:
            return f"{term.source}: '{name}' has no bias"
        want = (n,)
    elif isinstance(term, Diff) and not target.linear:
        want = (n, *target.shape[1:])
    elif not target.linear:
        return f"{term.source}: '{name}' is not a linear layer; only full diffs can patch it"
    else:
        want = (n, target.shape[1])
    if tuple(term.shape) != want:
        return f"{term.source}: update of shape {tuple(term.shape)} for '{name}' which needs {want}"
    return None


def check_lora(lora: LoRA, table: TargetTable, what: str = "this model") -> None:
    """Raise a LoraError if a target is missing from ``table`` or a term's shape does not fit it."""
    missing = [n for n in lora if n not in table.targets]
    if missing:
        raise LoraError(
            f"{lora.name}: patches modules that {what} lacks ({lora.format} format): {_listing(missing)}. "
            "It was made for another model (e.g. an Omni-only SigLIP layer on Turbo/Base)."
        )
    bad = [msg for n, terms in lora.items() for t in terms if (msg := check_term(n, t, table.targets[n]))]
    if bad:
        raise LoraError(
            f"{lora.name}: {len(bad)} LoRA tensor(s) do not fit {what} ({lora.format} format): "
            f"{_listing(bad, 5)}. The LoRA was made for another model size."
        )


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    model_keys=None,
    metadata: Mapping[str, str] | None = None,
    name: str = "LoRA",
) -> LoRA:
    """Read a LoRA state dict of any supported layout into a :class:`LoRA` for the model ``model_keys``
    (a ZImageDiT, DiTConfig, state dict or parameter names; None = the released Omni layout).

    Every key must land on a module of that model; otherwise a LoraError lists the keys that do not.
    """
    keys = list(state_dict)
    fmt = detect_format(keys, metadata)
    unsupported = sorted({kind for k in keys for suf, kind in _UNSUPPORTED if k.endswith(suf)})
    if unsupported:
        raise LoraError(
            f"{name}: uses {', '.join(unsupported)}, which is not supported (only LoRA, LoKr and weight diffs are)."
        )
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for k in keys:
        hit = split_key(k)
        if hit is None:
            unknown.append(k)
        else:
            groups.setdefault(hit[0], {})[hit[1]] = k
    if not groups:
        stripped = {re.sub(r"^(model\.)?diffusion_model\.", "", k) for k in keys}
        found = (
            "a Z-Image diffusion model (load it as the model, not as a LoRA)"
            if "cap_embedder.1.weight" in stripped
            else describe_wrong_file(keys, "a LoRA")
        )
        raise LoraError(f"{name}: not a LoRA file: {found}")
    table = target_table(model_keys)
    unmatched = list(unknown)
    resolved = {}
    for path, parts in groups.items():
        hit = table.resolve(path)
        if hit is None:
            unmatched.extend(parts.values())
        else:
            resolved[path] = hit
    if unmatched:
        hint = ""
        if any(k.startswith(("lora_te", "text_encoder", "te_")) for k in unmatched):
            hint = " Text-encoder LoRA weights are not supported."
        raise LoraError(
            f"{name}: {len(unmatched)} key(s) do not match any module of this model ({fmt} format "
            f"detected): {_listing(unmatched)}. Is the LoRA for another model?{hint}"
        )
    peft_scale = _peft_alpha(metadata)
    lora = LoRA(format=fmt, name=name)
    for path, parts in groups.items():
        target, chunk = resolved[path]
        try:
            terms = _terms(path, parts, state_dict, peft_scale, chunk)
        except LoraError as e:
            raise LoraError(f"{name}: {e}") from None
        for term in terms:
            lora.add(target, term)
    for target, terms in lora.items():
        if any(t.chunk for t in terms) and any(t.chunk is None for t in terms):
            log.warning(
                "%s: '%s' is patched both as fused qkv and as split to_q/to_k/to_v; both are applied", name, target
            )
    check_lora(lora, table)
    return lora
