"""The trainer end to end on the CPU with the tiny DiT and random tiny encoders: every shipped configuration runs,
the loss falls, a stopped-and-resumed run equals an uninterrupted one bit for bit, checkpoints are atomic and pruned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoint as ck
from train.config import ConfigError, load_config
from train.data import make_synthetic_dataset
from train.model import init_weights
from train.objective import flow_loss
from train.run import main as run_main
from train.run import make_runner
from train.trainer import Trainer, write_synthetic_edits
from zimage_core.checkpoints import load_dit, save_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import ZImageError

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes") / "images"
    make_synthetic_dataset(folder, n_per_class=2, size=32, seed=0)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Caches shared by the tests of this file (one per data layout; a matching cache is reused)."""
    return tmp_path_factory.mktemp("caches")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    dit = init_weights(ZImageDiT(DiTConfig.tiny()), seed=3)
    with torch.no_grad():  # a pretrained-looking model: nothing at zero
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_dit(dit.state_dict(), dit.cfg, tmp_path_factory.mktemp("base") / "tiny_dit.safetensors", "comfyui")


def tiny(out: Path, shapes: Path, cache: Path, **extra) -> list[str]:
    """Overrides that turn any configuration into a seconds-long CPU run on the synthetic shapes."""
    base = {
        "output_dir": f"'{out}'",
        "max_steps": "2",
        "log_every": "1",
        "synthetic": "{}",
        "model.preset": "tiny",
        "model.checkpoint": "''",
        "model.dims": "{}",
        "model.omni": "false",
        "model.text_encoder": "random-tiny",
        "model.vae": "random-tiny",
        "model.tokenizer": "''",
        "model.vision": "''",
        "data.sources": f'[{{type = "folder", path = "{shapes}"}}]',
        "data.resolution": "32",
        "data.token_budget": "64",
        "data.max_batch": "4",
        "data.cache_dir": f"'{cache}'",
        "data.caption_levels": "{caption = 1.0}",
        "data.languages": "{en = 1.0}",
        "checkpoint.every": "0",
        "samples.every": "0",
    }
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def run(config: str | None, overrides: list[str], resume=None, stop_after=None):
    cfg = load_config(CONFIGS / config if config else CONFIGS / "synthetic_tiny.toml", overrides)
    trainer = make_runner(cfg, resume=resume, progress=False)
    return trainer, trainer.train(stop_after=stop_after)


# ---------------------------------------------------------------------------------------------
# Every configuration runs end to end
# ---------------------------------------------------------------------------------------------
def stage_overrides(name: str, tmp: Path, shapes: Path, tiny_ckpt: Path, cache: Path) -> list[str]:
    extra = {}
    if name == "stage2_omni.toml":
        from tests.factories.comfy import make_siglip2
        from zimage_core.vision import make_processor

        vision = tmp / "siglip2"  # a tiny random SigLIP2 tower (width 24) for the reference features
        make_siglip2(24, seed=1).save_pretrained(vision)
        make_processor().save_pretrained(vision)
        extra["model__vision"] = f"'{vision}'"
        edits = write_synthetic_edits(shapes, tmp / "edits" / "edits.jsonl")
        extra["data__sources"] = f'[{{type = "folder", path = "{shapes}"}}, {{type = "edit_jsonl", path = "{edits}"}}]'
        extra["model__omni"] = "true"
        extra["model__siglip_dim"] = "24"
        extra["max_steps"] = "4"  # one epoch: 2 T2I and 2 edit batches
        extra["data__edit_ratio"] = "0.5"
    if name.startswith("finetune"):
        extra["model__checkpoint"] = f"'{tiny_ckpt}'"
    if name.startswith("distill"):  # the student starts from (and learns from) the teacher
        extra.update(
            {
                "distill__teacher": f"'{tiny_ckpt}'",
                "distill__ttur": "1",
                "distill__student_steps": "2",
                "mixed_precision": "'no'",
                "sharding": "'auto'",
                "optim__grad_accum": "1",
            }
        )
    if name == "synthetic_tiny.toml":
        extra.update(
            {
                "samples__every": "1",
                "samples__width": "32",
                "samples__height": "32",
                "samples__steps": "2",
                "samples__prompts": '["a red circle", "a blue square"]',
                "samples__cfg": "2.0",
                "model__dims": "{dim = 64, n_heads = 2}",
            }
        )
    return tiny(tmp / "run", shapes, cache / name, **extra)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml") if not p.name.startswith("rl_")))
