"""The sampling loop, its solvers, CFG helpers, initial noise and img2img / inpainting plumbing.

Conventions (see ``docs/model.md``):

- Latents are float32 ``[B, 16, h, w]``; sigma goes 1 (noise) -> 0 (clean);
  ``x_sigma = (1 - sigma) * x0 + sigma * noise``.
- ``model_fn(x, sigma) -> v`` takes ``sigma`` as a float32 ``[B]`` tensor on ``x.device`` and returns the
  velocity ``v = noise - x0`` (the DiT output after the sign flip), so an Euler step is
  ``x + (sigma_next - sigma) * v`` and ``denoised = x - v * sigma``. The DiT timestep is
  :func:`model_t` ``(sigma)``; CFG, Omni conditioning and control hints live inside ``model_fn``
  (:mod:`zimage_core.guidance` builds it). The model function is the extension point: anything that changes
  what the model predicts wraps or replaces it.
- :func:`run_solver` is the one loop. A :class:`Solver` is a step rule (``euler``, ``res_multistep``,
  ``heun``, ``dpmpp_2m``, and :class:`FlowSDE`, the stochastic step that records log-probabilities for RL);
  :func:`sample` adds the img2img start and inpainting around it. ``callback(i, total, x, denoised)`` runs
  after step ``i``; ``cancel()`` is polled before every step and a true result raises :class:`Cancelled`.
  Sigmas are read to the host once; the step loop never syncs with the device.

``euler`` is diffusers ``FlowMatchEulerDiscreteScheduler.step`` bit for bit. ``res_multistep``, ``heun`` and
``dpmpp_2m`` follow ComfyUI's k-diffusion functions for a CONST (flow) model with the same float32 op order:
``denoised = x - v * sigma`` and per-step scalar coefficients computed as 0-dim tensors on the device.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import VAE_DOWNSCALE
from .errors import Cancelled, ZImageError
from .schedules import comfy_simple_sigmas, flow_sigmas, img2img_sigmas, model_t

__all__ = [
    "SAMPLERS",
    "SOLVERS",
    "Cancelled",
    "DPMpp2M",
    "Euler",
    "FlowSDE",
    "Heun",
    "ResMultistep",
    "Run",
    "Solver",
    "cfg_active",
    "cfg_combine",
    "comfy_simple_sigmas",
    "flow_sigmas",
    "get_sampler",
    "img2img_sigmas",
    "initial_noise",
    "inpaint_blend",
    "inpaint_model_fn",
    "latent_shape",
    "make_solver",
    "model_t",
    "noise_latent",
    "perturb_initial",
    "prepare_mask",
    "run_solver",
    "sample",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sample_res_multistep",
    "sde_scale",
    "sde_step",
]

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
CancelFn = Callable[[], bool]


class Run:
    """What a solver's step sees: the schedule (host floats ``sf`` and the device tensor ``sig``), the batch size
    and :meth:`velocity`, the model call. Built by :func:`run_solver` once per sampling run."""

    def __init__(self, model_fn: ModelFn, x: torch.Tensor, sigmas, want_denoised: bool):
        s = torch.as_tensor(sigmas, dtype=torch.float32)
        if s.ndim != 1:
            raise ZImageError(f"sigmas must be a 1-D schedule, got shape {tuple(s.shape)}.")
        self.sf = s.detach().cpu().tolist()  # the only device->host read; done before the loop
        self.sig = s.to(device=x.device, dtype=torch.float32)
        self.steps = max(len(self.sf) - 1, 0)
        self.batch = x.shape[0]
        self.model_fn = model_fn
        self.want_denoised = want_denoised  # a callback reads it; solvers that need it compute it anyway

    def velocity(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's velocity at ``x`` for schedule entry ``i`` (``sigma`` passed as a ``[B]`` view of it)."""
        v = self.model_fn(x, self.sig[i].expand(self.batch))
        return v if v.dtype == x.dtype else v.to(x.dtype)


