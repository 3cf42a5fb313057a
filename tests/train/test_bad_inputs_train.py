"""Bad input to ``python -m train.run`` and ``python -m train.export``, table-driven: one line on stderr, a non-zero
exit, no traceback, and nothing left behind (a failed start removes the output folder and empty cache it made).
Also what a resume may change (applied and logged, or refused with the key and both values), overrides after
flags, metrics truncated to the resumed step, and a data folder named once relatively and once absolutely."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train.checkpoint as ck
from train.config import load_config
from train.data import make_synthetic_dataset
from train.export import main as export_main
from train.resume import APPLY, FREE, REFUSE, changed_settings, policy
from train.run import main as run_main
from train.run import make_runner, parse_args

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "train" / "configs" / "synthetic_tiny.toml")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes") / "images"
    make_synthetic_dataset(folder, n_per_class=1, size=32, seed=0)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches") / "plain"


def tiny(out: Path, shapes: Path, cache: Path, **extra) -> list[str]:
    """Overrides that make the shipped tiny configuration a seconds-long CPU run."""
    base = {
        "output_dir": f"'{out}'",
        "max_steps": "2",
        "log_every": "1",
        "synthetic": "{}",
        "model.dims": "{}",
        "data.sources": f'[{{type = "folder", path = "{shapes}"}}]',
        "data.resolution": "32",
        "data.token_budget": "64",
        "data.max_batch": "4",
        "data.cache_dir": f"'{cache}'",
        "checkpoint.every": "1",
        "samples.every": "0",
        "export.final": "false",
        "ema.enabled": "false",
    }
    base.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def call(main, argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_clean_line(rc, err, words, expected_rc=2):
    assert rc == expected_rc, (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes, cache) -> tuple[Path, list[str]]:
    """A finished 2-step run (checkpoints at steps 1 and 2) that tests copy before changing it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    over = tiny(out, shapes, cache)
    assert run_main([CONFIG, *over, "--no-progress", "-q"]) == 0
    return out, over


def copy_run(trained, tmp_path) -> tuple[Path, list[str]]:
    src, over = trained
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, [o.replace(str(src), str(dst)) for o in over]


# ---- train.run: refused before anything is made --------------------------------------------------------------
# (id, arguments after the config ({D} = the data folder, {M} = a missing path), words of the message)
RUN_CASES = [
    ("unknown-flag", ["--rebuild-everything"], ["unrecognized arguments"]),
    ("override-not-key-value", ["max_steps"], ["key=value"]),
    ("override-unknown-key", ["optim.lrr=1"], ["unknown key", "lrr"]),
    ("override-wrong-type", ["max_steps=abc"], ["max_steps", "int"]),
    ("max-steps-zero", ["max_steps=0"], ["max_steps"]),
    ("lr-negative", ["optim.lr=-1e-4"], ["lr > 0"]),
    ("lr-nan", ["optim.lr=nan"], ["lr > 0"]),
    ("optimizer-unknown", ["optim.optimizer='sgd'"], ["optim.optimizer", "sgd"]),
    ("schedule-unknown", ["optim.schedule='step'"], ["optim.schedule"]),
    ("betas-one", ["optim.betas=[0.9]"], ["betas"]),
    ("mixed-precision-fp8", ["mixed_precision='fp8'"], ["mixed_precision"]),
    ("device-cuda", ["device='cuda'"], ["device"]),
    ("preset-unknown", ["model.preset='huge'"], ["model.preset", "huge"]),
    ("lora-rank-zero", ["lora.enabled=true", "lora.rank=0"], ["lora", "rank"]),
    ("ema-decay-above-1", ["ema.decay=1.5"], ["ema.decay"]),
    ("samples-size", ["samples.width=100"], ["multiples of 16"]),
    ("export-layout", ["export.layout='onnx'"], ["export.layout"]),
    ("checkpoint-every-negative", ["checkpoint.every=-1"], ["checkpoint.every"]),
    ("timesteps-unknown", ["objective.timesteps='cubic'"], ["objective.timesteps"]),
    ("stop-after-zero", ["--stop-after", "0"], ["--stop-after", "at least 1"]),
    ("stop-after-text", ["--stop-after", "abc"], ["--stop-after", "whole number"]),
    ("caption-dropout", ["data.caption_dropout=2.0"], ["caption_dropout"]),
    # these fail inside the start (data, model, checkpoint): what the start made is removed again
    ("data-folder-missing", ['data.sources=[{type = "folder", path = "{M}/images"}]'], ["does not exist"]),
    ("data-type-unknown", ['data.sources=[{type = "zip", path = "{D}"}]'], ["zip"]),
    ("model-checkpoint-missing", ["model.checkpoint='{M}/dit.safetensors'"], ["dit.safetensors"]),
    ("resume-path-missing", ["--resume", "{M}/step-00000009"], ["no completed checkpoint"]),
]