def test_every_config_runs_end_to_end(name, tmp_path, shapes, tiny_ckpt, cache):
    trainer, res = run(name, stage_overrides(name, tmp_path, shapes, tiny_ckpt, cache))
    cfg = trainer.cfg
    assert res.step == cfg.max_steps and len(res.losses) == cfg.max_steps
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.checkpoint is not None and res.checkpoint.name == ck.step_name(cfg.max_steps)
    assert res.export is not None and res.export.is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, cfg.max_steps + 1))
    if cfg.distill.enabled:
        assert trainer.kind.startswith("distill") and any((tmp_path / "run" / "export").glob("*_turbo_lora_*"))
    elif cfg.lora.enabled:
        assert next(trainer.dit.parameters()).dtype == torch.bfloat16  # frozen bf16 base
        assert all("lora" in n for n in trainer.params)
        assert any(k.endswith(".lora_up.weight") for k in load_file(str(res.export)))
    if name == "stage2_omni.toml":
        assert trainer.dit.cfg.is_omni and trainer.segments is not None
        assert any(s["siglip"] for s in trainer.data.samples)
        assert {m["kind"] for m in metrics} == {"t2i", "edit"}  # both kinds were trained
        seg = trainer.segments.prompts("turn it into a blue square")  # encoded in the Omni prompt template
        assert seg is not None and seg.shape[0] > trainer.segments.prompts("").shape[0]
        assert {"t2i", "edit"} <= set(trainer.data.kinds)
    if name == "synthetic_tiny.toml":
        pngs = sorted((tmp_path / "run" / "samples").rglob("*.png"))
        assert len(pngs) == 2 * cfg.max_steps and pngs[0].parent.name == "step-00000001"


def test_entry_point_runs_and_resumes(tmp_path, shapes, cache):
    over = tiny(tmp_path / "run", shapes, cache / "plain", max_steps=3)
    assert run_main([str(CONFIGS / "synthetic_tiny.toml"), *over, "--stop-after", "2", "--no-progress", "-q"]) == 0
    assert ck.latest_checkpoint(tmp_path / "run" / "checkpoints").name == ck.step_name(2)
    assert not (tmp_path / "run" / "export").exists()
    assert run_main([str(CONFIGS / "synthetic_tiny.toml"), *over, "--resume", "--no-progress", "-q"]) == 0
    assert ck.latest_checkpoint(tmp_path / "run" / "checkpoints").name == ck.step_name(3)
    assert any((tmp_path / "run" / "export").iterdir())
    assert run_main([str(CONFIGS / "synthetic_tiny.toml"), *over, "optim.optimizer=sgd", "--no-progress"]) == 2


def test_loss_goes_down_on_a_tiny_overfit_problem(tmp_path, shapes, cache):
    over = tiny(
        tmp_path / "run",
        shapes,
        cache / "plain",
        max_steps=80,
        optim__lr="5e-3",
        optim__warmup_steps=3,
        data__max_batch=8,
        data__token_budget=256,
        data__caption_dropout="0.0",
        objective__timesteps="uniform",
    )
    trainer = Trainer(load_config(CONFIGS / "synthetic_tiny.toml", over), progress=False)
    trainer.setup()
    probe = next(trainer.data.batches(seed=99, prefetch=0))  # all 8 images, fixed noise and timesteps

    def probe_loss() -> float:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            return (
                sum(
                    float(flow_loss(trainer.model, probe, trainer.cfg.objective, gen, trainer.device)[0])
                    for _ in range(8)
                )
                / 8
            )

    before = probe_loss()
    res = trainer.train()
    after = probe_loss()
    assert after < 0.8 * before, (before, after)  # 1.86 -> 1.32 here
    assert sum(res.losses[-8:]) < sum(res.losses[:8])


# ---------------------------------------------------------------------------------------------
# Resume, checkpoints
# ---------------------------------------------------------------------------------------------
def _state(run_dir: Path, step: int):
    folder = run_dir / "checkpoints" / ck.step_name(step)
    opt = ck.read_optimizer(folder)["optimizer"]
    return load_file(str(folder / "trainable.safetensors")), load_file(str(folder / "ema.safetensors")), opt


