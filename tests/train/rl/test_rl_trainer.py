"""DPO and GRPO end to end on the CPU with a tiny DiT and the random tiny encoders: every shipped RL configuration
runs, the recorded rollout log-probs are what the update re-scores, a short GRPO run raises its reward, a stopped
and resumed run equals an uninterrupted one bit for bit, and the entry point and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ck
from train.config import ConfigError, load_config
from train.model import init_weights
from train.rl.trainer import RLTrainer
from train.run import main as run_main
from train.run import make_runner
from zimage_core.checkpoints import save_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.sampling import sde_step

CONFIGS = Path(__file__).resolve().parents[3] / "train" / "configs"
RL_CONFIGS = sorted(p.name for p in CONFIGS.glob("rl_*.toml"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    dit = init_weights(ZImageDiT(DiTConfig.tiny()), seed=3)
    with torch.no_grad():  # a pretrained-looking model: nothing at zero
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return save_dit(dit.state_dict(), dit.cfg, tmp_path_factory.mktemp("policy") / "policy.safetensors", "comfyui")


def tiny(out: Path, policy: Path, **extra) -> list[str]:
    """Overrides that turn any RL configuration into a seconds-long CPU run."""
    base = {
        "output_dir": f"'{out}'",
        "max_steps": "2",
        "log_every": "1",
        "mixed_precision": "no",
        "model.text_encoder": "random-tiny",
        "model.vae": "random-tiny",
        "model.tokenizer": "''",
        "model.dtype": "fp32",
        "rl.policy": f"'{policy}'",
        "rl.prompts_file": "''",
        "rl.prompts": '["a red circle", "a blue square", "a green triangle"]',
        "rl.rewards": '[{name = "brightness", weight = 1.0}, {name = "contrast", weight = 2.0, label = "c"}]',
        "rl.width": "32",
        "rl.height": "32",
        "rl.steps": "4",
        "rl.group_size": "4",
        "rl.prompts_per_step": "2",
        "rl.candidates": "3",
        "rl.candidate_batch": "4",
        "rl.micro_batch": "0",
        "rl.updates_per_rollout": "2",
        "rl.batch": "2",
        "rl.beta": "500.0",
        "rl.min_gap": "0.0",
        "optim.optimizer": "adamw",
        "checkpoint.every": "0",
        "samples.every": "0",
        "export.dtype": "fp32",
    }
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def make(config: str, overrides: list[str], resume=None) -> RLTrainer:
    """The trainer the entry point picks (DMDR's is a distiller, :class:`train.rl.dmdr.DMDRTrainer`)."""
    return make_runner(load_config(CONFIGS / config, overrides), resume=resume, progress=False)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", RL_CONFIGS)
def test_every_rl_config_runs_end_to_end(name, tmp_path, policy):
    extra = {"samples__every": "2", "samples__width": "32", "samples__height": "32", "samples__steps": "2"}
    if "turbo" in name:
        extra["rl__cfg"] = "2.0"  # the CFG path too (Turbo itself runs CFG-free)
    trainer = make(name, tiny(tmp_path / "run", policy, **extra))
    res = trainer.train()
    assert res.step == 2 and res.export is not None and res.export.is_file()
    rows = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2] and all(torch.isfinite(torch.tensor([m["loss"] for m in rows])))
    grid = trainer.cfg.samples
    assert len(list((tmp_path / "run" / "samples" / "step-00000002").glob("*.png"))) == len(grid.prompts) * len(
        grid.seeds
    )
    if trainer.cfg.lora.enabled:
        assert any(k.endswith(".lora_up.weight") for k in load_file(str(res.export)))
    if trainer.rl.method == "grpo":
        assert {"reward/brightness", "reward/c", "reward/total", "clipfrac", "approx_kl"} <= set(rows[0])
    elif trainer.rl.method == "dmdr":  # the reward is measured during the cold start (reward_start = 50)
        assert {"reward/brightness", "reward/c", "reward/total", "dm_size", "dynadg_tilt"} <= set(rows[0])
    else:
        recs = [
            json.loads(x) for x in (tmp_path / "run" / "candidates" / "candidates-rank0.jsonl").read_text().splitlines()
        ]
        assert len(recs) == 3 * 3 and {r["seed"] for r in recs} == {0, 1, 2}
        assert all((tmp_path / "run" / "candidates" / r["image"]).is_file() for r in recs)
        assert {"dpo_accuracy", "margin", "competence"} <= set(rows[0])
        assert "dpo/candidates_c" in metrics(tmp_path / "run")[0]


@pytest.mark.parametrize("cfg,lora", [(1.0, True), (2.0, False)])
def test_recorded_log_probs_equal_rescored_ones(tmp_path, policy, cfg, lora):
    over = tiny(tmp_path / "run", policy, rl__cfg=cfg, rl__train_steps='"window"', rl__window_size=2, lora__rank=2)
    trainer = make("rl_grpo_turbo.toml" if lora else "rl_grpo_synthetic.toml", over)
    trainer.setup()
    ro, prompt_ids, scores, adv, valid = trainer.grpo_rollout()
    assert ro.sde_steps == [0, 1] and len(ro.states) == 5 and all(lp.dtype == torch.float32 for lp in ro.log_probs)
    caps = [trainer.cond[i] for i in prompt_ids]
    s = trainer.sigmas
    with torch.no_grad():
        for i, lp in zip(ro.sde_steps, ro.log_probs):
            v = trainer._velocity(trainer.model, ro.states[i], i, caps, grad=False)
            _, again, _ = sde_step(ro.states[i], v, s[i], s[i + 1], trainer.rl.eta, s[1], x_next=ro.states[i + 1])
            torch.testing.assert_close(again, lp, rtol=0, atol=2e-5)
    # groups of 4 samples per prompt, normalised within the group
    assert len(prompt_ids) == 8 and prompt_ids[:4] == [prompt_ids[0]] * 4
    assert valid.all() and abs(float(adv[:4].sum())) < 1e-3
    # the first update is on-policy: the ratio starts at 1
    _, info = trainer.train_step()
    assert info["ratio_max"] < 1.0 + 1e-3 and info["trained_steps"] == 2


