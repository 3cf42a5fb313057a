"""FlowSDE, the stochastic step RL rolls out with: its marginal mean is the Euler step, its recorded log-probs are
what ``sde_step`` gives when it re-scores the same transition, ``sde_steps`` limits the noise to a window (Euler
elsewhere), and ``sde_scale`` is the spread of the states it draws."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_core.errors import ZImageError
from zimage_core.sampling import Euler, FlowSDE, run_solver, sde_scale, sde_step
from zimage_core.schedules import flow_sigmas


def model_fn(x, sigma):
    # a smooth nonlinear velocity field that depends on sigma
    return torch.tanh(x) * (0.5 + sigma.view(-1, 1, 1, 1)) - 0.3 * x


def test_recorded_log_probs_equal_rescored_ones():
    x0 = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    sig = flow_sigmas(6, 3.0)
    solver = FlowSDE(eta=0.7, generator=torch.Generator().manual_seed(1), keep_states=True)
    out = run_solver(model_fn, x0, sig, solver)
    sf = sig.tolist()
    assert len(solver.states) == 7 and torch.equal(solver.states[-1], out)
    assert solver.log_prob_steps == list(range(5))  # the step to sigma 0 is deterministic: no log-prob
    for i, lp in zip(solver.log_prob_steps, solver.log_probs):
        x = solver.states[i]
        v = model_fn(x, sig[i].expand(3))
        _, again, _ = sde_step(x, v, sf[i], sf[i + 1], 0.7, sf[1], x_next=solver.states[i + 1])
        assert lp.dtype == torch.float32 and lp.shape == (3,)
        torch.testing.assert_close(again, lp, rtol=0, atol=1e-6)
        # another velocity makes the recorded state less likely
        _, worse, _ = sde_step(x, v + 2.0, sf[i], sf[i + 1], 0.7, sf[1], x_next=solver.states[i + 1])
        assert bool((worse < lp).all())


def test_sde_window_is_euler_outside_and_seeded_inside():
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sig = flow_sigmas(8, 3.0)
    euler = run_solver(model_fn, x0, sig, Euler())
    # no stochastic step at all: exactly the Euler solver
    none = FlowSDE(0.9, torch.Generator().manual_seed(0), sde_steps=[])
    assert torch.equal(run_solver(model_fn, x0, sig, none), euler) and none.log_probs == []
    win = FlowSDE(0.9, torch.Generator().manual_seed(0), keep_states=True, sde_steps=[2, 3])
    a = run_solver(model_fn, x0, sig, win)
    assert win.log_prob_steps == [2, 3] and not torch.equal(a, euler)
    # the steps before the window are Euler's
    e = FlowSDE(0.9, torch.Generator().manual_seed(5), keep_states=True, sde_steps=[])
    run_solver(model_fn, x0, sig, e)
    assert torch.equal(win.states[2], e.states[2]) and not torch.equal(win.states[3], e.states[3])
    b = run_solver(model_fn, x0, sig, FlowSDE(0.9, torch.Generator().manual_seed(0), sde_steps=[2, 3]))
    assert torch.equal(a, b)  # seeded
    with pytest.raises(ZImageError, match="eta"):
        FlowSDE(eta=0.0)


def test_sde_scale_is_the_spread_of_the_drawn_states():
    x = torch.zeros(4000, 1, 4, 4)
    v = torch.ones_like(x)
    s, s_next, eta = 0.6, 0.45, 0.8
    draws, _, mean = sde_step(x, v, s, s_next, eta, 0.95, generator=torch.Generator().manual_seed(2))
    scale = sde_scale(s, s_next, eta, 0.95)
    assert scale == pytest.approx(eta * math.sqrt(s / (1 - s)) * math.sqrt(s - s_next))
    assert float((draws - mean).std()) == pytest.approx(scale, rel=0.02)
    assert sde_scale(0.3, 0.0, eta, 0.95) == 0.0
    # at sigma = 1 the schedule's second sigma stands in for sigma in the denominator
    assert sde_scale(1.0, 0.95, eta, 0.95) == pytest.approx(eta * math.sqrt(1 / 0.05) * math.sqrt(0.05))
