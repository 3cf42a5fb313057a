"""Drawing images for RL through the engine's own pipeline: DPO candidates (seeded, deterministic sampler) and
GRPO rollouts (:class:`zimage_core.sampling.FlowSDE`, recording every visited state and the per-step fp32
log-probabilities).

Both go through :meth:`zimage_core.pipeline.ZImagePipeline.sample` (and so ``denoise_latents``, the one model
function and the one sampling loop), with the pipeline's memory mode when ``memory`` is given: the DiT is placed
(or its blocks streamed) for the draw and put back on the training device afterwards. Decoding goes through
:meth:`~zimage_core.pipeline.ZImagePipeline.decode`. Images for rewards are ``[B, 3, H, W]`` in 0..1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.sampling import FlowSDE, initial_noise, latent_shape
from zimage_core.vae import tensor_to_pil
from zimage_core.weights import save_safetensors

log = logging.getLogger(__name__)


def make_pipeline(dit, vae, device: torch.device, memory: str = "") -> ZImagePipeline:
    return ZImagePipeline(dit, None, vae, device, memory=memory or None)


def restore_placement(pipe: ZImagePipeline, dit, device: torch.device) -> None:
    """After a draw under a memory mode: drop the streaming and put the DiT back whole on the training device."""
    if pipe.residency is not None:
        pipe.residency.forget("dit")
        dit.to(device)


def draw(
    pipe: ZImagePipeline, cond: list, uncond: list | None, noise: torch.Tensor, opts: GenerateOptions, solver=None
) -> torch.Tensor:
    """Model-space latents ``[B, 16, h, w]`` from ``noise`` (``solver``: a :class:`Solver` instead of
    ``opts.sampler``), as plain tensors (outside inference mode)."""
    if solver is not None:
        opts = GenerateOptions(**{**opts.__dict__, "sampler": solver})
    was_training = pipe.dit.training
    pipe.dit.eval()
    try:
        out = pipe.sample(cond, uncond, noise, opts)
    finally:
        pipe.dit.train(was_training)
    return out.clone()


def to_images(pipe: ZImagePipeline, latents: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in 0..1, float32 ``[B, 3, H, W]`` on the CPU."""
    return ((pipe.decode(latents).float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).clone()


def draw_options(rl, sampler: str = "euler") -> GenerateOptions:
    return GenerateOptions(
        prompt="",
        width=rl.width,
        height=rl.height,
        steps=rl.steps,
        cfg=rl.cfg,
        shift=rl.shift,
        sampler=sampler,
    )


# ---------------------------------------------------------------------------------------------
# GRPO rollouts
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One batch of SDE trajectories: ``states[i]`` is the state before step ``i`` (``states[-1]`` the result),
    ``log_probs[j]`` the log-probability of the transition at step ``sde_steps[j]`` (float32 ``[B]``)."""

    states: list[torch.Tensor]
    log_probs: list[torch.Tensor]
    sde_steps: list[int]
    sigmas: list[float]
    eta: float

    @property
    def latents(self) -> torch.Tensor:
        return self.states[-1]


def rollout(
    pipe: ZImagePipeline,
    cond: list,
    uncond: list | None,
    noise: torch.Tensor,
    opts: GenerateOptions,
    eta: float,
    generator: torch.Generator,
    sde_steps: list[int] | None = None,
) -> Rollout:
    """SDE trajectories from ``noise`` with the pipeline's current weights (no gradients)."""
    from zimage_core.schedules import img2img_sigmas

    solver = FlowSDE(eta=eta, generator=generator, keep_states=True, sde_steps=sde_steps)
    draw(pipe, cond, uncond, noise, opts, solver)
    states = [s.clone() for s in solver.states]
    return Rollout(
        states=states,
        log_probs=[lp.clone().float() for lp in solver.log_probs],
        sde_steps=list(solver.log_prob_steps),
        sigmas=img2img_sigmas(opts.steps, opts.shift, 1.0).tolist(),
        eta=eta,
    )


# ---------------------------------------------------------------------------------------------
# DPO candidates
# ---------------------------------------------------------------------------------------------
def candidate_id(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:05d}-{seed}"


def generate_candidates(
    pipe: ZImagePipeline,
    prompts: list[str],
    cond: list[torch.Tensor],
    uncond: torch.Tensor | None,
    rl,
    folder: Path,
    indices: list[int],
    shard: str = "rank0",
    write_images: bool = True,
) -> Path:
    """Draw ``rl.candidates`` images for each prompt index in ``indices`` (seed ``rl.candidate_seed + k``, the
    seed ``zimage generate --seed`` takes) and write ``latents-<shard>.safetensors`` and
    ``candidates-<shard>.jsonl`` (``id``, ``prompt_index``, ``prompt``, ``seed``, ``image``) into ``folder``,
    the images as ``images/<id>.png`` for an external judge. Returns the JSONL path."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = draw_options(rl)
    jobs = [(i, rl.candidate_seed + k) for i in indices for k in range(rl.candidates)]
    records, latents = [], {}
    for start in range(0, len(jobs), rl.candidate_batch):
        chunk = jobs[start : start + rl.candidate_batch]
        shape = latent_shape(1, rl.height, rl.width)
        noise = torch.cat([initial_noise(shape, seed) for _, seed in chunk])
        c = [cond[i] for i, _ in chunk]
        u = [uncond] * len(chunk) if uncond is not None else None
        lat = draw(pipe, c, u, noise, opts)
        imgs = tensor_to_pil(pipe.decode(lat)) if write_images else [None] * len(chunk)
        for (i, seed), z, img in zip(chunk, lat.cpu(), imgs):
            cid = candidate_id(i, seed)
            latents[cid] = z.contiguous()
            rec = {"id": cid, "prompt_index": i, "prompt": prompts[i], "seed": seed}
            if img is not None:
                (folder / "images").mkdir(exist_ok=True)
                img.save(folder / "images" / f"{cid}.png")
                rec["image"] = f"images/{cid}.png"
            records.append(rec)
    tmp = folder / f".latents-{shard}.safetensors"
    save_safetensors(latents or {"_empty": torch.zeros(0)}, tmp)
    tmp.replace(folder / f"latents-{shard}.safetensors")
    jsonl = folder / f"candidates-{shard}.jsonl"
    tmpj = jsonl.with_name("." + jsonl.name)
    tmpj.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmpj.replace(jsonl)
    log.info("wrote %d candidates for %d prompts to %s", len(records), len(indices), folder)
    return jsonl


def read_candidates(folder: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Every shard's records (sorted by id) and latents."""
    from safetensors.torch import load_file

    records, latents = [], {}
    for f in sorted(folder.glob("candidates-*.jsonl")):
        records += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    for f in sorted(folder.glob("latents-*.safetensors")):
        latents.update({k: v for k, v in load_file(str(f)).items() if k != "_empty"})
    records.sort(key=lambda r: r["id"])
    return records, latents
