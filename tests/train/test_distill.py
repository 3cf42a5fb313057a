"""Distillation (train.distill) on the CPU with a tiny teacher: the losses against hand-computed values, the scores
through the engine's flips and CFG convention, TTUR, the shared frozen base, bit-exact resume, and the memory plan
of the 6B model counted on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ck
from train.config import load_config
from train.data import make_synthetic_dataset
from train.distill import Distiller
from train.distill import losses as L
from train.distill.memory import dit_parameters, lora_parameters, plan, plan_for_config
from train.export import main as export_main
from train.lora_train import LoraAdapter, add_lora
from train.objective import shift_sigmas
from train.run import main as run_main
from zimage_core.checkpoints import load_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT

from .conftest import make_teacher

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes") / "images"
    make_synthetic_dataset(folder, n_per_class=2, size=32, seed=0)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache") / "c"


def overrides(out: Path, shapes: Path, cache: Path, teacher: Path, **extra) -> list[str]:
    base = {
        "output_dir": f"'{out}'",
        "max_steps": "2",
        "log_every": "1",
        "synthetic": "{}",
        "distill.teacher": f"'{teacher}'",
        "distill.ttur": "2",
        "distill.fake_lr": "1e-3",
        "data.sources": f'[{{type = "folder", path = "{shapes}"}}]',
        "data.resolution": "32",
        "data.token_budget": "64",
        "data.max_batch": "4",
        "data.cache_dir": f"'{cache}'",
        "optim.lr": "1e-3",
        "checkpoint.every": "0",
        "samples.every": "0",
        "distill.export_diffusers": "false",
    }
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def distiller(out, shapes, cache, teacher, **extra) -> Distiller:
    return Distiller(
        load_config(CONFIGS / "distill_synthetic.toml", overrides(out, shapes, cache, teacher, **extra)), progress=False
    )


# ---------------------------------------------------------------------------------------------
# Losses on tiny tensors
# ---------------------------------------------------------------------------------------------
def t(*rows) -> torch.Tensor:
    """``[B, 1, 1, n]`` from per-sample rows."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, None, :]


