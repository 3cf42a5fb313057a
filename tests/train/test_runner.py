"""The shared run infrastructure (train.runner.RunBase) with a toy trainer of two units: a checkpoint holds every
unit's weights, optimizer, schedule and EMA and each process's RNG states, and a stopped-and-resumed run equals an
uninterrupted one bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ck
from train.config import TrainConfig
from train.ema import EMA
from train.runner import MAIN, RunBase, Unit, make_optimizer, make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(RunBase):
    """Two networks with their own optimizers; the loss draws from every RNG a trainer may use."""

    @property
    def kind(self) -> str:
        return "toy"

    def build(self) -> None:
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        o = self.cfg.optim
        self.opt_a, self.opt_b = make_optimizer(list(self.a.parameters()), o), make_optimizer(self.b.parameters(), o)
        self.sched = make_schedule(self.opt_a, o, self.cfg.max_steps)
        pa = dict(self.a.named_parameters())
        self.units[MAIN] = Unit(pa, self.opt_a, self.sched, EMA(pa, 0.5))
        self.units["critic"] = Unit(dict(self.b.named_parameters()), self.opt_b)
        self.shared = torch.Generator().manual_seed(self.cfg.seed)  # an extra stream, kept per rank

    def rank_extra(self) -> dict:
        return {"shared": self.shared.get_state()}

    def load_rank_extra(self, state: dict) -> None:
        self.shared.set_state(state["shared"])

    def train_step(self):
        x = torch.randn(8, 4, generator=self.noise_gen) + torch.randn(8, 4) + torch.rand(1, generator=self.shared)
        loss = (self.b(torch.tanh(self.a(x))) - 1).pow(2).mean()
        loss.backward()
        for opt in (self.opt_a, self.opt_b):
            opt.step()
            opt.zero_grad()
        self.sched.step()
        self.step += 1
        self.units[MAIN].ema.update(self.units[MAIN].params, self.step)
        return float(loss), {"extra": 1.0}

    def loop_fields(self) -> dict:
        return {"lr": self.sched.get_last_lr()[0]}


def config(out: Path) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(out), max_steps=6, log_every=2, device="cpu", data={"sources": []})
    cfg.optim.warmup_steps, cfg.optim.schedule, cfg.checkpoint.every = 2, "cosine", 0
    return cfg


def test_two_unit_run_resumes_bit_for_bit(tmp_path):
    full = Toy(config(tmp_path / "a"), progress=False).train()
    first = Toy(config(tmp_path / "b"), progress=False).train(stop_after=4)
    assert first.stopped and first.step == 4
    folder = first.checkpoint
    names = {p.name for p in folder.iterdir()}
    assert {"trainable.safetensors", "ema.safetensors", "critic.safetensors", "optimizer.pt", "rank0.pt"} <= names
    assert set(ck.read_optimizer(folder)["units"]) == {"critic"}
    rest = Toy(config(tmp_path / "b"), resume=True, progress=False).train()
    assert rest.losses == full.losses[4:]
    for f in ("trainable.safetensors", "ema.safetensors", "critic.safetensors"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / ck.step_name(6) / f))
        b = load_file(str(rest.checkpoint / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6] and list(metrics[0])[:3] == ["step", "loss", "lr"]


def test_a_checkpoint_of_another_kind_is_refused(tmp_path):
    Toy(config(tmp_path / "a"), progress=False).train(stop_after=1)

    class Other(Toy):
        @property
        def kind(self) -> str:
            return "other"

    with pytest.raises(Exception, match="is a toy run"):
        Other(config(tmp_path / "a"), resume=True, progress=False).train()
