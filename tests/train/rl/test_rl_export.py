"""What an RL run leaves in ``OUTPUT_DIR/export/`` loads where users load models: a DPO LoRA in ``zimage generate
--lora`` and the nodes' ZImageLoraLoader, a GRPO full fine-tune in ``zimage generate --transformer``; both change
the image (the tiny model of tests/factories, with its real text encoder and VAE files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from zimage_pack.nodes import conditioning, loaders, sampler

from tests.factories import comfy as C
from tests.factories.pipeline import build_tiny_model
from train.config import load_config
from train.rl.trainer import RLTrainer
from zimage_core.cli import main as zimage

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[3] / "train" / "configs"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    tiny = build_tiny_model(tmp, seed=11)
    tiny.models = C.install_models(tiny, tmp / "models", dit_names=("z_image_turbo_bf16.safetensors",))
    return tiny


def rl_run(model, out: Path, config: str, **extra):
    over = {
        "output_dir": f"'{out}'",
        "max_steps": "3",
        "model.text_encoder": f"'{model.text_encoder}'",
        "model.tokenizer": f"'{model.tokenizer}'",
        "model.vae": f"'{model.vae}'",
        "model.dtype": "fp32",
        "rl.policy": f"'{model.transformer}'",
        "rl.prompts_file": "''",
        "rl.prompts": '["a red circle", "a blue square"]',
        "rl.rewards": '[{name = "brightness", weight = 1.0}]',
        "rl.width": "32",
        "rl.height": "32",
        "rl.steps": "3",
        "rl.group_size": "3",
        "rl.prompts_per_step": "1",
        "rl.candidates": "3",
        "rl.min_gap": "0.0",
        "rl.micro_batch": "0",
        "rl.clip_range": "0.2",
        "optim.optimizer": "adamw",
        "optim.lr": "5e-2",
        "optim.warmup_steps": "0",
        "checkpoint.every": "0",
        "samples.every": "0",
        "ema.enabled": "false",
        "export.dtype": "fp32",
    }
    over.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    trainer = RLTrainer(load_config(CONFIGS / config, [f"{k}={v}" for k, v in over.items()]), progress=False)
    return trainer.train()


def generate(model, out: Path, *extra: str, transformer: Path | None = None) -> np.ndarray:
    args = [
        "generate",
        "--transformer",
        str(transformer or model.transformer),
        "--text-encoder",
        str(model.text_encoder),
    ]
    args += ["--vae", str(model.vae), "--tokenizer", str(model.tokenizer), "--prompt", "a red circle"]
    args += ["--width", "32", "--height", "32", "--steps", "3", "--seed", "4", "--device", "cpu", "--out", str(out)]
    assert zimage(args + list(extra)) == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def test_dpo_lora_loads_in_zimage_generate_and_the_nodes(model, tmp_path, monkeypatch):
    res = rl_run(model, tmp_path / "run", "rl_dpo_turbo.toml", lora__rank=4, rl__beta="5000.0", optim__grad_accum=1)
    assert res.export.parent == tmp_path / "run" / "export" and res.export.name.endswith("_lora.safetensors")
    base = generate(model, tmp_path / "base.png")
    tuned = generate(model, tmp_path / "tuned.png", "--lora", str(res.export))
    assert np.abs(tuned - base).max() > 2
    # the nodes: ComfyUI's models/loras folder, ZImageLoraLoader, the sampler node
    shutil.copy(res.export, model.models / "loras" / "rl.safetensors")
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(model.models))
    dit = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    cond = conditioning.ZImageTextEncode().encode(te, "a red circle", 512)[0]
    latent = C.EmptySD3LatentImage().generate(32, 32, 1)[0]
    args = dict(seed=4, steps=3, cfg=1.0, shift=3.0, sampler_name="euler", denoise=1.0)
    plain = sampler.ZImageTurboSampler().sample(dit, cond, latent, **args)[0]["samples"]
    styled_model = loaders.ZImageLoraLoader().load(dit, "rl.safetensors", 1.0)[0]
    styled = sampler.ZImageTurboSampler().sample(styled_model, cond, latent, **args)[0]["samples"]
    assert float((styled - plain).abs().max()) > 1e-3


def test_grpo_full_model_loads_in_zimage_generate(model, tmp_path):
    res = rl_run(
        model,
        tmp_path / "run",
        "rl_grpo_synthetic.toml",
        rl__kl_beta="0.0",
        rl__train_steps='"all"',
        rl__updates_per_rollout=1,
    )
    assert res.export.parent == tmp_path / "run" / "export" and res.export.suffix == ".safetensors"
    base = generate(model, tmp_path / "base.png")
    tuned = generate(model, tmp_path / "tuned.png", transformer=res.export)
    assert np.abs(tuned - base).max() > 2
    assert torch.isfinite(torch.from_numpy(tuned)).all()
