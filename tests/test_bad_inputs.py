"""Bad input, table-driven: every case of ``zimage generate/convert/info``, the library's options and the sampler
node ends in one clear message (the CLI: one line on stderr, a non-zero exit, no traceback) and leaves no output.

The CLI runs in-process (``main(argv)``) for speed; two subprocess cases prove the real entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.factories.pipeline import build_tiny_model
from zimage_core import cli
from zimage_core.errors import ZImageError
from zimage_core.outputs import read_parameters
from zimage_core.pipeline import GenerateOptions, ZImagePipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    """Inputs of every kind, good and bad, made once."""
    d = tmp_path_factory.mktemp("inputs")
    good = d / "good.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good)
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "text.png").write_text("not an image")
    (d / "notes.txt").write_text("hello")
    (d / "a_file").write_text("x")
    (d / "existing_dir").mkdir()
    dim = model.dit_config.dim
    torch.manual_seed(0)
    lora = {
        "diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.randn(2, dim),
        "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.randn(3 * dim, 2) * 0.01,
        "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(2.0),
    }
    save_file(lora, d / "style.safetensors")
    return d


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_clean_line(rc, err, words, expected_rc=2):
    assert rc == expected_rc, (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- zimage generate ---------------------------------------------------------------------------------------
# (id, extra arguments ({F} = the inputs folder), words the message must hold)
GENERATE_CASES = [
    ("seed-above-2**64", ["--seed", "18446744073709551617"], ["seed", "18446744073709551615"]),
    ("seed-negative", ["--seed", "-1"], ["seed"]),
    ("seed-not-a-number", ["--seed", "abc"], ["whole number"]),
    ("steps-zero", ["--steps", "0"], ["steps"]),
    ("steps-fractional", ["--steps", "2.5"], ["whole number"]),
    ("batch-zero", ["--batch", "0"], ["batch"]),
    ("batch-huge", ["--batch", "100000"], ["batch", "4096"]),
    ("cfg-nan", ["--cfg", "nan"], ["--cfg", "finite"]),
    ("cfg-inf", ["--cfg", "inf"], ["--cfg", "finite"]),
    ("cfg-below-1", ["--cfg", "0.5"], ["cfg", "below 1"]),
    ("cfg-truncation-nan", ["--cfg-truncation", "nan"], ["--cfg-truncation", "finite"]),
    ("cfg-normalization-negative", ["--cfg-normalization", "-1"], ["cfg_normalization"]),
    ("shift-zero", ["--shift", "0"], ["shift"]),
    ("shift-minus-inf", ["--shift=-inf"], ["--shift", "finite"]),
    ("denoise-zero", ["--denoise", "0"], ["denoise"]),
    ("denoise-above-1", ["--denoise", "1.5"], ["denoise"]),
    ("denoise-nan", ["--denoise", "nan"], ["finite"]),
    ("width-not-16", ["--width", "100"], ["multiple of 16"]),
    ("height-zero", ["--height", "0"], ["multiple of 16"]),
    ("width-text", ["--width", "abc"], ["not an integer"]),
    ("vae-tile-text", ["--vae-tile", "abc"], ["--vae-tile", "tile size"]),
    ("vae-tile-small", ["--vae-tile", "20"], ["multiple of 8"]),
    ("device-banana", ["--device", "banana"], ["--device", "banana"]),
    ("device-cuda-missing", ["--device", "cuda:7"], ["--device", "cuda"]),
    ("max-length-negative", ["--max-length", "-1"], ["max length"]),
    ("sampler-unknown", ["--sampler", "nope"], ["invalid choice"]),
    ("memory-unknown", ["--memory", "lots"], ["--memory"]),
    ("quant-unknown", ["--quant", "int3"], ["invalid choice"]),
    ("out-txt", ["--out", "{F}/a.txt"], ["--out", ".txt", ".png"]),
    ("out-existing-dir", ["--out", "{F}/existing_dir"], ["--out", "folder"]),
    ("out-parent-is-file", ["--out", "{F}/a_file/x.png"], ["--out", "is a file"]),
    ("out-batch-parent-is-file", ["--batch", "2", "--out", "{F}/a_file/sub/x.png"], ["is a file"]),
    ("init-image-missing", ["--init-image", "{F}/nope.png"], ["--init-image", "does not exist"]),
    ("init-image-truncated", ["--init-image", "{F}/truncated.png"], ["--init-image", "truncated"]),
    ("init-image-not-image", ["--init-image", "{F}/text.png"], ["--init-image", "not an image"]),
    ("init-image-folder", ["--init-image", "{F}/existing_dir"], ["--init-image", "folder"]),
    ("mask-without-init", ["--mask", "{F}/good.png"], ["--mask needs --init-image"]),
    ("mask-truncated", ["--init-image", "{F}/good.png", "--mask", "{F}/truncated.png"], ["--mask", "truncated"]),
    ("lora-bad-strength", ["--lora", "{F}/style.safetensors:abc"], ["abc", "not a number"]),
    ("lora-nan-strength", ["--lora", "{F}/style.safetensors:nan"], ["strength", "finite"]),
    ("lora-missing", ["--lora", "{F}/missing.safetensors"], ["lora", "does not exist"]),
    ("lora-not-a-lora", ["--lora", "{F}/notes.txt"], ["notes.txt"]),
    ("huge-size", ["--width", "100000", "--height", "100000"], ["GiB", "latent tokens"]),
    ("huge-batch", ["--width", "2048", "--height", "2048", "--batch", "4096"], ["GiB", "batch 4096"]),
]


@pytest.mark.parametrize("case,extra,words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_bad_input(model, files, tmp_path, capsys, case, extra, words):
    out = tmp_path / "out"
    out.mkdir()
    before = tree(files)
    argv = ["generate", "--model", str(model.root), "--prompt", "x", "--width", "32", "--height", "32"]
    argv += ["--steps", "1", "--device", "cpu", "--out", str(out / "o.png")]
    argv += [a.replace("{F}", str(files)) for a in extra]
    rc, _, err = run_cli(argv, capsys)
    assert_one_clean_line(rc, err, words)
    assert not any(out.iterdir()), list(out.iterdir())
    assert tree(files) == before  # nothing written next to the inputs either


GENERATE_MODEL_CASES = [
    ("model-not-a-folder", ["--model", "/nonexistent/dir"], ["not a folder"]),
    ("no-model", [], ["no model given"]),
    ("dit-is-a-vae", ["--transformer", "{vae}", "--text-encoder", "{te}", "--vae", "{vae}"], ["VAE"]),
    ("vae-is-a-dit", ["--transformer", "{dit}", "--text-encoder", "{te}", "--vae", "{dit}"], ["vae"]),
    ("prompt-missing", None, ["--prompt"]),
]


@pytest.mark.parametrize("case,extra,words", GENERATE_MODEL_CASES, ids=[c[0] for c in GENERATE_MODEL_CASES])
def test_generate_bad_model_files(model, tmp_path, capsys, case, extra, words):
    names = {"{vae}": str(model.vae), "{te}": str(model.text_encoder), "{dit}": str(model.transformer)}
    argv = ["generate", "--width", "32", "--height", "32", "--device", "cpu", "--out", str(tmp_path / "o.png")]
    if extra is None:
        argv += ["--model", str(model.root)]
    else:
        argv += ["--prompt", "x", "--tokenizer", str(model.tokenizer)] + [names.get(a, a) for a in extra]
    rc, _, err = run_cli(argv, capsys)
    assert_one_clean_line(rc, err, words)
    assert list(tmp_path.iterdir()) == []


def test_no_subcommand_hint_names_the_program_once(capsys):
    rc, _, err = run_cli([], capsys)
    assert_one_clean_line(rc, err, ["zimage: error", "(see zimage --help)"])
    assert "zimage zimage" not in err


def test_unknown_subcommand(capsys):
    rc, _, err = run_cli(["paint"], capsys)
    assert_one_clean_line(rc, err, ["invalid choice", "paint"])


# ---- zimage convert / info --------------------------------------------------------------------------------
CONVERT_CASES = [
    ("src-missing", ["{F}/none.safetensors", "{T}/o.safetensors", "--layout", "comfyui"], ["does not exist"]),
    ("src-is-a-vae", ["{vae}", "{T}/o.safetensors", "--layout", "comfyui"], ["VAE"]),
    ("src-is-text", ["{F}/notes.txt", "{T}/o.safetensors", "--layout", "comfyui"], ["notes.txt"]),
    ("dst-parent-is-file", ["{dit}", "{F}/a_file/o.safetensors", "--layout", "comfyui"], ["is a file"]),
    ("dst-is-a-folder", ["{dit}", "{F}/existing_dir", "--layout", "comfyui"], ["folder"]),
    ("dst-deep-parent-is-file", ["{dit}", "{F}/a_file/x/y", "--layout", "diffusers"], ["is a file"]),
    ("layout-unknown", ["{dit}", "{T}/o.safetensors", "--layout", "onnx"], ["invalid choice"]),
    ("dtype-unknown", ["{dit}", "{T}/o.safetensors", "--layout", "comfyui", "--dtype", "fp7"], ["invalid choice"]),
]


@pytest.mark.parametrize("case,args,words", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_bad_input(model, files, tmp_path, capsys, case, args, words):
    before = tree(files)
    names = {"{vae}": str(model.vae), "{dit}": str(model.transformer)}
    argv = ["convert"] + [names.get(a, a).replace("{F}", str(files)).replace("{T}", str(tmp_path)) for a in args]
    rc, _, err = run_cli(argv, capsys)
    assert_one_clean_line(rc, err, words)
    assert list(tmp_path.iterdir()) == []
    assert tree(files) == before


INFO_CASES = [
    ("missing", "{F}/none.safetensors", ["does not exist"]),
    ("text-file", "{F}/notes.txt", ["not a Z-Image DiT, text encoder, VAE or LoRA"]),
    ("image-file", "{F}/good.png", ["not a Z-Image"]),
    ("empty-folder", "{F}/existing_dir", ["not a Z-Image"]),
]


@pytest.mark.parametrize("case,path,words", INFO_CASES, ids=[c[0] for c in INFO_CASES])
def test_info_bad_input(files, capsys, case, path, words):
    rc, out, err = run_cli(["info", path.replace("{F}", str(files))], capsys)
    assert_one_clean_line(rc, err, words)
    assert out == ""


def test_info_describes_every_kind_of_model_file(model, files, capsys):
    import json

    kinds = {}
    for name, path in (
        ("dit", model.transformer),
        ("vae", model.vae),
        ("te", model.text_encoder),
        ("lora", files / "style.safetensors"),
    ):
        rc, out, err = run_cli(["info", str(path)], capsys)
        assert rc == 0, err
        kinds[name] = json.loads(out)
    assert kinds["dit"]["kind"].startswith("diffusion model") and kinds["dit"]["config"]["dim"] == model.dit_config.dim
    assert kinds["vae"]["kind"] == "VAE" and kinds["vae"]["parameters"] > 0
    assert kinds["te"]["kind"] == "text encoder" and kinds["te"]["config"]["hidden_size"] > 0
    assert kinds["lora"]["kind"] == "LoRA" and kinds["lora"]["ranks"] == [2] and kinds["lora"]["modules"] == 1


# ---- one line for failures that are not input errors -------------------------------------------------------
def test_a_bug_shows_its_type_and_the_traceback_only_under_debug(monkeypatch, files, capsys):
    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "cmd_info", broken)
    rc, _, err = run_cli(["info", str(files / "notes.txt")], capsys)
    assert_one_clean_line(rc, err, ["internal error (TypeError)", "unsupported operand", "--debug"], expected_rc=1)
    rc, _, err = run_cli(["--debug", "info", str(files / "notes.txt")], capsys)
    assert rc == 1 and "Traceback" in err and "internal error (TypeError)" in err.strip().splitlines()[-1]
    monkeypatch.setenv("ZIMAGE_DEBUG", "1")
    rc, _, err = run_cli(["info", str(files / "notes.txt")], capsys)
    assert rc == 1 and "Traceback" in err


@pytest.mark.parametrize(
    "exc,words",
    [
        (PermissionError(13, "Permission denied", "/x/y.png"), ["Permission denied", "/x/y.png"]),
        (MemoryError(), ["out of memory"]),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ["out of memory", "2.00 GiB"]),
    ],
    ids=["oserror", "memoryerror", "cuda-oom"],
)
def test_system_failures_are_one_line(monkeypatch, files, capsys, exc, words):
    def failing(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_info", failing)
    rc, _, err = run_cli(["info", str(files / "notes.txt")], capsys)
    assert_one_clean_line(rc, err, words, expected_rc=1)


# ---- the real entry point --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,words",
    [(["generate", "--prompt", "x", "--out", "o.png", "--seed", "18446744073709551617"], ["seed"]), ([], ["--help"])],
    ids=["seed", "no-command"],
)
def test_real_entry_point(tmp_path, argv, words):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ZIMAGE_DEBUG", None)
    p = subprocess.run(
        [sys.executable, "-m", "zimage_core.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert_one_clean_line(p.returncode, p.stderr, words)
    assert list(tmp_path.iterdir()) == []


# ---- the library -------------------------------------------------------------------------------------------
OPTION_CASES = [
    ("prompt-none", {"prompt": None}, ["prompt"]),
    ("prompt-empty-list", {"prompt": []}, ["prompt"]),
    ("prompt-number", {"prompt": 3}, ["prompt"]),
    ("negative-number", {"negative": 3}, ["negative"]),
    ("steps-fractional", {"steps": 2.5}, ["steps", "whole number"]),
    ("steps-zero", {"steps": 0}, ["steps"]),
    ("steps-string", {"steps": "8"}, ["steps"]),
    ("seed-above-2**64", {"seed": 2**64}, ["seed"]),
    ("seed-negative", {"seed": -3}, ["seed"]),
    ("cfg-nan", {"cfg": float("nan")}, ["cfg", "finite"]),
    ("cfg-inf", {"cfg": float("inf")}, ["cfg", "finite"]),
    ("cfg-truncation-nan", {"cfg_truncation": float("nan")}, ["cfg_truncation"]),
    ("cfg-normalization-negative", {"cfg_normalization": -1.0}, ["cfg_normalization"]),
    ("shift-negative", {"shift": -1.0}, ["shift"]),
    ("batch-bool", {"batch": True}, ["batch"]),
    ("width-not-16", {"width": 33}, ["width", "multiple of 16"]),
    ("height-float", {"height": 64.0}, ["height"]),
    ("max-length-zero", {"max_length": 0}, ["max_length"]),
    ("denoise-nan", {"denoise": float("nan")}, ["denoise"]),
    ("lora-strength-nan", {"loras": [("a.safetensors", float("nan"))]}, ["strength", "finite"]),
    ("lora-not-a-pair", {"loras": ["a.safetensors"]}, ["pairs"]),
    ("sampler-not-a-name", {"sampler": 3}, ["sampler"]),
]


@pytest.mark.parametrize("case,fields,words", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_refuse(case, fields, words):
    opts = GenerateOptions(**{"prompt": "x", **fields})
    with pytest.raises(ZImageError) as e:
        opts.validate()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_options_accept_whole_floats_and_normalise_them():
    opts = GenerateOptions(prompt="x", steps=4.0, seed=7.0, batch=2.0)
    opts.validate()
    assert (opts.steps, opts.seed, opts.batch) == (4, 7, 2) and isinstance(opts.steps, int)


@pytest.fixture(scope="module")
def pipe(model):
    return ZImagePipeline.load(model.root, device="cpu", dtype="fp32", memory="full")


LATENT_CASES = [
    ("init-wrong-size", lambda: torch.zeros(1, 16, 3, 3), None, ["init_latents must be [1 or 1, 16, 4, 4]"]),
    ("init-wrong-channels", lambda: torch.zeros(1, 4, 4, 4), None, ["init_latents"]),
    ("init-3d", lambda: torch.zeros(16, 4, 4), None, ["init_latents"]),
    ("init-not-tensor", lambda: [[0.0]], None, ["init_latents", "list"]),
    ("init-nan", lambda: torch.full((1, 16, 4, 4), float("nan")), None, ["NaN"]),
    ("mask-without-init", None, lambda: torch.ones(1, 1, 4, 4), ["mask needs init_latents"]),
    ("mask-wrong-size", lambda: torch.zeros(1, 16, 4, 4), lambda: torch.ones(1, 1, 8, 8), ["mask must be"]),
]


@pytest.mark.parametrize("case,init,mask,words", LATENT_CASES, ids=[c[0] for c in LATENT_CASES])
def test_generate_refuses_wrong_start_latents(pipe, case, init, mask, words):
    opts = GenerateOptions(prompt="x", width=32, height=32, steps=1)
    with pytest.raises(ZImageError) as e:
        pipe.generate(opts, progress=False, init_latents=init() if init else None, mask=mask() if mask else None)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_library_refuses_a_request_larger_than_memory_up_front(pipe):
    opts = GenerateOptions(prompt="x", width=65536, height=65536, steps=1)
    with pytest.raises(ZImageError, match=r"needs about [\d.]+ GiB .* only [\d.]+ GiB"):
        pipe.generate(opts, progress=False)


# ---- valid input still works: long prompts, JPEG/WebP parameters ------------------------------------------
def test_max_length_0_with_a_prompt_longer_than_the_rope_table(model, tmp_path, capsys, caplog):
    """--max-length 0 (no limit): a prompt beyond the model's trained caption positions runs (with a warning)."""
    import dataclasses

    from zimage_core.dit import ZImageDiT

    pipe = ZImagePipeline.load(model.root, device="cpu", dtype="fp32", memory="full")
    short = dataclasses.replace(pipe.dit.cfg, axes_lens=(40, *pipe.dit.cfg.axes_lens[1:]))
    dit = ZImageDiT(short)
    dit.load_state_dict(pipe.dit.state_dict())
    pipe.dit = dit
    words = " ".join(["a red cube on a blue floor"] * 12)
    opts = GenerateOptions(prompt=words, width=32, height=32, steps=1, max_length=None)
    with caplog.at_level("WARNING"):
        img = pipe.generate(opts, progress=False)[0]
    assert img.size == (32, 32)
    assert "positions the model was trained with" in caplog.text


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".png"])
def test_outputs_keep_the_parameters(model, tmp_path, capsys, suffix):
    out = tmp_path / "img" / f"o{suffix}"
    argv = ["generate", "--model", str(model.root), "--prompt", "a cube", "--width", "32", "--height", "32"]
    argv += ["--steps", "1", "--seed", "9", "--device", "cpu", "--out", str(out)]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    params = read_parameters(out)
    assert params["prompt"] == "a cube" and params["seed"] == 9 and params["steps"] == 1
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not the temporary file's 0600


