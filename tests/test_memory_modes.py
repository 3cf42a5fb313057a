"""Memory modes move weights, never change results: every mode equals ``full`` bit for bit on the CPU.

The planner is checked against made-up free-VRAM figures for the real 6B sizes; the block streamer's
bookkeeping (loads, prefetch order, releases, staged copies) runs on the CPU, where a "device copy" is a clone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories.pipeline import build_tiny_model
from zimage_core.checkpoints import load_dit
from zimage_core.cli import main
from zimage_core.config import VAEConfig
from zimage_core.denoiser import SigmaLookup
from zimage_core.errors import ZImageError
from zimage_core.memory import (
    ComponentSize,
    MemoryMode,
    Workload,
    dit_stream_blocks,
    parse_memory_mode,
    pick_blocks,
    plan_memory,
    resident_parts,
    stream_dit,
)
from zimage_core.memory.components import Residency
from zimage_core.memory.streaming import BlockStreamer, flush_streamers, streamers_of
from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.sampling import SAMPLERS, get_sampler, initial_noise, latent_shape
from zimage_core.schedules import flow_sigmas

MODES = ["full", "text-encoder-offload", "block-swap:1", "block-swap:3", "sequential", "auto"]
G = 10**9


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text,want",
    [
        ("auto", MemoryMode("auto")),
        ("full", MemoryMode("full")),
        ("Block-Swap:12", MemoryMode("block-swap", 12)),
        ("text_encoder_offload", MemoryMode("text-encoder-offload")),
        ("sequential", MemoryMode("sequential")),
    ],
)
def test_parse_memory_mode(text, want):
    assert parse_memory_mode(text) == want
    assert parse_memory_mode(str(want)) == want


@pytest.mark.parametrize(
    "text,match",
    [
        ("block-swap:x", "not a whole number"),
        ("block-swap", "needs the number"),
        ("block-swap:0", "at least 1"),
        ("lowvram", "unknown memory mode"),
        ("full:2", "takes no"),
    ],
)
def test_bad_memory_mode(text, match):
    with pytest.raises(ZImageError, match=match):
        parse_memory_mode(text)


# ---------------------------------------------------------------------------------------------- planner
# The published sizes: bf16 DiT 12.31 GB (34 blocks of 352 MB + 0.34 GB of embedders etc.), Qwen3-4B 8.04 GB (35 layers run), VAE 335 MB fp32.
DIT = ComponentSize(int(12.31 * G), (int(0.352 * G),) * 34, activation=int(1.1 * G))
TE = ComponentSize(int(8.04 * G), (int(0.2 * G),) * 35, activation=int(0.2 * G))
VAE = ComponentSize(int(0.335 * G), (), activation=int(3.3 * G))
RESERVE = int(0.8 * G)


def plan(mode, free, **kw):
    return plan_memory(mode, free, DIT, TE, VAE, reserve=RESERVE, vae_cfg=VAEConfig.flux(), work=Workload(), **kw)


def test_planner_picks_full_when_everything_fits_and_on_cpu():
    assert plan("auto", None).mode == "full"
    p = plan("auto", 32 * G)
    assert p.mode == "full" and p.dit_swap == 0 and not p.offload_text_encoder and p.fits


def test_planner_offloads_the_text_encoder_on_16_and_24_gb():
    p16 = plan("auto", 16 * G)
    assert p16.mode == "text-encoder-offload" and p16.offload_text_encoder and p16.te_swap == 0
    assert p16.offload_dit  # 12.3 GB DiT + VAE decode (3.6 GB) exceed 15.2 GB: the DiT leaves before decoding
    p24 = plan("auto", 24 * G)
    assert p24.mode == "text-encoder-offload" and not p24.offload_dit  # all at once needs 24 GB; decode fits beside


def test_planner_streams_the_fewest_blocks_that_fit():
    p = plan("auto", 8 * G)
    budget = 8 * G - RESERVE
    assert p.mode == "block-swap" and p.fits
    assert DIT.stage(p.dit_swap) <= budget < DIT.stage(p.dit_swap - 1)  # the fewest that fit
    assert TE.stage(p.te_swap) <= budget < TE.stage(p.te_swap - 1)  # the text encoder streams only what it must
    assert p.offload_text_encoder and p.vae_tile == "auto"
    assert "block-swap:%d" % p.dit_swap in p.describe()


def test_planner_goes_sequential_and_tiles_the_vae_on_tiny_cards():
    p = plan("auto", 3 * G)
    assert p.mode == "sequential" and p.dit_swap == 34 and p.te_swap == 35 and p.fits
    assert p.vae_tile == 512  # a 1024x1024 decode needs ~3.6 GB: tiles of 512 px fit 2.2 GB
    worst = plan("auto", 1 * G)
    assert worst.mode == "sequential" and not worst.fits and "nf4" in worst.reason


def test_planner_keeps_explicit_modes():
    assert plan("full", 8 * G).mode == "full" and not plan("full", 8 * G).fits
    p = plan("block-swap:10", 80 * G)
    assert p.mode == "block-swap" and p.dit_swap == 10 and p.te_swap == 0
    assert plan("block-swap:99", 80 * G).mode == "sequential" and plan("block-swap:99", 80 * G).dit_swap == 34
    assert plan("sequential", None).dit_swap == 34 and plan("sequential", None).te_swap == 35
    assert plan("block-swap:5", None).dit_swap == 5 and plan("text-encoder-offload", None).offload_text_encoder


def test_component_size_arithmetic():
    s = ComponentSize(100, (10, 10, 10), activation=5)
    assert s.resident(0) == 100 and s.resident(1) == 100 - 10 + 10 and s.resident(3) == 100 - 30 + 20
    assert s.stage(3) == 95


def test_pick_blocks_spreads_evenly():
    items = list(range(30))
    assert pick_blocks(items, 3) == [5, 15, 25]
    assert pick_blocks(items, 30) == items and pick_blocks(items, 0) == []
    assert len(set(pick_blocks(items, 17))) == 17


# ---------------------------------------------------------------------------------------------- streamer
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("mem"), seed=51)


def _inputs(dit, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 6, 8, generator=g)
    caps = [torch.randn(5 + 4 * i, dit.cfg.cap_feat_dim, generator=g) for i in range(batch)]
    return x, caps


def test_block_streamer_bookkeeping(model):
    dit = load_dit(model.transformer, dtype="fp32")
    x, caps = _inputs(dit, batch=2)  # captions of different lengths: the masked path
    with torch.inference_mode():
        want = [dit.denoise(x, torch.full((2,), t), dit.prepare(caps, 6, 8)) for t in (0.1, 0.5, 0.9)]
    streamer = stream_dit(dit, 99, "cpu", "cpu", trace=True)
    blocks = streamer.blocks
    assert len(blocks) == 4 and streamers_of(dit) == [streamer]
    homes = {id(p): p.data.data_ptr() for b in blocks for p in b.parameters()}
    seen = []

    def check(module, args):  # runs after the streamer's own pre-hook
        assert streamer.staged_count <= 2
        assert all(p.data.data_ptr() != homes[id(p)] for p in module.parameters()), "a staged copy is in use"
        seen.append(blocks.index(module))

    for b in blocks:
        b.register_forward_pre_hook(check)
    with torch.inference_mode():
        plan = dit.prepare(caps, 6, 8)
        got = [dit.denoise(x, torch.full((2,), t), plan) for t in (0.1, 0.5, 0.9)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    trace = streamer.stats.trace
    # prepare runs the caption refiner (block 0), then each step the noise refiner and the two layers (1, 2, 3)
    assert seen == [0] + [1, 2, 3] * 3
    entries = [(w, i) for w, i in trace if w in ("load", "hit")]
    assert [i for _, i in entries] == seen
    assert entries[-3:] == [("hit", 1), ("hit", 2), ("hit", 3)]  # the learned order: every block prefetched
    prefetched = [i for w, i in trace if w == "prefetch"]
    assert prefetched[-3:] == [2, 3, 1]  # the last step prefetched the next block, and the next step's first
    assert all(trace.index(("release", i)) for i in range(4))
    flush_streamers(dit)
    assert streamer.staged_count == 0 and streamer.at_home()
    assert all(p.data.data_ptr() == homes[id(p)] for b in blocks for p in b.parameters())
    streamer.remove()
    assert streamers_of(dit) == []
    assert all(len(b._forward_pre_hooks) == 1 and not b._forward_hooks for b in blocks)  # only the test's own hook
    assert all(not b.adaLN_modulation._forward_pre_hooks for b in blocks if b.modulated)


def test_streamed_model_takes_lora_merges_and_refuses_training(model):
    from tests.factories.comfy import peft_lora
    from zimage_core.lora import (
        LoRA,  # noqa: F401 - the real engine module
        apply_loras,
        load_lora,
    )
    from zimage_core.weights import save_safetensors

    plain = load_dit(model.transformer, dtype="fp32")
    streamed = load_dit(model.transformer, dtype="fp32")
    streamer = stream_dit(streamed, 2, "cpu", "cpu")
    path = model.root.parent / "mem_lora.safetensors"
    save_safetensors(peft_lora(plain, ["layers.0.attention.to_q", "layers.1.feed_forward.w1"], seed=3), path)
    lora = load_lora(path)
    apply_loras(plain, [(lora, 0.8)])
    handle = apply_loras(streamed, [(lora, 0.8)])  # merges into the home copies of the streamed blocks
    x, caps = _inputs(plain)
    with torch.inference_mode():
        assert torch.equal(streamed(x, torch.tensor([0.3]), caps), plain(x, torch.tensor([0.3]), caps))
    handle.remove()
    assert streamer.at_home()
    for p in streamed.layers[0].parameters():
        p.requires_grad_(True)
    trainer = BlockStreamer([streamed.layers[0]], "cpu", "cpu")
    with pytest.raises(ZImageError, match="inference"):
        streamed(x, torch.tensor([0.3]), caps)
    trainer.remove()
    streamer.remove()


def test_resident_parts_cover_everything_else(model):
    dit = load_dit(model.transformer, dtype="fp32")
    streamed = dit_stream_blocks(dit, 2)
    modules, loose = resident_parts(dit, streamed)
    covered = {id(p) for m in modules for p in m.parameters()} | {id(t) for _, _, t in loose}
    streamed_ids = {id(p) for b in streamed for p in b.parameters()}
    assert covered.isdisjoint(streamed_ids)
    assert covered | streamed_ids == {id(p) for p in dit.parameters()}
    assert any(k == "x_pad_token" for _, k, _ in loose)


# ---------------------------------------------------------------------------------------------- pipeline
OPTS = dict(
    prompt=["a red fox in snow", "a lighthouse at dusk, long exposure, waves"],
    negative="blurry",
    width=64,
    height=48,
    steps=2,
    cfg=2.5,
    seed=4,
)  # captions of different lengths + CFG: the masked path


@pytest.fixture(scope="module", autouse=True)
def parse_tokenizer_once():
    """Parsing the tokenizer JSON is most of a tiny pipeline's load time; every load still goes through it."""
    import functools

    import zimage_core.text_encoder as tem

    mp = pytest.MonkeyPatch()
    mp.setattr(tem, "load_tokenizer", functools.lru_cache(maxsize=4)(tem.load_tokenizer))
    yield
    mp.undo()