def test_losses_match_hand_computed_values():
    x0, r0, f0 = t([1, 2], [0, 0]), t([0, 1], [2, -2]), t([0.5, 0.5], [1, 0])
    # DMD2: (r0 - f0) / mean|x0 - r0| per sample: [-.5, .5] / 1 and [1, -2] / 2
    torch.testing.assert_close(L.dmd2_direction(x0, r0, f0), t([-0.5, 0.5], [0.5, -1.0]))
    torch.testing.assert_close(L.dmd2_direction(x0, r0, f0, norm=False), t([-0.5, 0.5], [1.0, -2.0]))
    torch.testing.assert_close(L.dm_direction(x0, r0, f0), L.dmd2_direction(x0, r0, f0))
    # CFG augmentation, CLI cfg 3 = standard scale 3 = diffusers guidance 2: 2 (cond - uncond), normalised by
    # mean|x0 - (cond + 2 (cond - uncond))|
    cond, uncond, z = t([1, 1]), t([0.5, 1.5]), t([0, 0])
    torch.testing.assert_close(L.ca_direction(z, cond, uncond, 3.0, norm=False), t([1.0, -1.0]))
    torch.testing.assert_close(L.ca_direction(z, cond, uncond, 3.0), t([1.0, -1.0]) / 1.0)  # guided = [2, 0]
    torch.testing.assert_close(L.ca_direction(t([4, 4]), cond, uncond, 3.0), t([1.0, -1.0]) / 3.0)  # |[2, 4]|
    assert torch.count_nonzero(L.ca_direction(z, cond, uncond, 1.0)) == 0  # cfg 1 = off: no CA term
    # the surrogate's gradient is exactly -delta / numel, whatever the dtype of x0
    x = t([1, 2], [3, 4]).requires_grad_(True)
    delta = t([0.5, -1], [2, 0])
    L.matching_loss(x.bfloat16(), delta).backward()
    torch.testing.assert_close(x.grad, -delta / 4)
    assert float(L.matching_loss(x, delta)) == pytest.approx(0.5 * (0.25 + 1 + 4) / 4)
    # per-sample normalisation never divides by zero
    assert torch.isfinite(L.normalize(t([1, 1]), t([0, 0]))).all()
    # fake score: flow matching on the velocity noise - x0
    noise = t([0.3, -0.2], [1, 1])
    assert float(L.fake_score_loss(noise - x0, x0, noise)) == 0.0
    assert float(L.gan_generator_loss(torch.zeros(3))) == pytest.approx(0.6931, abs=1e-4)
    assert float(L.gan_discriminator_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(1.3863, abs=1e-4)


@pytest.mark.parametrize("method", ["decoupled_dmd", "dmd2"])
def test_update_direction_applies_the_dit_flips_and_the_cli_cfg(tmp_path, shapes, cache, teacher, method):
    """``Distiller.direction`` against the raw DiT written out by hand: t = 1 - sigma, x0 = x + sigma * output."""
    dist = distiller(tmp_path / "run", shapes, cache, teacher, distill__method=method, distill__cfg="3.0")
    dist.setup()
    nets = dist.nets
    with torch.no_grad():  # a fake score that differs from the teacher
        for a in nets.fake.modules():
            if isinstance(a, LoraAdapter):
                a.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    batch = next(dist.batches)
    cond = batch.cap_feats
    b = len(cond)
    x0 = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(2))
    sigma_k = dist.grid[1].expand(b)
    delta, terms = dist.direction(x0, cond, sigma_k, torch.Generator().manual_seed(5))

    d = dist.cfg.distill
    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order
    empty = [dist.empty] * b

    def x0_hat(net, x, s, caps):  # Z-Image: the DiT sees 1 - sigma and predicts x0 - noise = -velocity
        return x + s.view(-1, 1, 1, 1) * net(x, 1 - s, caps)

    with torch.no_grad():
        s = shift_sigmas(d.sigma_min + (d.sigma_max - d.sigma_min) * torch.rand(b, generator=gen), d.sigma_shift)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
        pos, f0 = x0_hat(nets.teacher, x_t, s, cond), x0_hat(nets.fake, x_t, s, cond)
        if method == "dmd2":  # real score = teacher with CFG: uncond + 3 (cond - uncond)
            neg = x0_hat(nets.teacher, x_t, s, empty)
            real = neg + 3.0 * (pos - neg)
            expect = (real - f0) / (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        else:
            dm = (pos - f0) / (x0 - pos).abs().mean(dim=(1, 2, 3), keepdim=True)
            lo = torch.full((b,), d.sigma_min)
            s_ca = lo + (sigma_k - lo) * torch.rand(b, generator=gen)
            assert (s_ca <= sigma_k).all()  # the CA term sits at a cleaner noise level than the student's input
            x_c = (1 - s_ca.view(-1, 1, 1, 1)) * x0 + s_ca.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
            c, u = x0_hat(nets.teacher, x_c, s_ca, cond), x0_hat(nets.teacher, x_c, s_ca, empty)
            ca = 2.0 * (c - u)  # CLI cfg 3 -> guidance weight 2
            expect = dm + ca / (x0 - (c + ca)).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(delta, expect, atol=2e-4, rtol=1e-3)
    assert float(delta.abs().mean()) > 1e-3 and set(terms) == (
        {"dm_size", "loss_dm"} if method == "dmd2" else {"dm_size", "ca_size", "loss_dm", "loss_ca"}
    )


# ---------------------------------------------------------------------------------------------
# Networks, TTUR, resume
# ---------------------------------------------------------------------------------------------
def _storages(*nets) -> dict[int, int]:
    out = {}
    for net in nets:
        for p in net.parameters():
            out[p.untyped_storage().data_ptr()] = p.numel()
    return out


@pytest.mark.parametrize("student", ["full", "lora"])
def test_the_fake_score_lora_shares_the_frozen_teacher(tmp_path, shapes, cache, teacher, student):
    dist = distiller(tmp_path / "run", shapes, cache, teacher, distill__student=student, max_steps=1)
    dist.train()
    nets = dist.nets
    base = {n: p for n, p in nets.teacher.named_parameters()}
    fake = {n: p for n, p in nets.fake.named_parameters() if ".lora." not in n}
    assert fake.keys() == base.keys() and all(fake[n] is base[n] for n in base)  # the same tensors, no copy
    n_teacher = sum(p.numel() for p in base.values())
    n_fake = sum(p.numel() for p in dist.units["fake"].params.values())
    n_student = sum(p.numel() for p in dist.units["trainable"].params.values())
    frozen_pads = sum(p.numel() for n, p in nets.student.named_parameters() if n.endswith("pad_token"))
    in_memory = sum(_storages(nets.teacher, nets.fake, nets.student).values())
    if student == "full":
        assert in_memory == 2 * n_teacher + n_fake  # teacher + student copy + fake adapters: no second base
        assert n_student == n_teacher - frozen_pads
    else:
        assert in_memory == n_teacher + n_fake + n_student  # one base for all three networks
        assert all(".lora." in n for n in dist.units["trainable"].params)
    assert all(not p.requires_grad for p in base.values())
    # the teacher is still the file it was loaded from: the adapters patch only the twins
    ref = load_dit(teacher, dtype=torch.float32)
    x, tt = torch.randn(1, 16, 4, 4), torch.tensor([0.3])
    caps = [torch.randn(5, 32)]
    with torch.no_grad():
        assert torch.equal(nets.teacher(x, tt, caps), ref(x, tt, caps))
        assert not torch.equal(nets.fake(x, tt, caps), ref(x, tt, caps))  # the fake score trained


def test_a_full_fake_score_real_latent_inputs_and_the_ca_only_ablation_run(tmp_path, shapes, cache, teacher):
    dist = distiller(
        tmp_path / "run",
        shapes,
        cache,
        teacher,
        max_steps=1,
        distill__fake="full",
        distill__student_input="real",
        distill__method="ca_only",
    )
    res = dist.train()
    nets = dist.nets
    n_teacher = sum(p.numel() for p in nets.teacher.parameters())
    assert sum(_storages(nets.teacher, nets.fake, nets.student).values()) == 3 * n_teacher  # three full networks
    assert res.step == 1 and all(torch.isfinite(torch.tensor(res.losses)))
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "ca_size" in metrics and "dm_size" not in metrics  # the ablation has no distribution-matching term


def test_ttur_fake_updates_per_generator_update(tmp_path, shapes, cache, teacher):
    dist = distiller(tmp_path / "run", shapes, cache, teacher, distill__ttur=3, max_steps=2, optim__grad_accum=2)
    res = dist.train()
    fake_steps = {int(s["step"]) for s in dist.opt_f.state.values()}
    student_steps = {int(s["step"]) for s in dist.opt_g.state.values()}
    assert fake_steps == {6} and student_steps == {2} and res.step == 2
    # each step consumed (ttur + 1) * grad_accum batches
    assert dist.batches.state_dict()["position"] + dist.batches.steps_per_epoch * dist.batches.epoch >= 16


def test_the_token_gan_head_judges_every_region(tmp_path, shapes, cache, teacher):
    """``gan_head = "tokens"``: a logit per image token (a patch discriminator); two images whose tokens have the same
    mean but a different layout look the same to the pooled head and different to the token head."""
    dist = distiller(
        tmp_path / "run", shapes, cache, teacher, max_steps=1, distill__gan_weight="0.01", distill__gan_head="tokens"
    )
    res = dist.train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert res.step == 1 and all(torch.isfinite(torch.tensor([metrics["gan_d"], metrics["gan_g"]])))
    x = torch.randn(2, dist.dit_config.in_channels, 4, 4)
    cond = [torch.randn(3, dist.dit_config.cap_feat_dim) for _ in range(2)]
    with torch.no_grad():
        _, feats = dist._fake_features(x, torch.full((2,), 0.5), cond)
        assert feats.shape == (2, 4, dist.dit_config.dim)  # 4x4 latents, patch 2: four image tokens
        u, w = feats[0, 0], feats[0, 1]
        varied, flat = torch.stack([u, w])[None], torch.stack([(u + w) / 2, (u + w) / 2])[None]  # the same mean
        head = dist.nets.gan
        assert torch.allclose(head(varied.mean(1)), head(flat.mean(1)))  # pooled: blind to the layout
        assert head(varied).shape == (1, 2)
        assert not torch.allclose(head(varied).mean(1), head(flat).mean(1))  # tokens: sees it


def _tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / ck.step_name(step)
    return {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_stopped_and_resumed_distillation_equals_uninterrupted(tmp_path, shapes, cache, teacher):
    from tests.train.test_trainer import _assert_same

    extra = dict(
        max_steps=3,
        distill__gan_weight="0.01",
        distill__simulation="renoise",
        ema__enabled="true",
        ema__decay="0.9",
        optim__warmup_steps=2,
        data__caption_dropout="0.5",
    )
    config = str(CONFIGS / "distill_synthetic.toml")
    over_a = overrides(tmp_path / "a", shapes, cache, teacher, **extra)
    assert run_main([config, *over_a, "--no-progress", "-q"]) == 0  # the entry point with a [distill] section
    over_b = overrides(tmp_path / "b", shapes, cache, teacher, **extra)
    assert run_main([config, *over_b, "--stop-after", "1", "--no-progress", "-q"]) == 0
    assert run_main([config, *over_b, "--resume", "--no-progress", "-q"]) == 0
    a, b = _tensors(tmp_path / "a", 3), _tensors(tmp_path / "b", 3)
    assert {k.split("/")[0] for k in a} == {"trainable.safetensors", "ema.safetensors", "fake.safetensors"}
    assert any(k.startswith("fake.safetensors/gan.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = ck.read_optimizer(tmp_path / "a" / "checkpoints" / ck.step_name(3))
    ob = ck.read_optimizer(tmp_path / "b" / "checkpoints" / ck.step_name(3))
    _assert_same(oa, ob)
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    for key in (
        "fake_loss",
        "loss_dm",
        "loss_ca",
        "dm_size",
        "ca_size",
        "grad_norm",
        "fake_grad_norm",
        "gan_d",
        "gan_g",
        "lr",
        "k",
    ):
        assert key in ma[-1], key
    exported = sorted(p.name for p in (tmp_path / "a" / "export").iterdir())
    assert exported == [
        "distill_synthetic_4step_lora_report.json",
        "distill_synthetic_4step_student.safetensors",
        "distill_synthetic_4step_turbo_lora_r16.safetensors",
    ]
    # python -m train.export on a distillation run writes the same files (here with the EMA weights)
    assert export_main([str(tmp_path / "a"), "--out", str(tmp_path / "again"), "--ema"]) == 0
    again = load_file(str(tmp_path / "again" / "distill_synthetic_4step_student.safetensors"))
    ema = load_file(str(tmp_path / "a" / "checkpoints" / ck.step_name(3) / "ema.safetensors"))
    assert all(torch.equal(again[k], ema[k].to(again[k].dtype)) for k in ema)


# ---------------------------------------------------------------------------------------------
# Memory plan of the 6B model
# ---------------------------------------------------------------------------------------------
def test_memory_plan_of_the_6b_model_by_counting_parameters():
    cfg = DiTConfig.turbo()
    n = dit_parameters(cfg)
    assert 6.10e9 < n < 6.20e9  # "6B": counted on the meta device from the same module code
    # the LoRA count is what add_lora really adds (checked on the tiny model)
    tiny = ZImageDiT(DiTConfig.tiny())
    before = sum(p.numel() for p in tiny.parameters())
    add_lora(tiny, 4, 4.0, [r"attention\.qkv$", r"feed_forward\.w[123]$"])
    assert sum(p.numel() for p in tiny.parameters()) - before == lora_parameters(
        DiTConfig.tiny(), 4, [r"attention\.qkv$", r"feed_forward\.w[123]$"]
    )
    eight = plan_for_config(load_config(CONFIGS / "distill_turbo.toml"), gpus=8)
    rows = {r[0]: r[1] for r in eight.rows}
    assert rows["teacher (frozen bf16, shared base)"] == pytest.approx(2 * n / 1e9)
    assert rows["student weights+grads+AdamW"] == pytest.approx(16 * n / 8 / 1e9)
    assert eight.fits(80) and not plan(cfg, gpus=1).fits(80)  # a full student needs the 8 GPUs (98 GB alone)
    one = plan_for_config(load_config(CONFIGS / "distill_lora.toml"), gpus=1)
    assert one.fits(24)  # the Turbo LoRA of distill_lora.toml on one 24 GB GPU
    assert "fake-score LoRA r32" in dict((r[0], r[1]) for r in one.rows)
    assert not plan(cfg, gpus=1, student="lora", checkpointing=False).fits(24)  # checkpointing is what makes it fit
