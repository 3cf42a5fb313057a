"""Exported models and LoRAs load where users load them: ``zimage generate --transformer/--lora`` (and, by their
key names, native ComfyUI), and they change the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.factories.pipeline import build_tiny_model
from train.config import load_config
from train.data import make_synthetic_dataset
from train.export import main as export_main
from train.lora_train import adapters
from train.trainer import Trainer
from zimage_core.checkpoints import load_dit
from zimage_core.cli import main as zimage
from zimage_core.dit_layout import DiTCheckpoint
from zimage_core.lora import apply_loras, load_lora

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
]
CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes") / "images"
    make_synthetic_dataset(folder, n_per_class=1, size=32, seed=0)
    return folder


@pytest.fixture(scope="module")
def base_image(model, tmp_path_factory) -> np.ndarray:
    return generate(model, tmp_path_factory.mktemp("base") / "base.png")


def train_on(model, shapes: Path, out: Path, config: str, **extra):
    over = {
        "output_dir": f"'{out}'",
        "max_steps": "2",
        "synthetic": "{}",
        "model.checkpoint": f"'{model.transformer}'",
        "model.text_encoder": f"'{model.text_encoder}'",
        "model.tokenizer": f"'{model.tokenizer}'",
        "model.vae": f"'{model.vae}'",
        "model.vision": "''",
        "model.dims": "{}",
        "data.sources": f'[{{type = "folder", path = "{shapes}"}}]',
        "data.resolution": "32",
        "data.cache_dir": f"'{out.parent / 'cache'}'",
        "data.caption_levels": "{caption = 1.0}",
        "data.languages": "{en = 1.0}",
        "data.token_budget": "64",
        "data.max_batch": "4",
        "samples.every": "0",
        "optim.optimizer": "adamw",
        "optim.lr": "1e-2",
        "optim.warmup_steps": "0",
        "checkpoint.every": "0",
        "export.dtype": "fp32",
    }
    over.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    cfg = load_config(CONFIGS / config, [f"{k}={v}" for k, v in over.items()])
    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.train()


def generate(model, out: Path, *extra: str, transformer: Path | None = None) -> np.ndarray:
    rc = zimage(
        [
            "generate",
            "--transformer",
            str(transformer or model.transformer),
            "--text-encoder",
            str(model.text_encoder),
            "--vae",
            str(model.vae),
            "--tokenizer",
            str(model.tokenizer),
            "--prompt",
            "a red circle",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def test_exported_full_model_loads_in_zimage_generate_and_changes_the_image(model, shapes, base_image, tmp_path):
    trainer, res = train_on(model, shapes, tmp_path / "run", "finetune_full.toml", ema__enabled="false")
    exported = res.export
    assert exported.suffix == ".safetensors" and DiTCheckpoint(exported).layout == "comfyui"
    trained = load_file(str(res.checkpoint / "trainable.safetensors"))
    loaded = load_dit(exported, dtype=torch.float32).state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    after = generate(model, tmp_path / "tuned.png", transformer=exported)
    assert np.abs(after - base_image).max() > 2
    # the export CLI: EMA absent -> a clear error; diffusers layout -> a folder zimage loads
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert (
        export_main(
            [str(tmp_path / "run"), "--out", str(tmp_path / "diffusers"), "--layout", "diffusers", "--dtype", "fp32"]
        )
        == 0
    )
    again = load_dit(tmp_path / "diffusers", dtype=torch.float32).state_dict()
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_exported_lora_loads_in_zimage_generate_and_uses_comfyui_names(model, shapes, base_image, tmp_path):
    trainer, res = train_on(
        model,
        shapes,
        tmp_path / "run",
        "finetune_lora.toml",
        lora__rank=4,
        lora__alpha="2.0",
        model__dtype="fp32",
        ema__enabled="true",
        ema__decay="0.5",
        export__ema="false",
    )
    lora_file = res.export
    sd = load_file(str(lora_file))
    base_keys = set(load_file(str(model.transformer)))  # the ComfyUI single file's own names
    names = set()
    for k in sd:
        assert k.startswith("diffusion_model.")
        stem, suffix = k.rsplit(".lora_", 1) if ".lora_" in k else k.rsplit(".", 1)
        assert suffix in ("down.weight", "up.weight", "alpha")
        assert stem[len("diffusion_model.") :] + ".weight" in base_keys  # ComfyUI maps diffusion_model.<key> -> weight
        names.add(stem)
    assert any(n.endswith("attention.qkv") for n in names) and any(n.endswith("feed_forward.w2") for n in names)
    assert float(sd[next(k for k in sd if k.endswith(".alpha"))]) == pytest.approx(2.0)
    # zimage's loader reads it, and merging it reproduces the trained adapters exactly
    lora = load_lora(lora_file)
    base = load_dit(model.transformer, dtype=torch.float32)
    w0 = base.layers[0].attention.qkv.weight.detach().clone()
    apply_loras(base, [(lora, 1.0)], mode="merge")
    ad = adapters(trainer.dit)["layers.0.attention.qkv"]
    delta = (ad.up.detach() @ ad.down.detach()) * ad.scale
    torch.testing.assert_close(base.layers[0].attention.qkv.weight - w0, delta, atol=1e-6, rtol=1e-5)
    on = generate(model, tmp_path / "on.png", "--lora", str(lora_file))
    assert np.abs(on - base_image).max() > 2
    # the EMA adapters export too, and differ from the raw ones
    assert export_main([str(res.checkpoint), "--out", str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    ema = load_file(str(tmp_path / "ema.safetensors"))
    assert ema.keys() == sd.keys() and any(not torch.equal(ema[k], sd[k]) for k in sd)