class Solver:
    """A step rule: ``step(run, i, x) -> (x_next, denoised or None)``, going from ``sig[i]`` to ``sig[i + 1]``.

    A solver calls ``run.velocity`` as often as it needs (Heun twice). Multistep solvers keep their history on
    the instance, so :func:`run_solver` calls :meth:`begin` first and one instance serves one run at a time.
    """

    name = ""

    def begin(self, run: Run) -> None:
        """Reset per-run state."""

    def step(self, run: Run, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def _t(sigma: torch.Tensor) -> torch.Tensor:
    # k-diffusion t_fn: t = -log(sigma). Finite at sigma = 1 (t = 0); +inf at sigma = 0.
    return sigma.log().neg()


class Euler(Solver):
    """First-order Euler, ``x + (sigma_next - sigma) * v``: diffusers FlowMatchEulerDiscreteScheduler.step."""

    name = "euler"

    def step(self, run, i, x):
        sig = run.sig
        v = run.velocity(x, i)
        denoised = x - v * sig[i] if run.want_denoised else None
        return x + (sig[i + 1] - sig[i]) * v, denoised


class ResMultistep(Solver):
    """ComfyUI ``sample_res_multistep`` (eta 0): 2nd-order exponential multistep on denoised.

    The first step and the step to sigma 0 are Euler steps ``x + (x - denoised)/sigma * dt``.
    """

    name = "res_multistep"

    def begin(self, run):
        self.old = None

    def step(self, run, i, x):
        sig, sf = run.sig, run.sf
        s = sig[i]
        v = run.velocity(x, i)
        denoised = x - v * s
        if self.old is None or sf[i + 1] == 0:
            d = (x - denoised) / s
            x = x + d * (sig[i + 1] - s)
        else:
            # With eta 0 the previous step's sigma_down is sigma_i, so t_old == t.
            t, t_next, t_prev = _t(s), _t(sig[i + 1]), _t(sig[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            neg_h = -h
            phi1 = torch.expm1(neg_h) / neg_h
            phi2 = (phi1 - 1.0) / neg_h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * self.old)
        self.old = denoised
        return x, denoised


class Heun(Solver):
    """k-diffusion / ComfyUI Heun (2 model calls per step; plain Euler on the final step to sigma 0)."""

    name = "heun"

    def step(self, run, i, x):
        sig, sf = run.sig, run.sf
        s, s_next = sig[i], sig[i + 1]
        v = run.velocity(x, i)
        denoised = x - v * s
        d = (x - denoised) / s
        dt = s_next - s
        if sf[i + 1] == 0:
            return x + d * dt, denoised
        x_2 = x + d * dt
        v_2 = run.velocity(x_2, i + 1)
        denoised_2 = x_2 - v_2 * s_next
        d_2 = (x_2 - denoised_2) / s_next
        return x + (d + d_2) / 2 * dt, denoised


class DPMpp2M(Solver):
    """ComfyUI ``sample_dpmpp_2m`` (DPM-Solver++(2M)) applied to a flow model.

    Like ComfyUI, it uses ``t = -log(sigma)`` for every model type (not the flow log-SNR
    ``log((1-sigma)/sigma)``), so sigma = 1 is finite (t = 0) and needs no offset. The first step and the step
    to sigma 0 are first order; the latter returns ``denoised`` exactly.
    """

    name = "dpmpp_2m"

    def begin(self, run):
        self.old = None

    def step(self, run, i, x):
        sig, sf = run.sig, run.sf
        s = sig[i]
        v = run.velocity(x, i)
        denoised = x - v * s
        t, t_next = _t(s), _t(sig[i + 1])
        h = t_next - t
        ratio = t_next.neg().exp() / t.neg().exp()
        if self.old is None or sf[i + 1] == 0:
            x = ratio * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sig[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.old
            x = ratio * x - (-h).expm1() * denoised_d
        self.old = denoised
        return x, denoised


class FlowSDE(Solver):
    """A stochastic step with the Euler step's marginals (Flow-GRPO's SDE), recording log-probabilities for RL.

    With ``std = eta * sqrt(sigma / (1 - sigma))`` (at sigma = 1 the schedule's second sigma stands in, as in
    Flow-GRPO) the next state is Gaussian with mean ``x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) /
    (2 sigma)) dt`` and standard deviation ``std sqrt(-dt)``; the step to sigma 0 is a plain Euler step.
    ``log_probs`` holds the per-sample mean log-density (float32; see :func:`sde_step`) of each stochastic step's
    drawn state, ``log_prob_steps`` the step index of each, and ``states`` the visited states (``states[0]`` is
    the start) when ``keep_states``. ``sde_steps`` (step indices; None = every step) limits the noise to a window
    or subset of the steps, as MixGRPO does: the other steps are deterministic Euler steps and record nothing.
    Noise comes from ``generator`` on the CPU, so a seed gives the same trajectory on any device.
    """

    name = "flow_sde"

    def __init__(
        self,
        eta: float = 0.7,
        generator: torch.Generator | None = None,
        keep_states: bool = False,
        sde_steps=None,
    ):
        if not math.isfinite(eta) or eta <= 0:
            raise ZImageError(f"FlowSDE eta must be a positive number, got {eta!r}.")
        self.eta, self.generator, self.keep_states = float(eta), generator, keep_states
        self.sde_steps = None if sde_steps is None else frozenset(int(i) for i in sde_steps)
        self.log_probs: list[torch.Tensor] = []
        self.log_prob_steps: list[int] = []
        self.states: list[torch.Tensor] = []

    def begin(self, run):
        self.log_probs, self.log_prob_steps, self.states = [], [], []

    def step(self, run, i, x):
        if self.keep_states and not self.states:
            self.states.append(x)
        v = run.velocity(x, i)
        if self.sde_steps is not None and i not in self.sde_steps:
            x_next = x + (run.sig[i + 1] - run.sig[i]) * v  # the Euler solver's step
        else:
            s, s_next = run.sf[i], run.sf[i + 1]
            sigma_max = run.sf[1] if len(run.sf) > 1 else s
            x_next, log_prob, _ = sde_step(x, v, s, s_next, self.eta, sigma_max, generator=self.generator)
            if log_prob is not None:
                self.log_probs.append(log_prob)
                self.log_prob_steps.append(i)
        if self.keep_states:
            self.states.append(x_next)
        denoised = x - v * run.sig[i] if run.want_denoised else None
        return x_next, denoised


def _sde_std(sigma: float, eta: float, sigma_max: float) -> float:
    s_eff = sigma_max if sigma >= 1.0 else sigma
    return eta * math.sqrt(sigma / (1.0 - s_eff))


def sde_scale(sigma: float, sigma_next: float, eta: float, sigma_max: float) -> float:
    """The standard deviation ``std * sqrt(-dt)`` of a :class:`FlowSDE` transition (0 for the step to sigma 0);
    what a closed-form KL between two policies' transitions divides by."""
    if sigma_next == 0:
        return 0.0
    return _sde_std(sigma, eta, sigma_max) * math.sqrt(-(float(sigma_next) - float(sigma)))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    sigma_max: float,
    x_next: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One :class:`FlowSDE` transition from ``sigma`` to ``sigma_next``: ``(x_next, log_prob, mean)``.

    Given ``x_next`` (a recorded trajectory) it is only scored, which is how a policy-gradient update evaluates
    the log-probability of an old rollout under the current model. ``log_prob`` is ``[B]`` float32, the mean over
    a sample's elements of the Gaussian log-density; None for the deterministic step to sigma 0.
    """
    xf, vf = x.float(), v.float()
    dt = float(sigma_next) - float(sigma)
    if sigma_next == 0:
        mean = xf + dt * vf
        return (mean.to(x.dtype) if x_next is None else x_next), None, mean
    std = _sde_std(sigma, eta, sigma_max)
    mean = xf * (1.0 + std**2 / (2.0 * sigma) * dt) + vf * (1.0 + std**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    if x_next is None:
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x_next = (mean + scale * eps).to(x.dtype)
    diff = x_next.float() - mean
    log_prob = -(diff**2) / (2.0 * scale**2) - math.log(scale) - 0.5 * math.log(2.0 * math.pi)
    return x_next, log_prob.mean(dim=tuple(range(1, x.ndim))), mean


#: Solver name -> class (a fresh instance per run).
SOLVERS: dict[str, type[Solver]] = {c.name: c for c in (Euler, ResMultistep, Heun, DPMpp2M)}


def make_solver(solver: str | Solver) -> Solver:
    """A :class:`Solver` from its name (a fresh instance) or as given; an unknown name lists the valid ones."""
    if isinstance(solver, Solver):
        return solver
    try:
        return SOLVERS[solver]()
    except (KeyError, TypeError):
        raise ZImageError(f"Unknown sampler {solver!r}; valid samplers: {', '.join(SOLVERS)}.") from None


def run_solver(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas,
    solver: str | Solver = "euler",
    callback: StepCallback | None = None,
    cancel: CancelFn | None = None,
) -> torch.Tensor:
    """The sampling loop: every solver, every caller. ``x`` is the state at ``sigmas[0]``.

    ``cancel()`` is polled before every step (a true result raises :class:`Cancelled`); ``callback(i, total, x,
    denoised)`` runs after step ``i``. Gradients flow or not as the caller's mode says (no inference mode here).
    """
    solver = make_solver(solver)
    run = Run(model_fn, x, sigmas, want_denoised=callback is not None)
    logger.debug("%s: %d steps, sigmas %s", solver.name, run.steps, run.sf)
    solver.begin(run)
    for i in range(run.steps):
        if cancel is not None and cancel():
            raise Cancelled(f"Sampling cancelled before step {i + 1} of {run.steps}.")
        x, denoised = solver.step(run, i, x)
        if callback is not None:
            callback(i, run.steps, x, denoised)
    return x


def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    sigmas,
    solver: str | Solver = "euler",
    *,
    init: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    cancel: CancelFn | None = None,
) -> torch.Tensor:
    """Text-to-image, img2img and inpainting through :func:`run_solver`; returns the latents at the schedule's end.

    Starts from ``noise_latent(init or 0, noise, sigmas[0])``. With ``mask`` (1 = repaint; needs ``init``) the
    model function is wrapped by :func:`inpaint_model_fn` and the result blended by :func:`inpaint_blend`.
    ``sigmas`` should already be on ``noise.device`` in float32 when a model function looks sigmas up on the
    host (:class:`~zimage_core.guidance.SigmaLookup` keys on the tensor it was given).
    """
    if mask is not None and init is None:
        raise ZImageError("inpainting needs the latents of the image to keep (init) besides the mask.")
    s0 = float(torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)[0]) if len(sigmas) else 1.0
    x0 = torch.zeros_like(noise) if init is None else init.to(noise.device, torch.float32)
    x = noise_latent(x0, noise, s0)
    if mask is not None:
        mask = mask.to(noise.device)
        model_fn = inpaint_model_fn(model_fn, x0, noise, mask)
    x = run_solver(model_fn, x, sigmas, solver, callback, cancel)
    return x if mask is None else inpaint_blend(x, x0, mask)


def _solver_fn(cls: type[Solver]) -> Callable[..., torch.Tensor]:
    def fn(model_fn: ModelFn, x: torch.Tensor, sigmas, callback=None, cancel=None) -> torch.Tensor:
        return run_solver(model_fn, x, sigmas, cls(), callback, cancel)

    fn.__name__ = fn.__qualname__ = f"sample_{cls.name}"
    fn.__doc__ = f":func:`run_solver` with :class:`{cls.__name__}`. {cls.__doc__.splitlines()[0]}"
    return fn


sample_euler = _solver_fn(Euler)
sample_res_multistep = _solver_fn(ResMultistep)
sample_heun = _solver_fn(Heun)
sample_dpmpp_2m = _solver_fn(DPMpp2M)

#: Sampler name -> ``fn(model_fn, x, sigmas, callback=None, cancel=None) -> x`` (each :func:`run_solver`).
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "res_multistep": sample_res_multistep,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Return the sampler called ``name``; an unknown name raises ZImageError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ZImageError(f"Unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}.") from None


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance (ComfyUI convention: cfg == 1 is off; diffusers guidance_scale g = cfg - 1)


def cfg_combine(pos_v: torch.Tensor, neg_v: torch.Tensor, cfg: float, normalization: float = 0.0) -> torch.Tensor:
    """diffusers Z-Image CFG in float32: ``pos + (cfg-1) * (pos - neg)``, per sample.

    ``normalization > 0`` (diffusers ``cfg_normalization``; True means 1.0) rescales a sample whose global
    vector norm exceeds ``normalization * ||pos||`` down to that norm. ``cfg == 1`` returns ``pos_v`` as is.
    Matches diffusers bit for bit when ``cfg - 1`` equals its ``guidance_scale`` exactly (e.g. integer cfg).
    """
    if math.isclose(cfg, 1.0):
        return pos_v
    g = float(cfg) - 1.0
    pos, neg = pos_v.float(), neg_v.float()
    pred = pos + g * (pos - neg)
    c = float(normalization or 0.0)
    if c > 0.0:
        rows = []
        for j in range(pred.shape[0]):  # per sample, like diffusers; torch.where avoids a host sync
            max_norm = torch.linalg.vector_norm(pos[j]) * c
            norm = torch.linalg.vector_norm(pred[j])
            rows.append(torch.where(norm > max_norm, pred[j] * (max_norm / norm), pred[j]))
        pred = torch.stack(rows, dim=0)
    return pred


def cfg_active(cfg: float, sigma: float, truncation: Optional[float] = 1.0) -> bool:
    """Whether to run the negative branch at ``sigma`` (a python float).

    Off when ``cfg == 1`` (ComfyUI), or when diffusers' ``cfg_truncation`` (applied only if <= 1) is exceeded by
    ``t_norm = (1000 - 1000*sigma)/1000`` in float32. Unlike diffusers, cfg < 1 still counts as active.
    """
    if math.isclose(cfg, 1.0):
        return False
    if truncation is not None and float(truncation) <= 1.0:
        t_norm = float(model_t(float(sigma)))
        if t_norm > float(truncation):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------
# img2img / inpainting


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 1:
        s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    return s


def noise_latent(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``sigma * noise + (1 - sigma) * x0`` (diffusers scale_noise / ComfyUI CONST noise_scaling).

    ``sigma`` is a float, a 0-dim tensor or a per-sample ``[B]`` tensor.
    """
    s = _sigma_like(sigma, x0)
    return s * noise + (1.0 - s) * x0


def inpaint_model_fn(model_fn: ModelFn, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> ModelFn:
    """Wrap ``model_fn`` like ComfyUI ``KSamplerX0Inpaint`` (``mask`` 1 = repaint, 0 = keep ``x0``).

    Before each call the kept region of ``x`` is replaced by ``noise_latent(x0, noise, sigma)``; the model's
    denoised prediction is then blended ``denoised * mask + x0 * (1 - mask)`` and returned as the velocity
    ``(x - denoised) / sigma`` with respect to the sampler's own ``x``. Finish with :func:`inpaint_blend`.
    Start sampling from ``noise_latent(x0, noise, sigmas[0])``.
    """
    mask = mask.to(device=x0.device, dtype=torch.float32)
    keep = 1.0 - mask

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _sigma_like(sigma, x)
        x_in = x * mask + noise_latent(x0, noise, s) * keep
        v = model_fn(x_in, sigma)
        if v.dtype != x.dtype:
            v = v.to(x.dtype)
        denoised = (x_in - v * s) * mask + x0 * keep
        return (x - denoised) / s

    return wrapped


def inpaint_blend(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final blend ``x * mask + x0 * (1 - mask)``: the kept region becomes exactly ``x0``."""
    mask = mask.to(device=x.device, dtype=x.dtype)
    return x * mask + x0 * (1.0 - mask)


def prepare_mask(mask: torch.Tensor, h: int, w: int, batch_size: Optional[int] = None) -> torch.Tensor:
    """Resize a pixel mask ``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` to a latent mask ``[B,1,h,w]`` (float32).

    Like ComfyUI's noise_mask handling (``comfy.utils.reshape_mask``): bilinear interpolation (align_corners
    False), no rounding or thresholding; ``batch_size`` repeats or truncates the batch like
    ``repeat_to_batch_size``.
    """
    m = torch.as_tensor(mask)
    if m.ndim not in (2, 3, 4) or (m.ndim == 4 and m.shape[1] != 1):
        raise ZImageError(f"A mask must be [H,W], [B,H,W] or [B,1,H,W]; got shape {tuple(m.shape)}.")
    m = m.to(torch.float32).reshape((-1, 1, m.shape[-2], m.shape[-1]))
    m = F.interpolate(m, size=(int(h), int(w)), mode="bilinear")
    if batch_size is not None and m.shape[0] != batch_size:
        if m.shape[0] < batch_size:
            m = m.repeat(math.ceil(batch_size / m.shape[0]), 1, 1, 1)
        m = m[:batch_size]
    return m


# ----------------------------------------------------------------------------------------------------------
# Initial noise and schedules


def latent_shape(batch: int, height: int, width: int, channels: int = 16) -> tuple[int, int, int, int]:
    """The latent shape ``[B, C, H/8, W/8]`` for images of ``height x width`` pixels."""
    return (int(batch), int(channels), int(height) // VAE_DOWNSCALE, int(width) // VAE_DOWNSCALE)


def initial_noise(shape, seed: int, batch_index=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The seeded start noise of the CLI, the library and the nodes (identical to diffusers and native ComfyUI).

    One CPU generator seeded with ``seed`` draws the whole batch ``randn(shape)``. With ``batch_index`` (ComfyUI's
    Latent From Batch) item ``j`` gets the ``batch_index[j]``-th ``[1, C, h, w]`` draw, so a sub-batch matches
    the full one.
    """
    gen = torch.Generator("cpu").manual_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    if batch_index is None:
        return torch.randn(shape, generator=gen, dtype=dtype, device="cpu")
    inds = [int(i) for i in batch_index]
    if len(inds) != shape[0] or min(inds) < 0:
        raise ZImageError(f"the latent's batch_index {inds} does not fit its batch of {shape[0]}.")
    draws = [torch.randn((1, *shape[1:]), generator=gen, dtype=dtype, device="cpu") for _ in range(max(inds) + 1)]
    return torch.cat([draws[i] for i in inds], dim=0)


# ----------------------------------------------------------------------------------------------------------
# Seed variance for Turbo


def _variance_seed(seed: int) -> int:
    # A fixed, documented bijection of the seed, so the extra noise differs from the initial noise itself.
    return (int(seed) * 6364136223846793005 + 1442695040888963407) % (1 << 64)


def perturb_initial(noise: torch.Tensor, seed: int, strength: float = 0.0, scale: int = 8) -> torch.Tensor:
    """Mix a second, low-frequency seeded noise into the initial noise (off when ``strength`` is 0).

    Turbo maps different white noises to similar compositions. This adds ``strength`` times a field drawn at
    ``1/scale`` of the latent size (``torch.Generator("cpu")`` seeded with a fixed function of ``seed``),
    bilinearly upsampled and scaled to unit RMS per sample, then divides by ``sqrt(1 + strength**2)`` so the
    result keeps unit variance. The large-scale structure it adds is what varies the layout between seeds;
    ``scale=1`` (white noise) would only be equivalent to another seed. Deterministic for a given seed,
    shape and strength. Suggested strength 0.1-0.5; not tuned against the real model.
    """
    if strength is None or strength <= 0.0:
        return noise
    if scale < 1:
        raise ZImageError(f"perturb_initial scale must be >= 1, got {scale!r}.")
    b, c, h, w = noise.shape
    gen = torch.Generator("cpu").manual_seed(_variance_seed(seed))
    low = torch.randn(
        (b, c, max(1, math.ceil(h / scale)), max(1, math.ceil(w / scale))), generator=gen, dtype=torch.float32
    )
    if low.shape[-2:] != (h, w):
        low = F.interpolate(low, size=(h, w), mode="bilinear")
    rms = low.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    low = (low / rms).to(device=noise.device, dtype=noise.dtype)
    return (noise + float(strength) * low) / math.sqrt(1.0 + float(strength) ** 2)