@pytest.mark.parametrize("case,args,words", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_train_run_bad_input(tmp_path, shapes, capsys, case, args, words):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = [CONFIG, *tiny(out, shapes, cache), "--no-progress", "-q"]
    argv += [a.replace("{D}", str(shapes)).replace("{M}", str(tmp_path / "missing")) for a in args]
    rc, err = call(run_main, argv, capsys)
    assert_one_clean_line(rc, err, words)
    assert not out.exists() and not cache.exists(), sorted(p.name for p in tmp_path.iterdir())


# ---- RL and distillation starts: the model files are checked under the key that names them, before anything is made
# (id, configuration, overrides ({M} = a missing folder, {P} = an existing file), words of the message)
START_CASES = [
    (
        "grpo-policy-missing",
        "rl_grpo_synthetic",
        ["rl.policy='{M}/policy.safetensors'"],
        ["rl.policy", "DiT to improve"],
    ),
    (
        "dpo-policy-missing",
        "rl_dpo_synthetic",
        ["rl.policy='{M}/policy.safetensors'"],
        ["rl.policy", "policy.safetensors"],
    ),
    (
        "dmdr-policy-missing",
        "rl_dmdr_synthetic",
        ["rl.policy='{M}/policy.safetensors'"],
        ["rl.policy", "DiT to improve"],
    ),
    (  # [rl.distill] teacher = the policy (DMDR distills it): the path is reported under rl.policy, once
        "dmdr-policy-and-teacher-missing",
        "rl_dmdr_synthetic",
        ["rl.policy='{M}/policy.safetensors'", "rl.distill.teacher='{M}/policy.safetensors'"],
        ["rl.policy", "DiT to improve"],
    ),
    (
        "grpo-alignment-model-missing",
        "rl_grpo_synthetic",
        ["rl.policy='{P}'", 'rl.rewards=[{name = "alignment", weight = 1.0, model = "{M}/siglip2"}]'],
        ["rl.rewards[0].model", "siglip2", "alignment"],
    ),
    (
        "grpo-aesthetic-predictor-missing",
        "rl_grpo_synthetic",
        [
            "rl.policy='{P}'",
            'rl.rewards=[{name = "contrast"}, {name = "aesthetic", path = "{M}/sac.pth", clip = "{P}"}]',
        ],
        ["rl.rewards[1].path", "sac.pth"],
    ),
    (
        "grpo-text-encoder-missing",
        "rl_grpo_synthetic",
        ["rl.policy='{P}'", "model.text_encoder='{M}/qwen'"],
        ["model.text_encoder"],
    ),
    (
        "distill-teacher-missing",
        "distill_synthetic",
        ["distill.teacher='{M}/teacher.safetensors'"],
        ["distill.teacher"],
    ),
]


@pytest.mark.parametrize("case,config,args,words", START_CASES, ids=[c[0] for c in START_CASES])
def test_rl_and_distill_starts_check_model_files(tmp_path, capsys, case, config, args, words):
    out, cache, policy = tmp_path / "run", tmp_path / "cache", tmp_path / "policy.safetensors"
    policy.write_bytes(b"")  # exists: only the missing file may be reported
    argv = [str(ROOT / "train" / "configs" / f"{config}.toml"), f"output_dir='{out}'", f"data.cache_dir='{cache}'"]
    argv += [a.replace("{M}", str(tmp_path / "missing")).replace("{P}", str(policy)) for a in args]
    rc, err = call(run_main, [*argv, "--no-progress", "-q"], capsys)
    assert_one_clean_line(rc, err, [*words, "does not exist", str(tmp_path / "missing")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.safetensors"]  # no run folder, no cache


# ---- [distill] choices: refused when the configuration is read, before anything is made ----------------------
DISTILL_CASES = [
    ("gan-head", "distill.gan_head='patch'", ["distill.gan_head", "patch", "pooled, tokens"]),
    ("simulation", "distill.simulation='heun'", ["distill.simulation", "heun", "euler, renoise"]),
    ("fake", "distill.fake='none'", ["distill.fake", "lora, full"]),
    ("student-input", "distill.student_input='noise'", ["distill.student_input", "backward, real"]),
]


@pytest.mark.parametrize("case,arg,words", DISTILL_CASES, ids=[c[0] for c in DISTILL_CASES])
def test_distill_choice_bad_input(tmp_path, capsys, case, arg, words):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = [
        str(ROOT / "train" / "configs" / "distill_synthetic.toml"),
        f"output_dir='{out}'",
        f"data.cache_dir='{cache}'",
    ]
    rc, err = call(run_main, [*argv, arg, "--no-progress", "-q"], capsys)
    assert_one_clean_line(rc, err, ["must be one of", *words])
    assert list(tmp_path.iterdir()) == []  # no run folder, no cache


def test_train_run_config_file_problems(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_steps = [\n")
    rc, err = call(run_main, [str(bad)], capsys)
    assert_one_clean_line(rc, err, ["not valid TOML"])
    rc, err = call(run_main, [str(tmp_path / "none.toml")], capsys)
    assert_one_clean_line(rc, err, ["does not exist"])
    rc, err = call(run_main, [], capsys)
    assert_one_clean_line(rc, err, ["python -m train.run: error", "config"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_a_failed_start_keeps_what_existed(trained, tmp_path, capsys):
    """A start that fails inside an existing run folder removes nothing of it and rewrites no config.json."""
    out, over = copy_run(trained, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, err = call(run_main, [CONFIG, *over, "model.checkpoint='/nonexistent/dit.safetensors'", "-q"], capsys)
    assert_one_clean_line(rc, err, ["dit.safetensors"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---- overrides after flags ---------------------------------------------------------------------------------
def test_overrides_may_follow_flags():
    args = parse_args(["c.toml", "--no-progress", "max_steps=2", "--resume", "optim.lr=1e-4", "-q"])
    assert args.resume is True and args.no_progress and args.quiet
    assert args.overrides == ["max_steps=2", "optim.lr=1e-4"]
    args = parse_args(["c.toml", "a=1", "--resume", "runs/x/checkpoints/step-00000002", "b.c=2"])
    assert args.resume == "runs/x/checkpoints/step-00000002" and args.overrides == ["a=1", "b.c=2"]


def test_resume_then_override_continues_the_run(trained, tmp_path, capsys):
    out, over = copy_run(trained, tmp_path)
    over = [o for o in over if not o.startswith("max_steps=")]
    rc, err = call(run_main, [CONFIG, *over, "--resume", "max_steps=3", "--no-progress", "-q"], capsys)
    assert rc == 0, err
    assert ck.latest_checkpoint(out / "checkpoints").name == ck.step_name(3)


# ---- resume with edited settings -----------------------------------------------------------------------------
def test_resume_policy_table():
    assert policy("optim.lr") == APPLY and policy("max_steps") == APPLY and policy("distill.ttur") == APPLY
    assert policy("rl.kl_beta") == APPLY and policy("checkpoint.every") == FREE and policy("output_dir") == FREE
    assert policy("rl.distill.ttur") == APPLY and policy("rl.distill.method") == REFUSE  # DMDR's [rl.distill]
    for key in ("model.dims.dim", "lora.rank", "data.resolution", "seed", "distill.method", "rl.method", "x.y"):
        assert policy(key) == REFUSE, key
    saved = {"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "data": {"sources": [{"path": "a"}]}}
    now = {"optim": {"lr": 2e-4, "betas": [0.9, 0.99]}, "data": {"sources": [{"path": "b"}]}}
    assert changed_settings(saved, now) == [
        ("data.sources", [{"path": "a"}], [{"path": "b"}]),
        ("optim.lr", 1e-4, 2e-4),
    ]


def test_resume_applies_an_edited_learning_rate(trained, tmp_path, caplog):
    out, over = copy_run(trained, tmp_path)
    cfg = load_config(CONFIG, [*over, "optim.lr=4e-3", "optim.weight_decay=0.5", "max_steps=3"])
    runner = make_runner(cfg, resume=True, progress=False)
    with caplog.at_level(logging.INFO, logger="train.resume"):
        runner.setup()
    group = runner.units["trainable"].optimizer.param_groups[0]
    assert runner.step == 2 and group["weight_decay"] == 0.5
    assert group["initial_lr"] == 4e-3 and runner.units["trainable"].schedule.base_lrs == [4e-3]
    assert "optim.lr changed 0.002 -> 0.004, applied" in caplog.text
    assert "max_steps changed 2 -> 3, applied" in caplog.text
    schedule = runner.units["trainable"].schedule
    assert group["lr"] == 4e-3 * schedule.lr_lambdas[0](schedule.last_epoch)  # this run's rate at the resumed step
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 4e-3
    assert runner.train().step == 3


@pytest.mark.parametrize(
    "change,key,old,new",
    [
        ("seed=5", "seed", "0", "5"),
        ("model.gradient_checkpointing=true", "model.gradient_checkpointing", "False", "True"),
        ("objective.timesteps='uniform'", None, None, None),  # applied: not refused
    ],
    ids=["seed", "model", "objective-applied"],
)
def test_resume_refuses_what_cannot_change(trained, tmp_path, capsys, change, key, old, new):
    out, over = copy_run(trained, tmp_path)
    config_before = (out / "config.json").read_text()
    rc, err = call(run_main, [CONFIG, *over, change, "max_steps=3", "--resume", "--no-progress", "-q"], capsys)
    if key is None:
        assert rc == 0, err
        return
    assert_one_clean_line(rc, err, [f"{key} = {new}", f"{key} = {old}", "cannot change on resume"])
    assert (out / "config.json").read_text() == config_before  # the refused start rewrote nothing
    assert ck.latest_checkpoint(out / "checkpoints").name == ck.step_name(2)


# ---- metrics after a kill ------------------------------------------------------------------------------------
def test_metrics_are_truncated_to_the_resumed_step(trained, tmp_path):
    """A SIGKILL after step 2 but before its checkpoint: the resumed run logs step 2 once, not twice."""
    out, over = copy_run(trained, tmp_path)
    shutil.rmtree(out / "checkpoints" / ck.step_name(2))  # as if killed before the checkpoint of step 2
    cfg = load_config(CONFIG, over)
    make_runner(cfg, resume=True, progress=False).train()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ---- the data folder, relative and absolute -------------------------------------------------------------------
def test_relative_and_absolute_data_paths_share_a_cache(trained, tmp_path, shapes, cache, monkeypatch, capsys):
    monkeypatch.chdir(shapes.parent)
    over = tiny(tmp_path / "rel", Path(shapes.name), cache)  # "images" instead of /abs/.../images
    rc, err = call(run_main, [CONFIG, *over, "max_steps=1", "--no-progress", "-q"], capsys)
    assert rc == 0, err
    assert "sources changed" not in err


# ---- train.export ----------------------------------------------------------------------------------------------
EXPORT_CASES = [
    ("ckpt-missing", ["{M}/run"], ["no completed checkpoint"]),
    ("ckpt-empty-folder", ["{T}/empty"], ["no completed checkpoint"]),
    ("out-parent-is-file", ["{R}", "--out", "{T}/a_file/x.safetensors"], ["--out", "is a file"]),
    ("out-deep-parent-is-file", ["{R}", "--out", "{T}/a_file/x/y/z.safetensors"], ["is a file"]),
    ("ema-missing", ["{R}", "--ema", "--out", "{T}/o.safetensors"], ["no EMA", "--ema"]),
    ("layout-unknown", ["{R}", "--layout", "onnx"], ["invalid choice"]),
    ("dtype-unknown", ["{R}", "--dtype", "int4"], ["invalid choice"]),
    ("no-ckpt", [], ["ckpt"]),
]


@pytest.mark.parametrize("case,args,words", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_train_export_bad_input(trained, tmp_path, capsys, case, args, words):
    run, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    before = sorted(str(p) for p in run.rglob("*"))
    argv = [
        a.replace("{M}", str(tmp_path / "missing")).replace("{T}", str(tmp_path)).replace("{R}", str(run)) for a in args
    ]
    rc, err = call(export_main, argv, capsys)
    assert_one_clean_line(rc, err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty"]
    assert sorted(str(p) for p in run.rglob("*")) == before


# ---- the real entry points ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module,argv,words",
    [
        ("train.run", ["missing.toml"], ["train.run: error", "does not exist"]),
        ("train.run", ["missing.toml", "--resume", "max_steps=6", "--no-progress"], ["does not exist"]),
        ("train.export", ["nowhere"], ["train.export: error", "no completed checkpoint"]),
    ],
    ids=["run", "run-override-after-flag", "export"],
)
def test_real_entry_points(tmp_path, module, argv, words):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ZIMAGE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert_one_clean_line(p.returncode, p.stderr, words)
    assert list(tmp_path.iterdir()) == []


# ---- train.curate ------------------------------------------------------------------------------------------------
CURATE_CASES = [
    ("input-missing", ["profile", "--input", "{T}/nope", "--out", "{T}/o"], ["train.curate profile: error", "nope"]),
    ("no-stage", [], ["python -m train.curate: error", "stage"]),
    ("input-required", ["profile", "--out", "{T}/o"], ["--input"]),
    ("shard-size-text", ["profile", "--input", "{T}", "--out", "{T}/o", "--shard-size", "x"], ["--shard-size"]),
    ("unknown-engine", ["profile", "--input", "{T}", "--out", "{T}/o", "--engine", "spark"], ["invalid choice"]),
]


@pytest.mark.parametrize("case,args,words", CURATE_CASES, ids=[c[0] for c in CURATE_CASES])
def test_train_curate_bad_input(tmp_path, capsys, case, args, words):
    from train.curate.cli import main as curate_main

    rc, err = call(curate_main, [a.replace("{T}", str(tmp_path)) for a in args] + (["-q"] if args else []), capsys)
    assert_one_clean_line(rc, err, words)
    assert list(tmp_path.iterdir()) == []