def generate(pipe, **changes):
    """Images (as arrays) and the final latents of one generation."""
    last = {}
    images = pipe.generate(
        GenerateOptions(**{**OPTS, **changes}), progress=False, callback=lambda i, n, x, d: last.update(x=x.clone())
    )
    return [np.asarray(im) for im in images], last["x"]


@pytest.fixture(scope="module")
def reference(model):
    return generate(ZImagePipeline.load(model.root, device="cpu", memory="full", attention="sdpa"))


@pytest.mark.parametrize("mode", [m for m in MODES if m != "full"])
def test_every_mode_equals_full_bit_for_bit(model, reference, mode):
    pipe = ZImagePipeline.load(model.root, device="cpu", memory=mode)
    pixels, latents = generate(pipe)
    assert torch.equal(latents, reference[1])
    assert all(np.array_equal(a, b) for a, b in zip(pixels, reference[0]))
    if mode.startswith("block-swap") or mode == "sequential":
        streamer = streamers_of(pipe.dit)[0] if streamers_of(pipe.dit) else None
        if mode == "sequential":  # the DiT left the device before decoding: its streamer is gone, blocks at home
            assert streamer is None and "dit" not in pipe.residency.streamers
            pipe.residency.place("dit", pipe.dit)
            streamer = pipe.residency.streamers["dit"]
        assert streamer is not None and len(streamer.blocks) == {"block-swap:1": 1, "block-swap:3": 3}.get(mode, 4)
        assert streamer.staged_count == 0 and streamer.at_home()  # nothing staged outlives the generation
        if mode != "sequential":
            assert streamer.stats.hits > 0  # prefetched copies were used
    else:
        assert "dit" not in pipe.residency.streamers


