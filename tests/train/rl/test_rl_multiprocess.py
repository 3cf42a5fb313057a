"""RL runs under two CPU processes (torchrun, gloo): DDP through accelerate, each process with its own prompts and
candidate shard, one checkpoint with both processes' states, one export (DMDR: the distiller's gradient averaging,
the student file and its LoRA)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.model import init_weights
from zimage_core.checkpoints import save_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("config", ["rl_grpo_synthetic.toml", "rl_dpo_synthetic.toml", "rl_dmdr_synthetic.toml"])
def test_two_cpu_processes(tmp_path, config):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.fail("torchrun (part of torch) is not on PATH")
    dit = init_weights(ZImageDiT(DiTConfig.tiny()), seed=3)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    policy = save_dit(dit.state_dict(), dit.cfg, tmp_path / "policy.safetensors", "comfyui")
    out = tmp_path / "run"
    port = 29500 + (os.getpid() % 1000) + (7 if "dpo" in config else 13 if "dmdr" in config else 0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "train.run", str(ROOT / "train" / "configs" / config), f"output_dir='{out}'", "max_steps=2"]
    cmd += ["log_every=1", "device=cpu", f"rl.policy='{policy}'", "rl.width=32", "rl.height=32", "rl.steps=3"]
    cmd += ["rl.group_size=3", "rl.prompts_per_step=1", "rl.updates_per_rollout=1", "rl.candidates=3"]
    cmd += ["rl.batch=2", "samples.every=0", "checkpoint.every=0"]
    if "dmdr" in config:
        cmd += ["rl.reward_start=1", "rl.dynadg_steps=2", "rl.dynars_steps=2", "rl.distill.student_steps=2"]
        cmd += ["rl.distill.ttur=1", "rl.distill.fake_lora_rank=4", "rl.distill.lora_rank=4"]
    cmd += ["--no-progress", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-00000002"
    r0 = torch.load(ckpt / "rank0.pt", weights_only=False)
    r1 = torch.load(ckpt / "rank1.pt", weights_only=False)
    assert not torch.equal(r0["noise"], r1["noise"])  # each process draws its own noise
    assert not torch.equal(r0["data"]["gen"], r1["data"]["gen"])  # and its own prompts / pairs
    exported = sorted(p.name for p in (out / "export").glob("*.safetensors"))
    if "dmdr" in config:  # the student file and its LoRA over the teacher
        assert exported == [
            "rl_dmdr_synthetic_2step_student.safetensors",
            "rl_dmdr_synthetic_2step_turbo_lora_r4.safetensors",
        ]
    else:
        assert len(exported) == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # logged once, by the main process
    if "dmdr" in config:  # the reward, averaged over both processes, and the reward term from step 1 on
        assert all("reward/contrast" in r for r in rows if "loss" in r)
        assert ["loss_reward" in r for r in rows if "loss" in r] == [False, True]
    if "dpo" in config:  # the candidates were drawn in two shards, one per process
        assert sorted(p.name for p in (out / "candidates").glob("candidates-*.jsonl")) == [
            "candidates-rank0.jsonl",
            "candidates-rank1.jsonl",
        ]
