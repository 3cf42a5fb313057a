"""End to end: the full image from `zimage generate` equals diffusers' ZImagePipeline on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories.pipeline import build_tiny_model, reference_pipeline
from zimage_core.cli import main
from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.sampling import initial_noise, latent_shape


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=21)


@pytest.fixture(scope="module")
def ref(model):
    return reference_pipeline(model)


def ref_images(ref, prompt, seed, steps=8, cfg=1.0, negative=None, batch=1, width=64, height=48, output_type="pil"):
    return ref(
        prompt=prompt,
        negative_prompt=negative,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=cfg - 1.0,
        num_images_per_prompt=batch,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).images


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def assert_same_image(a: Image.Image, b: Image.Image):
    assert a.size == b.size
    diff = np.abs(pixels(a) - pixels(b))
    # float32 on both sides: rounding may flip a value at a .5 boundary, nothing more
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cli_turbo_image_matches_reference_diffusers_layout(model, ref, tmp_path):
    out = tmp_path / "cat.png"
    rc = main(
        [
            "generate",
            "--model",
            str(model.root),
            "--prompt",
            "a red cat on a blue sofa",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "8",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    got = Image.open(out)
    assert_same_image(got, ref_images(ref, "a red cat on a blue sofa", 7)[0])
    meta = json.loads(got.text["zimage"])
    assert meta["seed"] == 7 and meta["steps"] == 8 and meta["prompt"] == "a red cat on a blue sofa"
    assert "Negative prompt" in got.text["parameters"]


def test_cli_single_files_give_the_same_image(model, ref, tmp_path):
    out = tmp_path / "single.png"
    rc = main(
        [
            "generate",
            "--transformer",
            str(model.transformer),
            "--text-encoder",
            str(model.text_encoder),
            "--vae",
            str(model.vae),
            "--tokenizer",
            str(model.tokenizer),
            "--prompt",
            "a lighthouse at dusk",
            "--width",
            "48",
            "--height",
            "80",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert_same_image(Image.open(out), ref_images(ref, "a lighthouse at dusk", 3, width=48, height=80)[0])


def test_batch_two_writes_indexed_files(model, ref, tmp_path):
    out = tmp_path / "b.png"
    rc = main(
        [
            "generate",
            "--model",
            str(model.root),
            "--prompt",
            "two birds",
            "--width",
            "64",
            "--height",
            "64",
            "--batch",
            "2",
            "--seed",
            "11",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    want = ref_images(ref, "two birds", 11, batch=2, width=64, height=64)
    for i in range(2):
        assert_same_image(Image.open(tmp_path / f"b_{i}.png"), want[i])
    assert not np.array_equal(pixels(Image.open(tmp_path / "b_0.png")), pixels(Image.open(tmp_path / "b_1.png")))


@pytest.fixture(scope="module")
def pipe(model):
    return ZImagePipeline.load(model.root, device="cpu")


def test_cfg_with_negative_prompt_latents(pipe, ref):
    """Base-style CFG (cfg 4 <=> diffusers guidance 3) with a negative prompt, compared on latents."""
    opts = GenerateOptions(
        prompt="a bowl of fruit", negative="blurry, low quality", width=64, height=48, steps=6, cfg=4.0, seed=5
    )
    cond = pipe.encode_prompts(opts.prompts())
    uncond = pipe.encode_prompts(opts.negatives())
    got = pipe.sample(cond, uncond, initial_noise(latent_shape(1, 48, 64), 5), opts)
    want = ref_images(ref, "a bowl of fruit", 5, steps=6, cfg=4.0, negative="blurry, low quality", output_type="latent")
    assert rel_err(got, want) <= 1e-5
    plain = pipe.sample(
        cond,
        None,
        initial_noise(latent_shape(1, 48, 64), 5),
        GenerateOptions(prompt="x", width=64, height=48, steps=6, seed=5),
    )
    assert rel_err(got, plain) > 1e-3  # guidance really changed the result


def test_long_prompt_truncated_like_reference(pipe, ref, caplog):
    prompt = " ".join(f"word{i}" for i in range(700))
    opts = GenerateOptions(prompt=prompt, width=32, height=32, steps=2, seed=1)
    with caplog.at_level("WARNING"):
        cond = pipe.encode_prompts(opts.prompts())
    assert any("cut" in r.getMessage() or "truncat" in r.getMessage() for r in caplog.records)
    got = pipe.sample(cond, None, initial_noise(latent_shape(1, 32, 32), 1), opts)
    want = ref_images(ref, prompt, 1, steps=2, width=32, height=32, output_type="latent")
    assert rel_err(got, want) <= 1e-5


def test_seed_changes_image_and_is_reproducible(pipe):
    opts = GenerateOptions(prompt="a fox", width=32, height=32, steps=2, seed=1)
    a = pixels(pipe.generate(opts, progress=False)[0])
    b = pixels(pipe.generate(opts, progress=False)[0])
    opts.seed = 2
    c = pixels(pipe.generate(opts, progress=False)[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--width", "100"], "multiple of 16"),
        (["--sampler", "nope"], "invalid choice"),
        (["--model", "/nonexistent/dir"], "not a folder"),
        (["--transformer", "/nonexistent.safetensors", "--text-encoder", "x", "--vae", "y"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, expect, model):
    base = ["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--device", "cpu"]
    if "--model" not in args and "--transformer" not in args:
        base += ["--model", str(model.root)]
    try:
        rc = main(base + args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_wrong_kind_of_checkpoint(tmp_path, capsys, model):
    rc = main(
        [
            "generate",
            "--transformer",
            str(model.vae),
            "--text-encoder",
            str(model.text_encoder),
            "--vae",
            str(model.vae),
            "--tokenizer",
            str(model.tokenizer),
            "--prompt",
            "x",
            "--width",
            "32",
            "--height",
            "32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "VAE" in err and len(err.splitlines()) == 1
