"""The seams the other features build on: the one sampling loop and its stochastic step, the placement rules,
typed memory modes and the one dtype table."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_core.cli import build_parser
from zimage_core.dtypes import DTYPE_NAMES, dtype_from_name, resolve_dtype
from zimage_core.errors import ZImageError
from zimage_core.memory import MemoryMode, MemoryPlan, Residency, parse_memory_mode
from zimage_core.sampling import (
    Euler,
    FlowSDE,
    Solver,
    initial_noise,
    inpaint_blend,
    inpaint_model_fn,
    latent_shape,
    noise_latent,
    run_solver,
    sample,
    sde_step,
)
from zimage_core.schedules import flow_sigmas, img2img_sigmas


def fake_v(x, sigma):
    s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(1.3 * x) * (0.5 + s) - 0.7 * x + 0.1 * torch.sin(3.0 * x) * s


def randn(seed, shape=(2, 4, 6, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- sampling loop
def test_sample_builds_img2img_and_inpainting_around_the_one_loop():
    noise, x0 = randn(1), randn(2)
    mask = (torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    sig = img2img_sigmas(6, 3.0, 0.6)
    got = sample(fake_v, noise, sig, "heun", init=x0, mask=mask)
    start = noise_latent(x0, noise, float(sig[0]))
    want = inpaint_blend(run_solver(inpaint_model_fn(fake_v, x0, noise, mask), start, sig, "heun"), x0, mask)
    assert torch.equal(got, want)
    assert torch.equal(sample(fake_v, noise, flow_sigmas(4)), run_solver(fake_v, noise, flow_sigmas(4)))
    with pytest.raises(ZImageError, match="init"):
        sample(fake_v, noise, sig, mask=mask)


def test_a_new_step_rule_plugs_into_the_loop():
    class Halfway(Solver):
        name = "halfway"

        def step(self, run, i, x):
            v = run.velocity(x, i)
            return x + 0.5 * (run.sig[i + 1] - run.sig[i]) * v, None

    seen = []
    out = run_solver(fake_v, randn(4), flow_sigmas(3), Halfway(), callback=lambda i, n, x, d: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)] and out.shape == (2, 4, 6, 6)


def test_flow_sde_records_log_probs_that_sde_step_rescores():
    sig = flow_sigmas(6, 3.0)
    sde = FlowSDE(eta=0.7, generator=torch.Generator().manual_seed(5), keep_states=True)
    out = run_solver(fake_v, randn(6), sig, sde)
    assert len(sde.log_probs) == 5 and len(sde.states) == 7  # the last step (to sigma 0) is deterministic
    assert torch.equal(sde.states[-1], out) and all(
        lp.dtype == torch.float32 and lp.shape == (2,) for lp in sde.log_probs
    )
    sf = sig.tolist()
    for i, lp in enumerate(sde.log_probs):
        x = sde.states[i]
        v = fake_v(x, sig[i].expand(2))
        _, again, _ = sde_step(x, v, sf[i], sf[i + 1], 0.7, sf[1], x_next=sde.states[i + 1])
        torch.testing.assert_close(again, lp, rtol=0, atol=0)
    # the same generator seed gives the same trajectory; another seed another one
    twin = run_solver(fake_v, randn(6), sig, FlowSDE(0.7, torch.Generator().manual_seed(5)))
    other = run_solver(fake_v, randn(6), sig, FlowSDE(0.7, torch.Generator().manual_seed(6)))
    assert torch.equal(twin, out) and not torch.equal(other, out)


def test_flow_sde_keeps_the_marginals_and_tends_to_euler():
    # Data at a single point c: v = (x - c) / sigma exactly, so every trajectory must end at c.
    c = randn(7)

    def point_v(x, sigma):
        return (x - c) / sigma.reshape(-1, 1, 1, 1)

    sig = flow_sigmas(8, 3.0)
    end = run_solver(point_v, randn(8), sig, FlowSDE(1.0, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(end, c, rtol=0, atol=1e-5)
    euler = run_solver(fake_v, randn(9), sig, Euler())
    nearly = run_solver(fake_v, randn(9), sig, FlowSDE(1e-4, torch.Generator().manual_seed(0)))
    assert (nearly - euler).abs().max() < 1e-3
    with pytest.raises(ZImageError, match="eta"):
        FlowSDE(eta=0.0)


def test_sde_log_prob_is_the_gaussian_density():
    x, v = randn(10, (1, 2, 2, 2)), randn(11, (1, 2, 2, 2))
    s, s_next, eta = 0.6, 0.4, 0.5
    x_next, lp, mean = sde_step(x, v, s, s_next, eta, 0.9, generator=torch.Generator().manual_seed(0))
    std = eta * math.sqrt(s / (1 - s)) * math.sqrt(s - s_next)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next.float()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, ref, rtol=1e-6, atol=1e-6)


def test_initial_noise_is_one_function_for_every_caller():
    shape = latent_shape(3, 48, 64)
    assert shape == (3, 16, 6, 8)
    full = initial_noise(latent_shape(4, 48, 64), 9)
    assert torch.equal(initial_noise(shape, 9), torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(initial_noise((2, 16, 6, 8), 9, batch_index=[3, 1]), full[[3, 1]])
    with pytest.raises(ZImageError, match="batch_index"):
        initial_noise((2, 16, 6, 8), 9, batch_index=[0])


# ---------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize(
    "plan, rules",
    [
        (MemoryPlan("full"), {"text_encoder": (), "dit": (), "vae": ()}),
        (
            MemoryPlan("text-encoder-offload", offload_text_encoder=True),
            {"text_encoder": ("dit", "vae"), "dit": ("text_encoder", "vae"), "vae": ("text_encoder",)},
        ),
        (
            MemoryPlan("sequential", dit_swap=4, offload_text_encoder=True, offload_dit=True),
            {"text_encoder": ("dit", "vae"), "dit": ("text_encoder", "vae"), "vae": ("dit", "text_encoder")},
        ),
    ],
)
def test_stage_parks_what_the_plan_wants_off_the_device(plan, rules, monkeypatch):
    moves = []
    monkeypatch.setattr(Residency, "place", lambda self, name, c, extras=(): moves.append(("place", name)))
    monkeypatch.setattr(Residency, "park", lambda self, name, c: moves.append(("park", name)))
    res = Residency(MemoryMode(plan.mode), torch.device("cpu"))
    res.plan = plan
    others = {"text_encoder": object(), "dit": object(), "vae": object()}
    for stage, evicted in rules.items():
        moves.clear()
        with res.stage(stage, others[stage], others):
            assert moves == [("park", n) for n in evicted] + [("place", stage)]
        parked_after = [("park", stage)] if plan.parks_after(stage) else []
        assert moves[len(evicted) + 1 :] == parked_after
    moves.clear()
    released = []
    with res.stage("dit", others["dit"], others, release=released.append):
        pass
    assert released == ["dit"]
    moves.clear()
    with res.stage("text_encoder", others["text_encoder"], others, place=False):
        pass
    assert moves == []  # cached prompts: nothing moves


def test_residency_takes_only_a_parsed_mode():
    with pytest.raises(TypeError, match="MemoryMode"):
        Residency("full", torch.device("cpu"))
    assert MemoryMode.of("block-swap", 8) == parse_memory_mode("block-swap:8")
    assert MemoryMode.of("sequential", 3) == MemoryMode("sequential")
    for bad in [("block-swap", 0), ("block-swap", None), ("block-swap", True), ("lowvram", None)]:
        with pytest.raises(ZImageError):
            MemoryMode.of(*bad)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--out", "o.png", "--memory", "block-swap:3"])
    assert args.memory == MemoryMode("block-swap", 3)  # parsed once, at the edge


# ---------------------------------------------------------------------------------------------- dtype names
def test_one_dtype_table_with_torch_aliases():
    for short, alias in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        assert dtype_from_name(short) == dtype_from_name(alias) == getattr(torch, alias)
        assert short in DTYPE_NAMES and alias in DTYPE_NAMES
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.bfloat16
    with pytest.raises(ZImageError, match="unknown dtype 'fp8'"):
        dtype_from_name("fp8")
    args = build_parser().parse_args(["generate", "--prompt", "x", "--out", "o.png", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16" and resolve_dtype(args.dtype, "cpu") == torch.bfloat16
