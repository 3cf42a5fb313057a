"""DMDR (``[rl] method = "dmdr"``) on a tiny DiT with the random tiny encoders: the configuration checks, the
DynaDG / DynaRS schedules, the reward term's gradient, the tilted real score, a short run raising its reward, a
stopped and resumed run equal to an uninterrupted one, and the export loading as a DiT and as a LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ck
from tests.train.conftest import make_teacher
from train.config import ConfigError, load_config
from train.distill import Distiller
from train.objective import shift_sigmas
from train.rl.config import rl_config
from train.rl.dmdr import (
    DMDRTrainer,
    PromptBatch,
    beta_levels,
    cosine,
    dynadg_tilt,
    dynars_params,
    images_from_latents,
)
from train.rl.rewards import brightness
from train.run import main as run_main
from train.run import make_runner
from zimage_core.checkpoints import load_dit
from zimage_core.errors import ZImageError
from zimage_core.lora import apply_loras, load_lora

CONFIG = Path(__file__).resolve().parents[3] / "train" / "configs" / "rl_dmdr_synthetic.toml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("dmdr") / "teacher.safetensors")


def overrides(out: Path, teacher: Path, **extra) -> list[str]:
    base = {
        "output_dir": f"'{out}'",
        "max_steps": "2",
        "log_every": "1",
        "mixed_precision": "no",
        "model.text_encoder": "random-tiny",
        "model.vae": "random-tiny",
        "model.tokenizer": "''",
        "rl.policy": f"'{teacher}'",
        "rl.prompts": '["a red circle", "a blue square", "a green triangle"]',
        "rl.rewards": '[{name = "brightness", weight = 1.0}]',
        "rl.width": "32",
        "rl.height": "32",
        "rl.batch": "2",
        "rl.reward_start": "0",
        "rl.dynadg_steps": "0",
        "rl.dynars_steps": "0",
        "rl.distill.student_steps": "2",
        "rl.distill.ttur": "1",
        "rl.distill.fake_lora_rank": "4",
        "rl.distill.fake_lora_alpha": "4.0",
        "rl.distill.lora_rank": "4",
        "checkpoint.every": "0",
        "samples.every": "0",
        "export.dtype": "fp32",
    }
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def trainer(out: Path, teacher: Path, resume=None, **extra) -> DMDRTrainer:
    run = make_runner(load_config(CONFIG, overrides(out, teacher, **extra)), resume=resume, progress=False)
    assert isinstance(run, DMDRTrainer)
    return run


# ---------------------------------------------------------------------------------------------
# Configuration and schedules
# ---------------------------------------------------------------------------------------------
def _rl(**kw) -> dict:
    return {"method": "dmdr", "policy": "p.safetensors", "rewards": [{"name": "contrast"}], "prompts": ["a"], **kw}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dmdr_reward": "ppo"}, "dmdr_reward"),
        ({"dmdr_reward": "grpo", "group_size": 1}, "group_size >= 2"),
        ({"dmdr_reward": "grpo", "dmdr_noise": 0.0}, "dmdr_noise > 0"),
        ({"reward_weight": -1.0}, "reward_weight"),
        ({"dynadg_scale": 1.5}, "dynadg_scale"),
        ({"dynars_alpha": 0.0}, "dynars_alpha"),
        ({"dynadg_steps": 10, "distill": {"fake": "full"}}, "fake = 'lora'"),
        ({"distill": {"gan_weight": 0.01}}, "data-free"),
        ({"distill": {"teacher": "other.safetensors"}}, "differs from rl.policy"),
        ({"distill": {"ttur": 0}}, "ttur"),
        ({"distill": {"student_stepz": 4}}, "unknown key"),
    ],
)
def test_configuration_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        rl_config(_rl(**extra))


def test_a_valid_configuration_and_a_distill_table_beside_it(tmp_path, teacher):
    cfg = rl_config(_rl(distill={"student_steps": 4, "cfg": 3.0}, dynadg_steps=5, dynars_steps=5))
    assert cfg.distill.student_steps == 4 and cfg.distill.cfg == 3.0 and cfg.dynadg_scale == 0.375
    conf = load_config(CONFIG, overrides(tmp_path, teacher))
    conf.distill.enabled = True  # a [distill] table as well: ambiguous, refused
    with pytest.raises(ZImageError, match=r"\[rl.distill\]"):
        DMDRTrainer(conf, progress=False)


def test_schedules_at_given_steps():
    assert cosine(0, 100) == 1.0 and cosine(50, 100) == pytest.approx(0.5) and cosine(100, 100) == 0.0
    assert cosine(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(3, 0) == 0.0  # off
    assert dynadg_tilt(0, 100, 0.75) == 0.75  # the DMDR code's lora_scale_r at step 0
    assert dynadg_tilt(50, 100, 0.75) == pytest.approx(0.375) and dynadg_tilt(100, 100, 0.75) == 0.0
    assert dynars_params(0, 10, 4.0, 1.5) == (4.0, 1.5)
    a, b = dynars_params(5, 10, 4.0, 1.5)
    assert a == pytest.approx(2.5) and b == pytest.approx(1.25)
    assert dynars_params(10, 10, 4.0, 1.5) == (1.0, 1.0) and dynars_params(99, 0, 4.0, 1.5) == (1.0, 1.0)
    x = beta_levels(20000, 4.0, 1.5, torch.Generator().manual_seed(0))
    assert float(x.mean()) == pytest.approx(4.0 / 5.5, abs=0.01)  # Beta(4, 1.5): mostly high noise
    assert torch.equal(x, beta_levels(20000, 4.0, 1.5, torch.Generator().manual_seed(0)))  # reproducible


# ---------------------------------------------------------------------------------------------
# The pieces on a built trainer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher) -> DMDRTrainer:
    run = trainer(tmp_path_factory.mktemp("built") / "run", teacher, rl__dynadg_steps="10", rl__dynars_steps="10")
    run.setup()
    return run


def test_dynars_draws_high_noise_early_and_the_distillers_sampler_after(built):
    run, d = built, built.cfg.distill
    run.step = 0
    early = run._renoise_sigmas(4000, torch.Generator().manual_seed(1))
    run.step = 10
    late = run._renoise_sigmas(4000, torch.Generator().manual_seed(1))
    plain = Distiller._renoise_sigmas(run, 4000, torch.Generator().manual_seed(1))
    run.step = 0
    assert torch.equal(late, plain)  # after the warm-up: exactly the distiller's uniform levels
    assert float(early.mean()) > float(late.mean()) + 0.15
    lo, hi = shift_sigmas(torch.tensor([d.sigma_min, d.sigma_max]), d.sigma_shift).tolist()
    assert float(early.min()) >= lo - 1e-6 and float(early.max()) <= hi + 1e-6  # the distiller's range and shift


def _batch(run, n=2):
    return (
        next(run.batches)
        if n is None
        else PromptBatch(run.data.feats[:n], torch.zeros(n, 16, 4, 4), run.data.prompts[:n])
    )


def test_dynadg_tilts_the_real_score_by_the_fake_lora(built):
    run = built
    nets = run.nets
    assert all(p.requires_grad for p in nets.fake.parameters() if p in set(run.units["fake"].params.values()))
    with torch.no_grad():  # give the fake LoRA something to say
        for name, p in run.units["fake"].params.items():
            if name.endswith(".up"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    batch = _batch(run)
    gen = torch.Generator().manual_seed(0)
    x0, cond, sig = run.generate(batch, gen, 0, grad=False)
    run.rl.dynadg_scale = 1.0  # the real score is the fake score: the DM term vanishes
    run.step = 0
    _, full = run.direction(x0, cond, sig, torch.Generator().manual_seed(5))
    run.rl.dynadg_scale = 0.375
    _, tilted = run.direction(x0, cond, sig, torch.Generator().manual_seed(5))
    run.step = 10  # annealed: the pure teacher, the distiller's own direction
    delta, plain = run.direction(x0, cond, sig, torch.Generator().manual_seed(5))
    ref, ref_terms = Distiller.direction(run, x0, cond, sig, torch.Generator().manual_seed(5))
    run.step = 0
    assert full["dm_size"] < 1e-6 < tilted["dm_size"]
    assert torch.equal(delta, ref) and plain == ref_terms
    assert run.nets.teacher is not run.tilted  # put back after every tilted call


def test_reward_term_gradient_raises_the_reward(built):
    run = built
    batch = _batch(run)
    x0 = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    loss, info = run.generator_extra(x0, batch, None)
    (grad,) = torch.autograd.grad(loss, x0)
    loss = float(loss.detach())
    with torch.no_grad():
        before = brightness(images_from_latents(run.vae, x0)).mean()
        after = brightness(images_from_latents(run.vae, x0 - 0.5 * grad / grad.norm())).mean()
    assert loss == pytest.approx(-run.rl.reward_weight * info["reward/total"], rel=1e-5)
    assert info["reward/brightness"] == pytest.approx(float(before), rel=1e-5)
    assert float(after) > float(before)  # descending the term's gradient brightens the decoded images
    run.rl.reward_start = 5  # the cold start: the reward is measured but adds no loss
    cold, cold_info = run.generator_extra(x0, batch, None)
    run.rl.reward_start = 0
    assert cold is None and "reward/brightness" in cold_info and "loss_reward" not in cold_info


def test_a_reward_without_a_gradient_is_one_clear_error(tmp_path, teacher):
    run = trainer(tmp_path / "run", teacher, rl__rewards='[{function = "tests.train.rl.test_dmdr:flat", weight = 1.0}]')
    with pytest.raises(ZImageError, match=r"reward\(s\) \['tests.train.rl.test_dmdr:flat'\] returned scores without"):
        run.train()


def flat(images, prompts):
    """A plug-in reward without a graph (function rewards are treated as not differentiable)."""
    return [0.5] * images.shape[0]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def _brightness_of(dit_file: Path, run: DMDRTrainer) -> float:
    from zimage_core.pipeline import GenerateOptions, ZImagePipeline
    from zimage_core.sampling import initial_noise, latent_shape

    dit = load_dit(dit_file, dtype=torch.float32).eval()
    pipe = ZImagePipeline(dit, None, run.vae, torch.device("cpu"))
    d = run.cfg.distill
    opts = GenerateOptions(prompt="", width=32, height=32, steps=d.student_steps, cfg=1.0, shift=d.student_shift)
    noise = torch.cat([initial_noise(latent_shape(1, 32, 32), s) for s in range(6)])
    with torch.no_grad():
        lat = pipe.sample([run.data.feats[i % 3] for i in range(6)], None, noise, opts)
        return float(brightness(images_from_latents(run.vae, lat)).mean())


def test_a_short_run_raises_the_reward_and_exports_a_loading_student_and_lora(tmp_path, teacher):
    run = trainer(
        tmp_path / "run",
        teacher,
        max_steps=8,
        rl__reward_weight="50.0",
        optim__lr="3e-2",
        optim__warmup_steps="0",
        rl__distill__lora_rank="256",  # full rank of the tiny DiT: the LoRA is the exact delta
    )
    res = run.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["reward/brightness"] > rows[0]["reward/brightness"] + 0.01  # on the training batches
    assert all("reward/brightness" in r and "dm_size" in r and "loss_reward" in r for r in rows)
    files = {p.name: p for p in (tmp_path / "run" / "export").iterdir()}
    student, lora = (
        files["rl_dmdr_synthetic_2step_student.safetensors"],
        files["rl_dmdr_synthetic_2step_turbo_lora_r256.safetensors"],
    )
    assert res.export == student
    assert ck.read_meta(tmp_path / "run" / "checkpoints" / ck.step_name(8))["kind"] == "distill-full-dmdr"
    assert _brightness_of(student, run) > _brightness_of(teacher, run) + 0.01  # and at fixed seeds
    # the student file is the trained student; the LoRA over the teacher reproduces it
    loaded = load_dit(student, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in run.nets.student.state_dict().items())
    base, ref = load_dit(teacher, dtype=torch.float32).eval(), load_dit(student, dtype=torch.float32).eval()
    apply_loras(base, [(load_lora(lora, base), 1.0)])
    x, tt, caps = torch.randn(1, 16, 4, 4), torch.tensor([0.4]), [run.data.feats[0]]
    with torch.no_grad():
        err = (base(x, tt, caps) - ref(x, tt, caps)).abs().max()
        moved = (load_dit(teacher, dtype=torch.float32)(x, tt, caps) - ref(x, tt, caps)).abs().max()
    assert float(err) < 1e-3 * float(moved)


def _tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / ck.step_name(step)
    return {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_stopped_and_resumed_dmdr_equals_uninterrupted(tmp_path, teacher, capsys):
    extra = dict(
        max_steps=4,
        rl__reward_start=1,
        rl__dynadg_steps=3,
        rl__dynars_steps=3,
        optim__warmup_steps=0,
        ema__enabled="true",
        ema__decay="0.9",
    )
    a = overrides(tmp_path / "a", teacher, **extra)
    b = overrides(tmp_path / "b", teacher, **extra)
    assert run_main([str(CONFIG), *a, "--no-progress", "-q"]) == 0  # the entry point dispatches to DMDR
    assert run_main([str(CONFIG), *b, "--stop-after", "2", "--no-progress", "-q"]) == 0
    assert run_main([str(CONFIG), *b, "--resume", "--no-progress", "-q"]) == 0
    ta, tb = _tensors(tmp_path / "a", 4), _tensors(tmp_path / "b", 4)
    assert {k.split("/")[0] for k in ta} == {"trainable.safetensors", "ema.safetensors", "fake.safetensors"}
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert [r["dynadg_tilt"] for r in ma] == pytest.approx([0.375, 0.28125, 0.09375, 0.0])
    # resuming with edited DMDR settings: loss weights and schedules apply, the reward method is refused
    edited = ["max_steps=5", "rl.reward_weight=0.25", "rl.distill.ttur=2", "--resume", "--no-progress", "-q"]
    assert run_main([str(CONFIG), *b, *edited]) == 0
    capsys.readouterr()
    refused = ["max_steps=6", "rl.dmdr_reward=grpo", "rl.group_size=2", "--resume", "--no-progress", "-q"]
    assert run_main([str(CONFIG), *b, *refused]) == 2
    assert "rl.dmdr_reward = 'grpo'" in capsys.readouterr().err


def test_grpo_term_estimates_the_reward_gradient_from_scores_alone(built):
    run, rl = built, built.rl
    saved = (rl.dmdr_reward, rl.group_size, rl.dmdr_noise, rl.clip_range)
    rl.dmdr_reward, rl.group_size, rl.dmdr_noise, rl.clip_range = "grpo", 256, 0.1, 0.2
    try:
        x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
        batch = PromptBatch([run.data.feats[0]] * 256, torch.zeros(256, 16, 4, 4), [run.data.prompts[0]] * 256)
        x0 = x.repeat(256, 1, 1, 1).requires_grad_(True)
        loss, info = run.generator_extra(x0, batch, torch.Generator().manual_seed(11))
        (est,) = torch.autograd.grad(loss, x0)
        xr = x.clone().requires_grad_(True)
        (true,) = torch.autograd.grad(brightness(images_from_latents(run.vae, xr)).sum(), xr)
    finally:
        rl.dmdr_reward, rl.group_size, rl.dmdr_noise, rl.clip_range = saved
    cos = torch.nn.functional.cosine_similarity(-est.sum(0).flatten(), true.flatten(), dim=0)
    assert float(cos) > 0.4  # descending the term follows the reward's gradient (a random direction: ~0 +- 0.06)
    assert "reward/brightness" in info and info["zero_std_ratio"] == 0.0


def detached_brightness(images, prompts):
    """A plug-in reward without a gradient: usable by the GRPO variant only."""
    return brightness(images).detach()


def test_the_grpo_variant_trains_on_a_reward_without_a_gradient(tmp_path, teacher):
    rewards = '[{function = "tests.train.rl.test_dmdr:detached_brightness", weight = 1.0, label = "b"}]'
    run = trainer(
        tmp_path / "run", teacher, rl__dmdr_reward="grpo", rl__group_size=4, rl__prompts_per_step=2, rl__rewards=rewards
    )
    res = run.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert res.step == 2 and all("loss_reward" in r and "reward/b" in r and r["zero_std_ratio"] == 0.0 for r in rows)
    b = next(run.batches)  # prompts_per_step prompts x group_size samples each
    assert len(b.prompts) == 8 and b.prompts[:4] == [b.prompts[0]] * 4 and b.prompts[4:] == [b.prompts[4]] * 4


def test_a_non_differentiable_reward_is_refused_for_refl(tmp_path, teacher):
    scores = tmp_path / "judge.jsonl"
    scores.write_text('{"id": "a", "score": 1.0}\n')
    run = trainer(tmp_path / "run", teacher, rl__rewards=f'[{{name = "judge", path = "{scores}"}}]')
    with pytest.raises(ZImageError, match=r"\['judge'\] are not differentiable.*dmdr_reward = 'grpo'"):
        run.setup()
