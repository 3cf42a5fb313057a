"""oneDNN linear layers for CPU inference: the DiT's matmuls at the machine's full fp32 rate.

``F.linear`` on a CPU runs float32 through MKL's sgemm, which on this project's reference CPUs (AMD Zen 4,
AVX-512) reaches ~150 GFLOP/s on the DiT's shapes where oneDNN's kernel reaches ~195 (the two cores' peak).
oneDNN also fuses the SwiGLU feed-forward: ``silu`` as a post-op of ``w1`` and the product with ``w1``'s
output as a post-op of ``w3``, so the ``[tokens, ffn_dim]`` intermediates are written once instead of four
times. The arithmetic stays float32 (bfloat16 stays bfloat16): a different summation order, no lower
precision; results agree with ``F.linear`` to the usual rounding (~1e-6 relative).

Used only where it is the same computation: a CPU tensor and a plain ``nn.Linear`` (quantized and LoRA
layers keep their own forward) with the weight in the activations' dtype, no autograd, no module hooks,
not inside ``torch.compile``. PyTorch's own switch turns it off: ``torch.backends.mkldnn.flags(enabled=False)``
(or ``torch.backends.mkldnn.enabled = False``) sends every call back to ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)


def _op():
    """The oneDNN linear op of this PyTorch build, or None (built without oneDNN)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return ops._linear_pointwise if ops is not None else None
    except (AttributeError, RuntimeError):
        return None


def enabled_for(x: torch.Tensor) -> bool:
    """True when oneDNN may serve inference on ``x`` at all: a CPU fp32/bf16 tensor, oneDNN built and switched
    on, no autograd, not inside ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and torch.backends.mkldnn.is_available()
        and torch._C._get_mkldnn_enabled()
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _op() is not None
    )


def usable(x: torch.Tensor, *mods: nn.Module) -> bool:
    """True when every module in ``mods`` can run ``x`` through oneDNN as the same computation."""
    if not enabled_for(x):
        return False
    for m in mods:
        if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks:
            return False
        w = m.weight
        if w.device.type != "cpu" or w.dtype != x.dtype or w.layout != torch.strided or w.is_mkldnn:
            return False
        if m.bias is not None and m.bias.dtype != x.dtype:
            return False
    return True


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``, through oneDNN when :func:`usable`."""
    if not usable(x, mod):
        return mod(x)
    return _op()(x, mod.weight, mod.bias, "none", [], "")


def swiglu(w1: nn.Module, w2: nn.Module, w3: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``w2(silu(w1(x)) * w3(x))`` with the activation and the product fused into oneDNN's matmuls when
    :func:`usable`, else the plain modules."""
    if not usable(x, w1, w2, w3):
        return w2(F.silu(w1(x)) * w3(x))
    op = _op()
    gate = op(x, w1.weight, w1.bias, "swish", [], "")
    hidden = op.binary(x, gate, w3.weight, w3.bias, "mul")
    return op(hidden, w2.weight, w2.bias, "none", [], "")
