"""Every shipped workflow, converted to the API form as the ComfyUI front end does, runs against tiny models.

The core nodes they use are the headless doubles of tests/factories/comfy.py. Sizes are shrunk to 64x48 (the
tiny model's files sit under the published names, so everything else is the file as shipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories import comfy as C
from tests.factories.pipeline import build_tiny_model
from zimage_core.cli import main as cli_main
from zimage_core.sampling import prepare_mask

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
FILES = sorted(WORKFLOWS.glob("*.json"))
W, H = 64, 48
REQUIRED = {
    "zimage_turbo_t2i.json",
    "zimage_base_cfg.json",
    "zimage_img2img.json",
    "zimage_inpaint.json",
    "zimage_lora_stack.json",
    "zimage_turbo_lowvram.json",
    "zimage_edit.json",
    "zimage_prompt_enhanced.json",
    "zimage_controlnet.json",
}
# Workflows that need ComfyUI itself (a bridged core MODEL sampled by core KSampler): converted and checked here, run
# in a real ComfyUI by tests/comfyui/test_server.py (every workflow) and tests/comfyui/test_core_model.py.
COMFYUI_ONLY = {"zimage_core_ksampler.json"}
ENHANCER_TOKENS = 12  # the tiny random LLM's rewrite is noise; a few tokens prove the wiring


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wf")
    tiny = build_tiny_model(tmp, seed=41)
    models = C.install_edit_models(tiny, C.install_models(tiny, tmp / "models"), seed=43)
    C.install_controlnet(tiny, models, seed=44)
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIMAGE_MODELS_DIR", str(models))
    mp.setattr(C.LoadImage, "input_dir", tmp / "input")
    mp.setattr(C.SaveImage, "output_dir", tmp / "output")
    (tmp / "input").mkdir()
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    rgba[..., 1] = np.linspace(255, 0, H, dtype=np.uint8)[:, None]
    rgba[..., 2] = 90
    rgba[..., 3] = 255
    rgba[12:36, 6:22, :3] = 240  # a bright block: edges for the Canny preprocessor
    rgba[8:40, 24:56, 3] = 0  # the transparent hole is what inpainting redraws
    Image.fromarray(rgba, "RGBA").save(tmp / "input" / "example.png")
    from zimage_core.checkpoints import load_dit
    from zimage_core.weights import save_safetensors

    dit = load_dit(tiny.transformer, dtype="fp32")
    save_safetensors(
        C.peft_lora(dit, ["layers.0.attention.to_q", "layers.1.feed_forward.w1"], seed=1),
        models / "loras" / "style_lora.safetensors",
    )
    save_safetensors(
        C.peft_lora(dit, ["layers.0.attention.to_v"], seed=2), models / "loras" / "detail_lora.safetensors"
    )
    yield {"tmp": tmp, "models": models, "executor": C.Executor(C.all_nodes())}
    mp.undo()


def api(name: str) -> dict:
    prompt = C.ui_to_api(json.loads((WORKFLOWS / name).read_text()), C.all_nodes())
    for node in prompt.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=W, height=H)
        if node["class_type"] == "ZImagePromptEnhancer":
            node["inputs"]["max_new_tokens"] = ENHANCER_TOKENS
        if node["class_type"] == "ZImageTurboSampler" and name == "zimage_edit.json":
            node["inputs"]["steps"] = min(node["inputs"]["steps"], 8)  # the Omni forward is re-run in full per step
    return prompt


def by_class(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def saved(results: dict, prompt: dict) -> list[np.ndarray]:
    return [img["array"] for nid in by_class(prompt, "SaveImage") for img in results[nid]["ui"]["images"]]


def lora_available() -> bool:
    try:
        import zimage_core.lora  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- files
def test_required_workflows_exist():
    assert REQUIRED <= {f.name for f in FILES}
    assert {f.name for f in FILES} == REQUIRED | COMFYUI_ONLY  # every shipped workflow runs somewhere


def test_core_ksampler_workflow_wires_the_bridge():
    prompt = api("zimage_core_ksampler.json")
    (ks,) = by_class(prompt, "KSampler")
    conv = prompt[ks]["inputs"]["model"][0]
    assert prompt[conv]["class_type"] == "ZImageToCoreModel"
    assert prompt[prompt[conv]["inputs"]["model"][0]]["class_type"] == "ZImageModelLoader"
    s = prompt[ks]["inputs"]
    assert (s["seed"], s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], s["denoise"]) == (
        42,
        8,
        1.0,
        "euler",
        "simple",
        1.0,
    )
    assert {prompt[s[k][0]]["class_type"] for k in ("positive", "negative")} == {"ZImageTextEncode"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_is_loadable_ui_format(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    ids = {n["id"] for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert {"id", "type", "pos", "size", "widgets_values", "mode", "order"} <= set(node)
    for lid, src, slot, dst, dst_slot, typ in wf["links"]:
        assert src in ids and dst in ids
        target = next(n for n in wf["nodes"] if n["id"] == dst)
        assert target["inputs"][dst_slot]["link"] == lid and target["inputs"][dst_slot]["type"] == typ
        origin = next(n for n in wf["nodes"] if n["id"] == src)
        assert lid in origin["outputs"][slot]["links"] and origin["outputs"][slot]["type"] == typ
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(
        s in notes[0]["widgets_values"][0]
        for s in ("qwen_3_4b.safetensors", "ae.safetensors", "models/diffusion_models", "models/vae")
    )
    prompt = C.ui_to_api(wf, C.all_nodes())  # every widget value maps onto an input, none left over
    names = {n["inputs"].get("model_name") for n in prompt.values()} - {None}
    assert names <= {"z_image_turbo_bf16.safetensors", "z_image_bf16.safetensors", C.OMNI_DIT_NAME}


def test_conversion_skips_control_after_generate():
    prompt = api("zimage_turbo_t2i.json")
    s = prompt[by_class(prompt, "ZImageTurboSampler")[0]]["inputs"]
    assert s["seed"] == 42 and s["steps"] == 8 and s["cfg"] == 1.0 and s["shift"] == 3.0
    assert s["sampler_name"] == "euler" and s["denoise"] == 1.0 and s["seed_variance"] == 0.0
    assert "negative" not in s
    wf = json.loads((WORKFLOWS / "zimage_turbo_t2i.json").read_text())
    sampler = next(n for n in wf["nodes"] if n["type"] == "ZImageTurboSampler")
    sampler["widgets_values"].remove("fixed")
    with pytest.raises(ValueError, match="widgets_values has no value|widget values"):
        C.ui_to_api(wf, C.all_nodes())


# ---------------------------------------------------------------------------------------------- running
@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_workflow_runs(setup, name):
    if name == "zimage_lora_stack.json" and not lora_available():
        pytest.skip("zimage_core.lora is not written yet (another issue)")
    prompt = api(name)
    results = setup["executor"].run(prompt)
    images = saved(results, prompt)
    assert len(images) == 1 and images[0].shape == (H, W, 3) and images[0].dtype == np.uint8
    assert images[0].std() > 0


def test_turbo_workflow_image_equals_cli(setup, tmp_path):
    prompt = api("zimage_turbo_t2i.json")
    results = setup["executor"].run(prompt)
    got = saved(results, prompt)[0]
    decoded = results[by_class(prompt, "VAEDecode")[0]][0]
    text = prompt[by_class(prompt, "ZImageTextEncode")[0]]["inputs"]["text"]
    seed = prompt[by_class(prompt, "ZImageTurboSampler")[0]]["inputs"]["seed"]
    m = setup["models"]
    out = tmp_path / "cli.png"
    rc = cli_main(
        [
            "generate",
            "--transformer",
            str(m / "diffusion_models" / "z_image_turbo_bf16.safetensors"),
            "--text-encoder",
            str(m / "text_encoders" / "qwen_3_4b.safetensors"),
            "--vae",
            str(m / "vae" / "ae.safetensors"),
            "--prompt",
            text,
            "--width",
            str(W),
            "--height",
            str(H),
            "--steps",
            "8",
            "--seed",
            str(seed),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    cli = np.asarray(Image.open(out).convert("RGB"))
    # The same pixels before quantisation: the CLI rounds, core SaveImage truncates.
    assert np.array_equal(np.round(decoded[0].numpy() * 255).astype(np.uint8), cli)
    assert np.abs(cli.astype(int) - got.astype(int)).max() <= 1


def test_controlnet_workflow_image_equals_cli(setup, tmp_path):
    """Core Canny -> Z-Image ControlNet Apply -> Z-Image Sampler gives the CLI's --controlnet image for that edge map,
    and the control changes the picture."""
    prompt = api("zimage_controlnet.json")
    results = setup["executor"].run(prompt)
    got = saved(results, prompt)[0]
    edges = results[by_class(prompt, "Canny")[0]][0]
    assert set(np.unique(edges.numpy())) <= {0.0, 1.0} and 0 < edges.mean() < 1
    edge_png = tmp_path / "edges.png"
    Image.fromarray((edges[0].numpy() * 255).astype(np.uint8)).save(edge_png)
    (sid,) = by_class(prompt, "ZImageTurboSampler")
    apply = prompt[by_class(prompt, "ZImageControlNetApply")[0]]["inputs"]
    m = setup["models"]
    out = tmp_path / "cli.png"
    args = [
        "generate",
        *("--transformer", str(m / "diffusion_models" / "z_image_turbo_bf16.safetensors")),
        *("--text-encoder", str(m / "text_encoders" / "qwen_3_4b.safetensors")),
        *("--vae", str(m / "vae" / "ae.safetensors")),
        *("--prompt", prompt[by_class(prompt, "ZImageTextEncode")[0]]["inputs"]["text"]),
        *("--width", str(W), "--height", str(H), "--steps", str(prompt[sid]["inputs"]["steps"])),
        *("--seed", str(prompt[sid]["inputs"]["seed"]), "--device", "cpu", "--out", str(out)),
        *("--controlnet", str(m / "model_patches" / C.CONTROLNET_NAME), "--control-image", str(edge_png)),
        *("--control-strength", str(apply["strength"]), "--control-start", str(apply["start_percent"])),
        *("--control-end", str(apply["end_percent"])),
    ]
    assert cli_main(args) == 0
    cli = np.asarray(Image.open(out).convert("RGB"))
    assert np.abs(cli.astype(int) - got.astype(int)).max() <= 1
    plain = api("zimage_controlnet.json")
    plain[sid]["inputs"]["model"] = apply["model"]  # the same graph without the ControlNet
    assert np.abs(saved(setup["executor"].run(plain), plain)[0].astype(int) - got.astype(int)).max() > 8


def test_low_vram_workflow_is_the_turbo_graph(setup):
    a, b = api("zimage_turbo_t2i.json"), api("zimage_turbo_lowvram.json")
    ra, rb = setup["executor"].run(a), setup["executor"].run(b)
    assert np.array_equal(saved(ra, a)[0], saved(rb, b)[0])
    loader = b[by_class(b, "ZImageModelLoader")[0]]["inputs"]
    # the planner's choice: memory modes never change the image (same picture as the plain Turbo graph)
    assert loader["memory_mode"] == "auto" and loader["swap_blocks"] == 16 and loader["quant"] == "none"


def test_rerun_is_cached_and_a_new_seed_reruns(setup):
    ex = setup["executor"]
    prompt = api("zimage_turbo_t2i.json")
    first = saved(ex.run(prompt), prompt)[0]
    second = saved(ex.run(prompt), prompt)[0]
    assert ex.executed == [] and np.array_equal(first, second)
    sid = by_class(prompt, "ZImageTurboSampler")[0]
    prompt[sid]["inputs"]["seed"] = 43
    third = saved(ex.run(prompt), prompt)[0]
    assert sid in ex.executed and by_class(prompt, "ZImageModelLoader")[0] not in ex.executed
    assert not np.array_equal(first, third)


def test_inpainting_keeps_the_unmasked_area(setup):
    prompt = api("zimage_inpaint.json")
    results = setup["executor"].run(prompt)
    sid = by_class(prompt, "ZImageTurboSampler")[0]
    src = results[prompt[sid]["inputs"]["latent_image"][0]][0]
    out = results[sid][0]
    keep = prepare_mask(src["noise_mask"], *out["samples"].shape[-2:])[0, 0] == 0
    assert keep.any() and not keep.all()
    assert torch.allclose(out["samples"][0][:, keep], src["samples"][0][:, keep], atol=1e-5)
    assert not torch.allclose(out["samples"], src["samples"], atol=1e-3)


def test_bad_input_is_a_readable_error(setup):
    prompt = api("zimage_turbo_t2i.json")
    prompt[by_class(prompt, "ZImageModelLoader")[0]]["inputs"]["model_name"] = "missing.safetensors"
    with pytest.raises(C.PromptError, match="Value not in list: model_name"):
        setup["executor"].run(prompt)
    prompt = api("zimage_turbo_t2i.json")
    prompt[by_class(prompt, "EmptySD3LatentImage")[0]]["inputs"]["width"] = 72  # not a multiple of 16
    from zimage_pack.zimage_core.errors import ZImageError  # raised inside the pack

    with pytest.raises(ZImageError, match="multiples of 16"):
        setup["executor"].run(prompt)


def test_prompt_enhanced_workflow_encodes_the_rewrite(setup):
    prompt = api("zimage_prompt_enhanced.json")
    ex = setup["executor"]
    results = ex.run(prompt)
    eid, tid = by_class(prompt, "ZImagePromptEnhancer")[0], by_class(prompt, "ZImageTextEncode")[0]
    assert prompt[tid]["inputs"]["text"] == [eid, 0]  # the converted widget takes the enhancer's STRING
    text = results[eid][0]
    assert isinstance(text, str) and text and ex.ui[eid]["text"] == [text]
    te = results[prompt[tid]["inputs"]["text_encoder"][0]][0]
    want = te.encoder.encode([text], max_length=prompt[tid]["inputs"]["max_length"])[0]
    assert torch.equal(results[tid][0][0][0][0], want)


def test_edit_workflow_conditions_on_the_reference(setup):
    prompt = api("zimage_edit.json")
    results = setup["executor"].run(prompt)
    cid = by_class(prompt, "ZImageEditConditioning")[0]
    positive, negative, latent = results[cid]
    opts = positive[0][1]
    assert [tuple(r.shape) for r in opts["reference_latents"]] == [(1, 16, H // 8, W // 8)]
    assert len(opts["reference_latents_text_embeds"]) == 2 and len(opts["clip_vision_outputs"]) == 1
    assert negative[0][1]["reference_latents"][0] is opts["reference_latents"][0]
    assert tuple(latent["samples"].shape) == (1, 16, H // 8, W // 8)
    sid = by_class(prompt, "ZImageTurboSampler")[0]
    assert prompt[sid]["inputs"]["negative"] == [cid, 1] and prompt[sid]["inputs"]["cfg"] > 1
