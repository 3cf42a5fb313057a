"""A distilled student loads where users load models: as a DiT file (``zimage generate --transformer``, the model
loader node) and as a LoRA over its teacher (``--lora``, the LoRA loader node), and samples at the student's step
count with cfg 1; both routes draw the same image, which is the one the run drew as its sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from zimage_pack.nodes import conditioning, loaders, sampler

from tests.factories import comfy as C
from tests.factories.pipeline import build_tiny_model
from train.config import load_config
from train.data import make_synthetic_dataset
from train.distill import Distiller
from zimage_core.checkpoints import load_dit
from zimage_core.cli import main as zimage
from zimage_core.dit_layout import DiTCheckpoint
from zimage_core.errors import ZImageError
from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.sampling import initial_noise, latent_shape
from zimage_core.vae import to_raw_space

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
]
CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
STEPS, SHIFT, SEED, PROMPT = 3, 2.0, 4, "a red circle"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distilled")
    model = build_tiny_model(tmp / "tiny", seed=5)
    shapes = tmp / "shapes"
    make_synthetic_dataset(shapes, n_per_class=1, size=32, seed=0)
    over = {
        "output_dir": f"'{tmp / 'run'}'",
        "max_steps": "2",
        "synthetic": "{}",
        "distill.teacher": f"'{model.transformer}'",
        "distill.student_steps": str(STEPS),
        "distill.student_shift": str(SHIFT),
        "distill.ttur": "1",
        "distill.lora_rank": "256",  # >= every linear layer's smaller side: the LoRA is the student exactly
        "model.text_encoder": f"'{model.text_encoder}'",
        "model.tokenizer": f"'{model.tokenizer}'",
        "model.vae": f"'{model.vae}'",
        "data.sources": f'[{{type = "folder", path = "{shapes}"}}]',
        "data.resolution": "32",
        "data.cache_dir": f"'{tmp / 'cache'}'",
        "data.token_budget": "64",
        "data.max_batch": "4",
        "optim.lr": "2e-2",
        "optim.warmup_steps": "0",
        "samples.every": "2",
        "samples.prompts": f'["{PROMPT}"]',
        "samples.seeds": f"[{SEED}]",
        "samples.width": "32",
        "samples.height": "32",
        "export.dtype": "fp32",
    }
    cfg = load_config(CONFIGS / "distill_synthetic.toml", [f"{k}={v}" for k, v in over.items()])
    dist = Distiller(cfg, progress=False)
    res = dist.train()
    files = {p.name: p for p in (tmp / "run" / "export").iterdir()}
    return model, dist, res, files, tmp


def generate(model, out: Path, transformer: Path, *extra: str) -> np.ndarray:
    args = ["generate", "--transformer", str(transformer), "--text-encoder", str(model.text_encoder)]
    args += ["--vae", str(model.vae), "--tokenizer", str(model.tokenizer), "--prompt", PROMPT, "--width", "32"]
    args += ["--height", "32", "--steps", str(STEPS), "--shift", str(SHIFT), "--cfg", "1", "--seed", str(SEED)]
    assert zimage([*args, "--device", "cpu", "--out", str(out), *extra]) == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def test_student_file_and_turbo_lora_load_in_zimage_generate(run):
    model, dist, res, files, tmp = run
    student = files["distill_synthetic_3step_student.safetensors"]
    lora = files["distill_synthetic_3step_turbo_lora_r256.safetensors"]
    assert res.export == student and DiTCheckpoint(student).layout == "comfyui"
    diffusers = load_dit(files["distill_synthetic_3step_student_diffusers"], dtype=torch.float32).state_dict()
    assert all(torch.equal(diffusers[k], v) for k, v in dist.nets.student.state_dict().items())
    report = json.loads(files["distill_synthetic_3step_lora_report.json"].read_text())
    assert report["linear_energy_kept"] == pytest.approx(1.0, abs=1e-6) and report["energy_kept_by_rank"]["1"] < 0.9
    assert not report["not_representable_relative_change"]
    keys = load_file(str(lora))
    assert all(k.startswith("diffusion_model.") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)

    sample = np.asarray(Image.open(tmp / "run" / "samples" / "step-00000002" / f"p0_s{SEED}.png"), dtype=np.int16)
    by_file = generate(model, tmp / "student.png", student)
    by_lora = generate(model, tmp / "lora.png", model.transformer, "--lora", str(lora))
    teacher = generate(model, tmp / "teacher.png", model.transformer)
    assert np.abs(by_file - sample).max() <= 1  # what the run drew at the student's steps with cfg 1
    assert np.abs(by_lora - by_file).max() <= 2
    assert np.abs(teacher - by_file).max() > 2  # distillation changed the model


def test_student_file_and_turbo_lora_load_in_the_nodes(run, monkeypatch):
    model, dist, _, files, tmp = run
    models = C.install_models(model, tmp / "models", dit_names=("teacher.safetensors",))
    shutil.copy(
        files["distill_synthetic_3step_student.safetensors"], models / "diffusion_models" / "student.safetensors"
    )
    shutil.copy(files["distill_synthetic_3step_turbo_lora_r256.safetensors"], models / "loras" / "turbo.safetensors")
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(models))
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    cond = conditioning.ZImageTextEncode().encode(te, PROMPT, 512)[0]
    latent = C.EmptySD3LatentImage().generate(32, 32, 1)[0]
    args = dict(seed=SEED, steps=STEPS, cfg=1.0, shift=SHIFT, sampler_name="euler", denoise=1.0)
    student = loaders.ZImageModelLoader().load("student.safetensors")[0]
    by_file = sampler.ZImageTurboSampler().sample(student, cond, latent, **args)[0]["samples"]
    base = loaders.ZImageModelLoader().load("teacher.safetensors")[0]
    turbo = loaders.ZImageLoraLoader().load(base, "turbo.safetensors", 1.0)[0]
    by_lora = sampler.ZImageTurboSampler().sample(turbo, cond, latent, **args)[0]["samples"]
    plain = sampler.ZImageTurboSampler().sample(base, cond, latent, **args)[0]["samples"]
    # the engine's pipeline with the trained student in memory draws the same latents
    pipe = ZImagePipeline(dist.nets.student, te.encoder, None, "cpu")
    opts = GenerateOptions(prompt=PROMPT, width=32, height=32, steps=STEPS, shift=SHIFT, seed=SEED)
    with torch.no_grad():
        ref = pipe.sample(pipe.encode_prompts([PROMPT]), None, initial_noise(latent_shape(1, 32, 32), SEED), opts)
    torch.testing.assert_close(by_file, to_raw_space(ref), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_lora, by_file, atol=2e-3, rtol=1e-3)
    assert (plain - by_file).abs().max() > 1e-2


def test_a_failed_export_leaves_nothing_and_a_repeated_one_replaces_the_files(run, tmp_path, monkeypatch):
    """The export writes its files into a temporary folder and moves them in only when all are complete: a failure
    after the student file (here the LoRA writer) leaves no file at the destination, new or existing; an export
    into a folder that already holds one replaces its files (the diffusers folder included)."""
    from train.distill import export as distill_export

    _, _, res, files, _ = run
    ckpt = res.export.parents[1] / "checkpoints"
    wrote = []

    def failing_save_lora(lora, path, metadata=None):
        wrote.append(sorted(p.name for p in Path(path).parent.iterdir()))  # the student files exist by now
        raise OSError(28, "No space left on device")

    out = tmp_path / "new" / "export"
    with monkeypatch.context() as m:
        m.setattr(distill_export, "save_lora", failing_save_lora)
        with pytest.raises(OSError, match="No space"):
            distill_export.export_distilled(ckpt, out, lora_rank=4)
        assert "distill_synthetic_3step_student.safetensors" in wrote[0]
        assert not (tmp_path / "new").exists()  # neither the files nor the folders made for them
        old = tmp_path / "old"
        shutil.copytree(res.export.parent, old)
        before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
        with pytest.raises(OSError, match="No space"):
            distill_export.export_distilled(ckpt, old, dtype="bf16", lora_rank=4)
        assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folder left next to them
    paths = distill_export.export_distilled(ckpt, old, dtype="bf16", lora_rank=4)
    assert set(paths) == {"student", "diffusers", "lora", "report"} and all(p.parent == old for p in paths.values())
    assert paths["student"].read_bytes() != before[Path(paths["student"].name)]  # bf16 now, fp32 before
    assert sorted(p.name for p in old.iterdir()) == sorted(files) + [
        "distill_synthetic_3step_turbo_lora_r4.safetensors"
    ]
    assert load_dit(paths["diffusers"]).state_dict().keys() == load_dit(paths["student"]).state_dict().keys()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ZImageError, match="is a file"):
        distill_export.export_distilled(ckpt, tmp_path / "a_file")