# ---- the sampler node (API prompts can hold any value, whatever the widgets allow) --------------------------
@pytest.fixture(scope="module")
def node_model(model, tmp_path_factory):
    from zimage_pack.nodes import conditioning, loaders

    from tests.factories import comfy as C

    root = C.install_models(model, tmp_path_factory.mktemp("models"), dit_names=("z_image_turbo_bf16.safetensors",))
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIMAGE_MODELS_DIR", str(root))
    try:
        dit = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
        te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    finally:
        mp.undo()
    return dit, conditioning.ZImageTextEncode().encode(te, "x", 512)[0]


NODE_CASES = [
    ("seed-nan", {"seed": float("nan")}, "seed"),
    ("seed-above-2**64", {"seed": 2**64}, "seed"),
    ("seed-negative", {"seed": -1}, "seed"),
    ("seed-fractional", {"seed": 1.5}, "whole number"),
    ("steps-fractional", {"steps": 2.5}, "steps"),
    ("steps-zero", {"steps": 0}, "steps"),
    ("cfg-nan", {"cfg": float("nan")}, "cfg"),
    ("cfg-inf", {"cfg": float("inf")}, "cfg"),
    ("shift-nan", {"shift": float("nan")}, "shift"),
    ("denoise-nan", {"denoise": float("nan")}, "denoise"),
    ("seed-variance-nan", {"seed_variance": float("nan")}, "seed_variance"),
    ("seed-variance-negative", {"seed_variance": -0.5}, "seed_variance"),
]


@pytest.mark.parametrize("case,bad,word", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_sampler_node_refuses(node_model, case, bad, word):
    from zimage_pack.nodes import sampler
    from zimage_pack.zimage_core.errors import ZImageError as PackError

    dit, cond = node_model
    args = dict(model=dit, positive=cond, latent_image={"samples": torch.zeros(1, 16, 4, 4)}, seed=1, steps=1)
    args.update(cfg=1.0, shift=3.0, sampler_name="euler", denoise=1.0)
    args.update(bad)
    with pytest.raises(PackError, match=word):
        sampler.ZImageTurboSampler().sample(**args)
