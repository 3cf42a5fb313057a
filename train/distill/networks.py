"""The networks of a distillation run: the frozen teacher, the student, the fake score and the optional GAN head.

- **teacher** (real score): the DiT being distilled, frozen (bf16 on GPUs), never wrapped by DDP/FSDP.
- **student** (generator): ``full`` = a float32 copy of the teacher trained in full (FSDP2-shardable; the learned
  pad tokens stay frozen, since a LoRA file has no place for them), or ``lora`` = LoRA adapters on a *twin* of the
  teacher.
- **fake score**: ``lora`` (default, the DMDR trick) = adapters on another twin of the teacher, or ``full`` = a
  trainable float32 copy.

A twin (:func:`shared_twin`) is a second :class:`~zimage_core.dit.ZImageDiT` module tree whose parameters *are* the
teacher's tensors (the same ``nn.Parameter`` objects, no copy): adapters attached to the twin patch only the twin's
linear layers (forward hooks on its own modules), so the teacher stays the pure teacher while one frozen base sits
in memory. ``tests/train/test_distill.py`` checks that by counting parameters and storage pointers.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from zimage_core.dit import ZImageDiT
from zimage_core.errors import ZImageError

from ..lora_train import add_lora

log = logging.getLogger(__name__)


def shared_twin(dit: ZImageDiT) -> ZImageDiT:
    """A new module tree over the *same* parameter tensors as ``dit`` (built on the meta device, then pointed at
    ``dit``'s parameters); adapters or hooks added to it do not reach ``dit``."""
    with torch.device("meta"):
        twin = ZImageDiT(dit.cfg)
    mods = dict(twin.named_modules())
    for name, p in dit.named_parameters():
        owner, _, leaf = name.rpartition(".")
        mods[owner]._parameters[leaf] = p
    for name, b in dit.named_buffers():
        owner, _, leaf = name.rpartition(".")
        mods[owner]._buffers[leaf] = b
    twin.gradient_checkpointing = dit.gradient_checkpointing
    return twin.train(dit.training)


def trainable_copy(dit: ZImageDiT) -> ZImageDiT:
    """A float32 copy of ``dit`` whose parameters all train."""
    net = copy.deepcopy(dit).float()
    return net.requires_grad_(True).train()


class GanHead(nn.Module):
    """DMD2's discriminator head: a small MLP on the fake score's image-token features -> logits: one per sample
    from the pooled features ``[B, dim]``, or one per token from ``[B, N, dim]`` (a patch discriminator: the
    losses average them, so it judges every region of the image rather than only global statistics)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features**-0.5)
                    m.bias.zero_()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.float()).squeeze(-1)


@contextmanager
def capture_features(dit: ZImageDiT, layer: int, n_img: int, pooled: bool = True):
    """Within the block, ``store["feats"]`` holds the image-token output of ``dit.layers[layer]`` from the latest
    forward (the joint sequence starts with the image tokens): their mean ``[B, dim]`` when ``pooled``, else every
    token ``[B, n_img, dim]``."""
    store: dict = {}

    def hook(module, inputs, output):
        feats = output[:, :n_img].float()
        store["feats"] = feats.mean(dim=1) if pooled else feats

    try:
        block = dit.layers[layer]
    except IndexError:
        raise ZImageError(f"distill.gan_layer {layer} is out of range: the DiT has {len(dit.layers)} layers.") from None
    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@dataclass
class Networks:
    teacher: ZImageDiT
    student: ZImageDiT
    fake: ZImageDiT
    gan: GanHead | None
    student_params: dict[str, torch.Tensor]  # what the student trains, by name
    fake_params: dict[str, torch.Tensor]  # the fake score's trained tensors, the GAN head's as "gan.<name>"


def build_networks(teacher: ZImageDiT, d, gradient_checkpointing: bool, seed: int) -> Networks:
    """The student, fake score and GAN head around a frozen ``teacher`` (already on its device) for ``[distill]``
    settings ``d``."""
    teacher.requires_grad_(False).eval()
    if d.student == "full":
        student = trainable_copy(teacher)
        for name, p in student.named_parameters():  # a LoRA file cannot carry them, so the Turbo LoRA stays exact
            if name.endswith("pad_token"):
                p.requires_grad_(False)
    else:
        student = shared_twin(teacher)
        add_lora(student, d.student_lora_rank, d.student_lora_alpha, d.lora_targets, seed)
    if d.fake == "full":
        fake = trainable_copy(teacher)
    else:
        fake = shared_twin(teacher)
        add_lora(fake, d.fake_lora_rank, d.fake_lora_alpha, d.lora_targets, seed + 1)
    for net in (student, fake):
        net.gradient_checkpointing = bool(gradient_checkpointing)
        net.train()
    gan = None
    if d.gan_weight > 0:
        gan = GanHead(teacher.cfg.dim, seed + 2).to(teacher.device)
    student_params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    fake_params = {n: p for n, p in fake.named_parameters() if p.requires_grad}
    if gan is not None:
        fake_params.update({f"gan.{n}": p for n, p in gan.named_parameters()})
    log.info(
        "distillation networks: teacher %.1fM frozen; student %s %.2fM trained; fake score %s %.2fM trained%s",
        sum(p.numel() for p in teacher.parameters()) / 1e6,
        d.student,
        sum(p.numel() for p in student_params.values()) / 1e6,
        d.fake,
        sum(p.numel() for p in fake_params.values()) / 1e6,
        " (with a GAN head)" if gan is not None else "",
    )
    return Networks(teacher, student, fake, gan, student_params, fake_params)
