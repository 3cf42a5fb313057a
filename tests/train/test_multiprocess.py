"""Two CPU processes (gloo) train exactly what one process trains with the same global batch: DDP and FSDP2
(train.parallel.shard_dit), for flow-matching training and for distillation.

One process runs ``grad_accum = 2`` micro-batches of ``b``; two processes run one micro-batch of ``b`` each. The
data loader deals the same batches, the noise is keyed by the micro-batch's global index, and gradients are
averaged (DDP, FSDP2's reduce-scatter, or train.parallel.average_gradients), so the weights must agree. They do
bit for bit with DDP; FSDP2 gathers the same numbers through a different path, compared at 1e-6.
All four two-process runs share one spawned process group (the start-up is the slow part on 2 cores).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train.checkpoint as ck
from train.config import load_config
from train.data import make_synthetic_dataset
from train.run import make_runner

from .conftest import make_teacher
from .mp_worker import worker

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(config: str, out: Path, shapes: Path, cache: Path, **extra) -> tuple[str, list[str]]:
    over = {
        "output_dir": f"'{out}'",
        "max_steps": str(STEPS),
        "log_every": "1",
        "device": "'cpu'",
        "synthetic": "{}",
        "model.text_encoder": "random-tiny",
        "model.vae": "random-tiny",
        "data.sources": f'[{{type = "folder", path = "{shapes}"}}]',
        "data.resolution": "32",
        "data.token_budget": "64",
        "data.max_batch": "2",
        "data.cache_dir": f"'{cache}'",
        "data.caption_levels": "{caption = 1.0}",
        "data.caption_dropout": "0.25",
        "ema.enabled": "false",
        "optim.grad_clip": "0.0",
        "optim.lr": "1e-3",
        "optim.warmup_steps": "0",
        "checkpoint.every": "0",
        "samples.every": "0",
        "export.final": "false",
    }
    over.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return str(CONFIGS / config), [f"{k}={v}" for k, v in over.items()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / ck.step_name(STEPS)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The one-process references (run here) and the two-process jobs (run by the spawned group)."""
    tmp = tmp_path_factory.mktemp("mp")
    shapes = tmp / "shapes"
    make_synthetic_dataset(shapes, n_per_class=2, size=32, seed=0)
    teacher = make_teacher(tmp / "teacher.safetensors")
    plain = {"model__checkpoint": f"'{teacher}'"}
    distill = {"distill__teacher": f"'{teacher}'", "distill__ttur": 2, "distill__fake_lr": "1e-3"}
    cases = {}
    for name, (config, extra) in {
        "plain_ddp": ("synthetic_tiny.toml", plain),
        "plain_fsdp2": ("synthetic_tiny.toml", {**plain, "sharding": "'fsdp2'"}),
        "distill_ddp": ("distill_synthetic.toml", distill),
        "distill_fsdp2": ("distill_synthetic.toml", {**distill, "sharding": "'fsdp2'"}),
    }.items():
        one, two = tmp / f"{name}_1", tmp / f"{name}_2"
        make_runner(
            load_config(*job(config, one, shapes, tmp / "cache", optim__grad_accum=2, **extra)), progress=False
        ).train()
        cases[name] = (one, two, job(config, two, shapes, tmp / "cache", **extra))
    errors = str(tmp / "errors")
    try:
        mp.spawn(worker, args=(2, free_port(), [c[2] for c in cases.values()], errors), nprocs=2)
    except Exception as e:  # the worker's traceback is more useful than spawn's summary
        found = sorted(Path(tmp).glob("errors.*"))
        raise AssertionError(found[0].read_text() if found else str(e)) from None
    return cases


def initial(run: Path) -> dict[str, torch.Tensor]:
    """The weights the run started from (built again from its saved configuration)."""
    import json

    from train.config import config_from_dict
    from train.model import build_dit

    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    return {f"trainable/{k}": v for k, v in build_dit(cfg.model, cfg.seed).state_dict().items()}


@pytest.mark.parametrize("name", ["plain_ddp", "plain_fsdp2", "distill_ddp", "distill_fsdp2"])
def test_two_processes_equal_one_process(jobs, name):
    one, two, _ = jobs[name]
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and any(k.startswith("trainable/") for k in a)
    assert name.startswith("plain") or any(k.startswith("fake/") for k in a)
    start = initial(one)
    trained = [k for k in start if k in a]
    assert sum(not torch.equal(a[k], start[k]) for k in trained) > len(trained) // 2  # the runs trained
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (differ[:5], max(float((a[k] - b[k]).abs().max()) for k in differ))