def test_quantized_and_gguf_dits_stream_like_any_other(model, tmp_path):
    """Quantized weights live in buffers; GGUF files are sized only once loaded: both stream bit-exactly."""
    pytest.importorskip("gguf")
    from zimage_core.quant.gguf_write import save_gguf

    gguf = save_gguf(load_dit(model.transformer, dtype="fp32").state_dict(), tmp_path / "dit.gguf", "Q8_0")
    for kw in ({"transformer": gguf}, {"quant": "int8"}):
        want = generate(ZImagePipeline.load(model.root, device="cpu", memory="full", **kw), steps=1)[1]
        for mode in ("block-swap:2", "auto"):  # auto sizes the file from its header first (GGUF: packed sizes)
            pipe = ZImagePipeline.load(model.root, device="cpu", memory=mode, lazy=True, **kw)
            assert torch.equal(generate(pipe, steps=1)[1], want), (kw, mode)


def test_lazy_pipeline_loads_each_component_just_before_its_stage(model, reference, monkeypatch):
    pipe = ZImagePipeline.load(model.root, device="cpu", memory="auto", lazy=True)
    assert pipe.loaded() == []
    at_load = {}
    for name in ("_load_dit", "_load_text_encoder", "_load_vae"):
        real = getattr(ZImagePipeline, name)
        monkeypatch.setattr(
            ZImagePipeline,
            name,
            lambda self, real=real, name=name: at_load.setdefault(name, self.loaded()) and None or real(self),
        )
    pixels, latents = generate(pipe)
    assert torch.equal(latents, reference[1]) and all(np.array_equal(a, b) for a, b in zip(pixels, reference[0]))
    assert at_load == {"_load_text_encoder": [], "_load_dit": [], "_load_vae": []}  # the previous one was freed
    assert pipe.loaded() == []
    assert torch.equal(generate(pipe)[1], reference[1])  # reloads from the files