def _assert_same(a, b, where="optimizer"):
    """Nested dicts/lists/tensors equal bit for bit."""
    assert type(a) is type(b), where
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("lora", [False, True])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, shapes, tiny_ckpt, cache, lora):
    extra = dict(
        max_steps=4,
        optim__grad_accum=2,
        optim__warmup_steps=2,
        optim__schedule="cosine",
        data__caption_dropout="0.5",
        ema__enabled="true",
        ema__decay="0.9",
        data__max_batch=3,
    )
    if lora:
        extra.update(
            lora__enabled="true", lora__rank=4, model__checkpoint=f"'{tiny_ckpt}'", optim__optimizer="adamw8bit"
        )
    _, full = run(None, tiny(tmp_path / "a", shapes, cache / "plain", **extra))
    _, first = run(None, tiny(tmp_path / "b", shapes, cache / "plain", **extra), stop_after=2)
    assert first.step == 2 and first.stopped and first.export is None
    trainer, rest = run(None, tiny(tmp_path / "b", shapes, cache / "plain", **extra), resume=True)
    assert rest.step == 4 and rest.losses == full.losses[2:]
    (wa, ea, oa), (wb, eb, ob) = _state(tmp_path / "a", 4), _state(tmp_path / "b", 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    _assert_same(oa, ob)
    assert any(not torch.equal(wa[k], ea[k]) for k in wa)  # the EMA is a different set of weights
    assert trainer.schedule.last_epoch == 4


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path, shapes, cache, monkeypatch):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    real = Trainer.train_step

    def step_then_signal(self):
        out = real(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a cluster's time limit
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    _, res = run(None, tiny(tmp_path / "run", shapes, cache / "plain", max_steps=5))
    assert res.step == 2 and res.stopped and res.export is None
    assert res.checkpoint.name == ck.step_name(2)
    assert signal.getsignal(signal.SIGTERM) == before


def test_keep_last_k_checkpoints(tmp_path, shapes, cache):
    run(
        None, tiny(tmp_path / "run", shapes, cache / "plain", max_steps=4, checkpoint__every=1, checkpoint__keep_last=2)
    )
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ck.list_checkpoints(root)] == [3, 4]
    assert sorted(p.name for p in root.iterdir()) == [ck.step_name(3), ck.step_name(4)]


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, shapes, cache, monkeypatch):
    over = tiny(tmp_path / "run", shapes, cache / "plain", max_steps=3, checkpoint__every=1, checkpoint__keep_last=0)
    real = ck.write_checkpoint
    calls = []

    def crashing(folder, **kw):
        calls.append(folder)
        if len(calls) == 2:
            kw["trainable"] = dict(list(kw["trainable"].items())[:1])
            real(folder, **kw)  # some files are written...
            raise OSError("disk full")  # ... then the save dies
        real(folder, **kw)

    monkeypatch.setattr(ck, "write_checkpoint", crashing)
    with pytest.raises(OSError, match="disk full"):
        run(None, over)
    root = tmp_path / "run" / "checkpoints"
    assert ck.latest_checkpoint(root).name == ck.step_name(1)
    assert (root / (ck.TMP_PREFIX + ck.step_name(2))).is_dir()
    assert not (root / ck.step_name(2)).exists()
    monkeypatch.setattr(ck, "write_checkpoint", real)
    trainer, res = run(None, over, resume=True)
    assert res.step == 3 and len(res.losses) == 2
    assert sorted(p.name for p in root.iterdir()) == [ck.step_name(s) for s in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
def test_lora_run_leaves_the_base_untouched(tmp_path, shapes, tiny_ckpt, cache):
    over = tiny(
        tmp_path / "run",
        shapes,
        cache / "plain",
        max_steps=3,
        lora__enabled="true",
        lora__rank=2,
        lora__targets="['attention\\.qkv$', 'adaLN_modulation']",
        model__checkpoint=f"'{tiny_ckpt}'",
        optim__lr="1e-2",
    )
    trainer, _ = run(None, over)
    base = load_dit(tiny_ckpt, dtype=torch.float32).state_dict()
    sd = trainer.dit.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())
    ups = {n: p for n, p in trainer.params.items() if n.endswith("lora.up")}
    assert any(n.startswith("layers.0.adaLN_modulation.0") for n in ups)
    assert all(float(p.detach().abs().max()) > 0 for p in ups.values())  # every adapter learned something


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tmp_path, shapes, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ZImageError, match="bitsandbytes"):
        run(None, tiny(tmp_path / "run", shapes, cache / "plain", optim__optimizer="adamw8bit"))


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CONFIGS / "synthetic_tiny.toml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="must be a float"):
        load_config(CONFIGS / "synthetic_tiny.toml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    cfg = load_config(CONFIGS / "finetune_lora.toml", ["lora.rank=8", 'data.sources=[{type="folder", path="x"}]'])
    assert cfg.lora.rank == 8 and cfg.data["sources"] == [{"type": "folder", "path": "x"}]
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.lora.alpha, float)
