"""The pack inside a real ComfyUI server (CPU): node list, every workflow, caching, errors, Cancel, Unload.

Runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout; how the server is set up and started (one per test
session, shared with test_core_model.py) is in tests/comfyui/harness.py::

    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/venv-comfy/bin/python python -m pytest tests/comfyui
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.comfyui.harness import COMFYUI, ROOT, H, W, messages, node_of, requires_comfyui, to_api

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

pytestmark = requires_comfyui


def api(server, name: str, **sampler) -> dict:
    prompt = to_api(json.loads((ROOT / "workflows" / name).read_text()), server.object_info)
    for node in prompt.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=W, height=H)
        if node["class_type"] == "ZImageTurboSampler":
            node["inputs"]["steps"] = min(node["inputs"]["steps"], 8)  # Base's 30 steps prove nothing more here
            node["inputs"].update(sampler)
        if node["class_type"] == "ZImagePromptEnhancer":
            node["inputs"]["max_new_tokens"] = 16  # the tiny random LLM writes noise; a few tokens prove the wiring
    return prompt


# ---------------------------------------------------------------------------------------------
def test_object_info_lists_every_node(server):
    from zimage_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        info = server.object_info[node_id]
        assert info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert info["category"].startswith("Z-Image/") and info["description"]
        for section in ("required", "optional"):
            assert list(info["input"].get(section, {})) == list(cls.INPUT_TYPES().get(section, {}))
    names = server.object_info["ZImageModelLoader"]["input"]["required"]["model_name"][0]
    assert "z_image_turbo_bf16.safetensors" in names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_in_comfyui(server, path):
    h = server.run(api(server, path.name))
    assert h["status"]["status_str"] == "success", [
        (e["node_type"], e["exception_message"], e["traceback"][-3:]) for e in messages(h, "execution_error")
    ]
    images = [img for out in h["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1
    png = server.get(f"/view?filename={images[0]['filename']}&subfolder={images[0]['subfolder']}&type=output")
    path = server.tmp / "check.png"
    path.write_bytes(png)
    assert Image.open(path).size == (W, H)


def test_turbo_workflow_image_equals_the_cli(server):
    """The issue's promise: same files, prompt, size and seed give the same picture in ComfyUI and in the CLI."""
    from zimage_core.cli import main as cli_main

    prompt = api(server, "zimage_turbo_t2i.json", seed=777)
    h = server.run(prompt)
    assert h["status"]["status_str"] == "success"
    img = next(i for out in h["outputs"].values() for i in out.get("images", []))
    png = server.tmp / "comfy_turbo.png"
    png.write_bytes(server.get(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type=output"))
    text = prompt[node_of(prompt, "ZImageTextEncode")]["inputs"]["text"]
    m = server.models
    out = server.tmp / "cli_turbo.png"
    rc = cli_main(
        [
            "generate",
            "--transformer",
            str(m / "diffusion_models" / "z_image_turbo_bf16.safetensors"),
            "--text-encoder",
            str(m / "text_encoders" / "qwen_3_4b.safetensors"),
            "--vae",
            str(m / "vae" / "ae.safetensors"),
            "--tokenizer",
            str(Path(COMFYUI) / "comfy" / "text_encoders" / "qwen25_tokenizer"),
            "--prompt",
            text,
            "--width",
            str(W),
            "--height",
            str(H),
            "--steps",
            "8",
            "--seed",
            "777",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    comfy = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    cli = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert cli.std() > 2  # a real picture, not a flat one that any two runs would share
    assert np.abs(comfy - cli).max() <= 1  # core SaveImage truncates where the CLI rounds


def test_cached_rerun_new_seed_and_unload(server):
    prompt = api(server, "zimage_turbo_t2i.json", seed=1234)
    first = server.run(prompt)
    again = server.run(prompt)
    cached = messages(again, "execution_cached")[0]["nodes"]
    assert set(cached) == set(prompt)  # nothing ran the second time
    prompt[node_of(prompt, "ZImageTurboSampler")]["inputs"]["seed"] = 1235
    third = server.run(prompt)
    ran = set(prompt) - set(messages(third, "execution_cached")[0]["nodes"])
    assert node_of(prompt, "ZImageTurboSampler") in ran and node_of(prompt, "ZImageModelLoader") not in ran
    assert first["outputs"] != third["outputs"]
    # "Unload models": ComfyUI moves our registered models out; the next run loads them back.
    assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    prompt[node_of(prompt, "ZImageTurboSampler")]["inputs"]["seed"] = 1236
    assert server.run(prompt)["status"]["status_str"] == "success"
    log = server.log.read_text()
    assert "loaded completely" in log  # our models went through ComfyUI's load_models_gpu
    for trouble in ("could not register", "ComfyUI could not load", "previews unavailable"):
        assert trouble not in log


def test_core_conditioning_nodes_work_on_ours(server):
    prompt = api(server, "zimage_base_cfg.json", seed=5, steps=3)
    sid = node_of(prompt, "ZImageTurboSampler")
    pos = prompt[sid]["inputs"]["positive"]
    prompt["900"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": pos}}
    prompt["901"] = {
        "class_type": "ConditioningConcat",
        "inputs": {"conditioning_to": pos, "conditioning_from": prompt[sid]["inputs"]["negative"]},
    }
    prompt[sid]["inputs"].update(negative=["900", 0], positive=["901", 0])
    h = server.run(prompt)
    assert h["status"]["status_str"] == "success", [e["exception_message"] for e in messages(h, "execution_error")]


def test_bad_input_gives_a_readable_error(server):
    prompt = api(server, "zimage_turbo_t2i.json")
    prompt[node_of(prompt, "ZImageModelLoader")]["inputs"]["model_name"] = "missing.safetensors"
    code, body = server.post("/prompt", {"prompt": prompt})
    assert code == 400
    errors = body["node_errors"][node_of(prompt, "ZImageModelLoader")]["errors"]
    assert errors[0]["type"] == "value_not_in_list"
    prompt = api(server, "zimage_turbo_t2i.json", cfg=4.0, seed=99)  # guidance on, no negative connected
    h = server.run(prompt)
    err = messages(h, "execution_error")[0]
    assert err["node_type"] == "ZImageTurboSampler" and "nothing is connected to negative" in err["exception_message"]


def test_cancel_stops_sampling(server):
    prompt = api(server, "zimage_turbo_t2i.json", steps=200, seed=7, sampler_name="heun")
    for node in prompt.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=256, height=256)
    pid = server.queue(prompt)
    end = time.time() + 60
    while not server.get("/queue")["queue_running"] and time.time() < end:
        time.sleep(0.05)
    time.sleep(1.5)  # inside the sampling loop by now
    t0 = time.time()
    assert server.post("/interrupt")[0] == 200
    h = server.wait(pid)
    assert messages(h, "execution_interrupted"), h["status"]
    assert time.time() - t0 < 10 and not h["outputs"]