def test_unchanged_prompts_reuse_embeddings_without_moving_the_text_encoder(model, monkeypatch):
    pipe = ZImagePipeline.load(model.root, device="cpu", memory="text-encoder-offload")
    runs, placed = [], []
    real_run = pipe.text_encoder._run
    monkeypatch.setattr(pipe.text_encoder, "_run", lambda batch: runs.append(len(batch)) or real_run(batch))
    real_place = Residency.place
    monkeypatch.setattr(
        Residency,
        "place",
        lambda self, name, c, extras=(): (
            (name == "text_encoder" and placed.append(1)) or real_place(self, name, c, extras)
        ),
    )
    opts = GenerateOptions(prompt="a cat", width=32, height=32, steps=1)
    a = np.asarray(pipe.generate(opts, progress=False)[0])
    b = np.asarray(pipe.generate(opts, progress=False)[0])
    assert np.array_equal(a, b) and runs == [1] and placed == [1]
    pipe.release("text_encoder", "dit")
    assert pipe.loaded() == ["vae"]
    assert np.array_equal(np.asarray(pipe.generate(opts, progress=False)[0]), a)  # reloaded on use


def test_sampler_sigmas_are_read_on_the_host():
    sig = flow_sigmas(5, 3.0).to(torch.float32).contiguous()
    look = SigmaLookup(sig)
    pairs = []

    def fn(x, sigma):
        pairs.append((look(sigma), float(sigma[0])))
        return torch.zeros_like(x)

    for name in SAMPLERS:
        get_sampler(name)(fn, torch.zeros(2, 4, 2, 2), sig)
    assert pairs and all(a == b for a, b in pairs) and look.misses == 0
    assert look(torch.tensor([0.25])) == 0.25 and look.misses == 1  # any other tensor: read it