def test_short_grpo_run_raises_a_toy_reward(tmp_path, policy):
    over = tiny(
        tmp_path / "run",
        policy,
        max_steps=12,
        rl__rewards='[{name = "brightness", weight = 1.0}]',
        rl__group_size=6,
        rl__prompts_per_step=2,
        rl__clip_range="0.2",
        rl__kl_beta="0.0",
        rl__updates_per_rollout=2,
        optim__lr="1e-2",
    )
    trainer = make("rl_grpo_synthetic.toml", over)
    trainer.train()
    rewards = [m["reward/brightness"] for m in metrics(tmp_path / "run") if "loss" in m]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 3 * max(1e-4, abs(rewards[1] - rewards[0])), rewards


def _weights(run: Path, step: int):
    folder = run / "checkpoints" / ck.step_name(step)
    return load_file(str(folder / "trainable.safetensors")), ck.read_optimizer(folder)["optimizer"]


@pytest.mark.parametrize("config", ["rl_grpo_synthetic.toml", "rl_dpo_synthetic.toml"])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, policy, config):
    extra = dict(max_steps=4, rl__kl_beta="0.1", ema__enabled="true", ema__decay="0.5", optim__warmup_steps=2)
    if "dpo" in config:
        extra.update(optim__grad_accum=2, rl__curriculum_warmup=3)
    else:
        extra.update(rl__train_steps='"random"', rl__step_fraction="0.5")
    full = make(config, tiny(tmp_path / "a", policy, **extra)).train()
    first = make(config, tiny(tmp_path / "b", policy, **extra)).train(stop_after=2)
    assert first.step == 2 and first.export is None
    rest = make(config, tiny(tmp_path / "b", policy, **extra), resume=True).train()
    assert rest.step == 4 and rest.losses == full.losses[2:]
    (wa, oa), (wb, ob) = _weights(tmp_path / "a", 4), _weights(tmp_path / "b", 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(oa["state"][k]["exp_avg"], ob["state"][k]["exp_avg"]) for k in oa["state"])
    ra = [m for m in metrics(tmp_path / "a") if "loss" in m]
    rb = [m for m in metrics(tmp_path / "b") if "loss" in m]
    drop = ("sec_per_step",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in ra[2:]] == [
        {k: v for k, v in m.items() if k not in drop} for m in rb[2:]
    ]


def test_entry_point_and_config_errors(tmp_path, policy, capsys, monkeypatch):
    cfg = str(CONFIGS / "rl_grpo_synthetic.toml")
    over = tiny(tmp_path / "run", policy, max_steps=1)
    assert run_main([cfg, *over, "--no-progress", "-q"]) == 0
    assert len(list((tmp_path / "run" / "export").glob("*.safetensors"))) == 1
    assert run_main([cfg, *over, "rl.method=ppo", "--no-progress", "-q"]) == 2
    assert "rl.method 'ppo' must be one of dpo, grpo, dmdr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CONFIGS / "rl_dpo_synthetic.toml", ["rl.betta=3"])
    with pytest.raises(ConfigError, match="rl.rewards is empty"):
        load_config(CONFIGS / "rl_dpo_synthetic.toml", ["rl.rewards=[]"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config(CONFIGS / "rl_grpo_synthetic.toml", ["rl.group_size=1"])
    with pytest.raises(Exception, match="rl.policy is not set"):
        make("rl_grpo_synthetic.toml", tiny(tmp_path / "x", policy, rl__policy="''")).train()
    # DPO: candidates that cannot be told apart give no pair; a failing plug-in is named
    (tmp_path / "flat_reward.py").write_text("def flat(images, prompts):\n    return [0.5] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    over = tiny(tmp_path / "y", policy, rl__rewards='[{function = "flat_reward:flat"}]')
    with pytest.raises(Exception, match="no chosen/rejected pair"):
        make("rl_dpo_synthetic.toml", over).train()
    over = tiny(tmp_path / "z", policy, rl__rewards='[{function = "builtins:len"}]')
    with pytest.raises(Exception, match="reward function 'builtins:len' failed: TypeError"):
        make("rl_dpo_synthetic.toml", over).train()


def test_rollouts_through_a_memory_mode_equal_plain_ones(tmp_path, policy):
    runs = {}
    for mode in ("", "block-swap:1"):
        trainer = make(
            "rl_grpo_synthetic.toml",
            tiny(tmp_path / (mode or "plain").replace(":", "_"), policy, rl__memory=f"'{mode}'"),
        )
        trainer.setup()
        ro = trainer.grpo_rollout()[0]
        loss, _ = trainer.train_step()  # the DiT is back in place for the update
        runs[mode] = (ro, loss)
    (a, la), (b, lb) = runs[""], runs["block-swap:1"]
    assert torch.equal(a.latents, b.latents) and all(torch.equal(x, y) for x, y in zip(a.log_probs, b.log_probs))
    assert la == lb
