"""The RL objectives against hand computations: Diffusion-DPO with both Z-Image flips, group-relative and
composite advantages, the clipped ratio, the closed-form KL, pair building, the curriculum and step selection."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from train.lora_train import add_lora
from train.model import init_weights
from train.rl import dpo as D
from train.rl import grpo as G
from train.rl.trainer import adapters_off
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT


@pytest.fixture(scope="module")
def dits():
    """A base DiT (nothing at zero) and a copy with LoRA adapters that change its output."""
    torch.manual_seed(0)
    base = init_weights(ZImageDiT(DiTConfig.tiny()), seed=3)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy = copy.deepcopy(base)
    add_lora(policy, 4, 4.0, [r"attention\.qkv$", r"feed_forward\.w2$"], seed=1)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n.endswith("lora.up"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
    return base.eval(), policy.eval()


def test_dpo_loss_matches_a_hand_computed_reference(dits):
    base, policy = dits
    g = torch.Generator().manual_seed(5)
    b, beta = 3, 50.0
    x_w, x_l, noise = (torch.randn(b, 16, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.2, 0.55, 0.9])
    caps = [torch.randn(5 + i, policy.cfg.cap_feat_dim, generator=g) for i in range(b)]

    # by hand, in the diffusers convention: v = -dit(x_sigma, t = 1 - sigma), target u = noise - x0
    def err(model, x0):
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * noise
        v = -model(xs, 1.0 - sigma, caps)
        return ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))

    with torch.no_grad():
        inside = (err(policy, x_w) - err(base, x_w)) - (err(policy, x_l) - err(base, x_l))
        expected = -F.logsigmoid(-beta / 2 * inside)
        # the library: raw outputs against x0 - noise, the reference being the same DiT with its LoRA off
        xs_w, xs_l = D.noised_pair(x_w, x_l, noise, sigma)
        t = 1.0 - sigma
        e_w, e_l = D.flow_errors(policy(xs_w, t, caps), x_w, noise), D.flow_errors(policy(xs_l, t, caps), x_l, noise)
        with adapters_off(policy) as ref:
            r_w, r_l = D.flow_errors(ref(xs_w, t, caps), x_w, noise), D.flow_errors(ref(xs_l, t, caps), x_l, noise)
            # the base's output (to kernel rounding: patched layers run F.linear, plain ones oneDNN)
            torch.testing.assert_close(ref(xs_w, t, caps), base(xs_w, t, caps), rtol=1e-5, atol=1e-5)
    loss, stats = D.dpo_loss(e_w, e_l, r_w, r_l, beta)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(inside.abs().min()) > 1e-4  # the LoRA really changed the errors
    assert not torch.equal(policy(xs_w, t, caps), base(xs_w, t, caps))  # adapters back on after the block
    # beta scales the logit; at policy == reference the loss is log 2
    l2, _ = D.dpo_loss(e_w, e_l, r_w, r_l, 2 * beta)
    torch.testing.assert_close(l2, -F.logsigmoid(-beta * inside), rtol=1e-5, atol=1e-6)
    l0, st0 = D.dpo_loss(r_w, r_l, r_w, r_l, beta)
    torch.testing.assert_close(l0, torch.full((b,), 0.6931472), rtol=0, atol=1e-6)
    assert stats["dpo_accuracy"] == pytest.approx(float((inside < 0).float().mean()))


def test_grid_sigmas_come_from_the_sampler_grid():
    grid = [1.0, 0.9, 0.75, 0.5, 0.0]
    s = D.grid_sigmas(200, grid, torch.Generator().manual_seed(0))
    # every nonzero grid point is used (sigma = 1 just below 1, so the clean latent still enters)
    assert {round(v, 4) for v in s.tolist()} == {0.9999, 0.9, 0.75, 0.5}


def test_pairs_and_curriculum_order():
    scores = {
        0: [(0, 0.9), (1, 0.1), (2, 0.5), (3, 0.45)],  # gaps: 0.8 (0-1), 0.45, 0.4, 0.35, 0.05 ...
        1: [(4, 0.30), (5, 0.28)],  # one subtle pair only
        2: [(6, 0.5), (7, 0.5)],  # equal: no pair
    }
    pairs = D.build_pairs(scores, min_gap=0.0, pairs_per_prompt=3)
    p0 = [p for p in pairs if p.prompt == 0]
    assert (p0[0].chosen, p0[0].rejected) == (0, 1) and p0[0].gap == pytest.approx(0.8)  # the largest gap first
    assert len(p0) == 3 and p0[-1].gap == pytest.approx(0.05)  # spread down to the subtlest
    assert all(p.chosen != p.rejected and p.gap > 0 for p in pairs)
    assert not [p for p in pairs if p.prompt == 2]
    assert D.build_pairs(scores, min_gap=0.1, pairs_per_prompt=10)[-1].gap >= 0.1
    prompts = ["a cat", "a red cat on a blue mat under a tree", "a dog"]
    levels = D.prompt_levels(prompts, 2)
    assert levels == [0, 1, 0]
    assert D.prompt_levels(prompts, 2, [None, 0, 5]) == [0, 0, 5]
    order = D.curriculum_order(pairs, levels, torch.Generator().manual_seed(0))
    ranks = [p.level for p in order]
    assert ranks == sorted(ranks)
    # easy prompt with a large gap comes first; the subtle pair of the long prompt comes last
    assert (order[0].prompt, order[0].chosen, order[0].rejected) == (0, 0, 1)
    assert order[-1].prompt == 1
    # competence: only the first part of the order early on, everything after the warm-up
    assert D.competence(0, 0.3, 10) == pytest.approx(0.3) and D.competence(10, 0.3, 10) == 1.0
    g = torch.Generator().manual_seed(1)
    early = {i for _ in range(50) for i in D.curriculum_batch(20, 2, 0, 0.3, 10, g)}
    late = {i for _ in range(200) for i in D.curriculum_batch(20, 2, 10, 0.3, 10, g)}
    assert early == set(range(6)) and late == set(range(20))


def test_group_relative_and_composite_advantages():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    r1 = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    r2 = torch.tensor([0.0, 0.5, 0.1, 1.0, 2.0, 3.0])

    def norm(r, std=None):
        out = torch.empty_like(r)
        for g in (0, 1):
            m = groups == g
            s = r[m].std(unbiased=False) if std is None else std
            out[m] = (r[m] - r[m].mean()) / (s + 1e-4)
        return out

    adv, valid = G.advantages({"a": r1}, {"a": 1.0}, groups, clip=0)
    torch.testing.assert_close(adv, norm(r1))
    assert valid.all()
    # composite: each reward normalised in its group, then weighted: scales do not matter, weights do
    adv, _ = G.advantages({"a": r1, "b": r2}, {"a": 0.7, "b": 0.3}, groups, clip=0)
    torch.testing.assert_close(adv, 0.7 * norm(r1) + 0.3 * norm(r2))
    adv_scaled, _ = G.advantages({"a": r1 * 1000, "b": r2}, {"a": 0.7, "b": 0.3}, groups, clip=0)
    torch.testing.assert_close(adv_scaled, adv, atol=1e-3, rtol=1e-4)
    # reward aggregation: the weighted sum is normalised
    adv, _ = G.advantages({"a": r1, "b": r2}, {"a": 0.7, "b": 0.3}, groups, aggregate="reward", clip=0)
    torch.testing.assert_close(adv, norm(0.7 * r1 + 0.3 * r2))
    # global std
    adv, _ = G.advantages({"a": r1}, {"a": 1.0}, groups, std="global", clip=0)
    torch.testing.assert_close(adv, norm(r1, r1.std(unbiased=False)))
    # a group with all-equal rewards carries no signal; clipping
    flat = torch.tensor([1.0, 1.0, 1.0, 0.0, 5.0, 1.0])
    adv, valid = G.advantages({"a": flat}, {"a": 1.0}, groups, clip=1.0)
    assert valid.tolist() == [False, False, False, True, True, True]
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and float(adv.abs().max()) == pytest.approx(1.0)


def test_clipped_objective_and_kl():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.05])
    old = torch.zeros(5)
    loss, st = G.clipped_objective(ratio.log(), old, adv, 0.2)
    # PPO: min(r A, clip(r) A), negated
    expected = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(loss, expected)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8, -2.1])
    assert st["clipfrac"] == pytest.approx(0.8)
    # the gradient vanishes where the clip is active and A pushes further out
    lp = ratio.log().clone().requires_grad_(True)
    G.clipped_objective(lp, old, adv, 0.2)[0].sum().backward()
    assert lp.grad.tolist()[0] == 0.0 and lp.grad.tolist()[3] == 0.0 and lp.grad.tolist()[1] != 0.0
    mean, ref = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(G.gaussian_kl(mean, ref, 0.5), torch.tensor([1.0 / 0.5, (4 / 3) / 0.5]))


def test_trained_steps_and_the_window():
    assert G.trained_steps([0, 1, 2, 3, 4, 5, 6], "all") == [0, 1, 2, 3, 4, 5, 6]
    sub = G.trained_steps(list(range(10)), "random", 0.6, random.Random(0))
    assert len(sub) == 6 and sub == sorted(sub) and set(sub) <= set(range(10))
    # 8 sampler steps: steps 0..6 can be stochastic; a window of 3 slides every 2 iterations, then wraps
    starts = [G.window_steps(8, 3, 2, it)[0] for it in range(12)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
    assert G.window_steps(8, 3, 0, 99) == [0, 1, 2]
    assert G.window_steps(8, 20, 1, 3) == list(range(7))