def test_cfg_truncation_uses_host_sigmas(model, monkeypatch):
    import zimage_core.denoiser as denoiser_mod

    made = []

    class Spy(SigmaLookup):
        def __init__(self, sigmas):
            super().__init__(sigmas)
            made.append(self)

    monkeypatch.setattr(denoiser_mod, "SigmaLookup", Spy)
    pipe = ZImagePipeline.load(model.root, device="cpu", memory="full")
    opts = GenerateOptions(
        prompt="a fox",
        negative="blurry",
        width=32,
        height=32,
        steps=4,
        cfg=3.0,
        cfg_truncation=0.2,
        seed=2,
        sampler="heun",
    )
    cond, uncond = pipe.encode_prompts(["a fox"]), pipe.encode_prompts(["blurry"])
    trunc = pipe.sample(cond, uncond, initial_noise(latent_shape(1, 32, 32), 2), opts)
    assert made and made[0].misses == 0  # every sigma was read from the host copy of the schedule
    opts.cfg_truncation = 1.0
    full = pipe.sample(cond, uncond, initial_noise(latent_shape(1, 32, 32), 2), opts)
    assert not torch.equal(trunc, full)  # guidance really switched off for the late steps


# ---------------------------------------------------------------------------------------------- compile
def test_compile_wiring_with_a_stand_in(model):
    from zimage_core.compile import compile_blocks, uncompile_blocks
    from zimage_core.layers import TransformerBlock

    dit = load_dit(model.transformer, dtype="fp32")
    x, caps = _inputs(dit)
    with torch.inference_mode():
        want = dit(x, torch.tensor([0.4]), caps)
    calls, compiled = [], []

    def fake_compile(fn, **kw):
        compiled.append(kw)

        def run(*a, **k):
            calls.append(type(a[0]).__name__)
            return fn(*a, **k)

        return run

    assert compile_blocks(dit, compiler=fake_compile) == 4
    assert len(compiled) == 1 and compiled[0]["dynamic"] is True  # one compiled function for every block
    stream_dit(dit, 2, "cpu", "cpu")  # hooks stay eager around the compiled forward
    with torch.inference_mode():
        got = dit(x, torch.tensor([0.4]), caps)
    assert torch.equal(got, want) and calls == ["TransformerBlock"] * 4
    assert compile_blocks(dit, compiler=fake_compile) == 4 and len(compiled) == 2  # already compiled: untouched
    assert uncompile_blocks(dit) == 4 and all(
        "forward" not in b.__dict__ for b in dit.modules() if isinstance(b, TransformerBlock)
    )


def test_compile_traces_the_block_with_dynamo(model):
    """Real torch.compile (dynamo, eager backend: no C++ toolchain needed), two resolutions, one graph set."""
    from zimage_core.compile import compile_blocks

    torch._dynamo.reset()
    dit = load_dit(model.transformer, dtype="fp32")
    x, caps = _inputs(dit)
    x2 = torch.randn(1, 16, 8, 4)
    # eager through F.linear, the kernels the traced graph calls (eager CPU inference otherwise uses oneDNN)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        want = [dit(x, torch.tensor([0.4]), caps), dit(x2, torch.tensor([0.4]), caps)]
    with torch.inference_mode():
        compile_blocks(dit, backend="eager")
        got = [dit(x, torch.tensor([0.4]), caps), dit(x2, torch.tensor([0.4]), caps)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(got, want))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- CLI
def _cli(model, out, *extra):
    return main(
        [
            "generate",
            "--model",
            str(model.root),
            "--prompt",
            "a red cat",
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "9",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_cli_modes_give_the_same_png(model, tmp_path):
    assert _cli(model, tmp_path / "full.png", "--memory", "full") == 0
    want = np.asarray(Image.open(tmp_path / "full.png"))
    for mode in ("block-swap:2", "sequential"):
        assert _cli(model, tmp_path / "m.png", "--memory", mode, "--attention", "auto") == 0
        assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), want), mode


def test_cli_inpainting_in_a_streaming_mode(model, tmp_path):
    """img2img + mask: the VAE encodes first (loaded, used, freed), then the usual stages."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[:, 24:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    extra = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--denoise", "0.7"]
    assert _cli(model, tmp_path / "a.png", "--memory", "full", *extra) == 0
    assert _cli(model, tmp_path / "b.png", "--memory", "sequential", *extra) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--memory", "block-swap:x"], "not a whole number of blocks"),
        (["--memory", "lowvram"], "unknown memory mode"),
        (["--attention", "flash_attn"], "cannot run here"),
        (["--attention", "magic"], "invalid choice"),
    ],
)
def test_cli_memory_and_speed_flags_fail_in_one_line(model, tmp_path, capsys, args, expect):
    try:
        rc = _cli(model, tmp_path / "o.png", *args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1 and "Traceback" not in err
