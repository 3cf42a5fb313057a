"""The pack inside a real ComfyUI server (CPU): node list, every workflow, caching, errors, Cancel, Unload.

Runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout. ComfyUI needs torchvision, which does not import
beside the CPU torch 2.13.0 the suite runs on, so the server may run in its own venv (``COMFYUI_PYTHON``, default
this interpreter) while pytest stays here; the pack is then imported inside that venv. Tested with ComfyUI 0.14.1 (commit 83dd65f2)::

    python -m venv /work/venv-comfy
    /work/venv-comfy/bin/pip install torch==2.14.1 torchvision==0.29.1
    grep -vxE 'torch|torchvision|torchaudio' /work/comfyui/requirements.txt > /tmp/comfy-req.txt
    /work/venv-comfy/bin/pip install -r /tmp/comfy-req.txt -r requirements.txt "torch==2.14.1"
    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/venv-comfy/bin/python python -m pytest tests/comfyui

The server is started on 127.0.0.1 at a free port with ``--cpu``, the pack linked into a temporary custom_nodes folder
(``--disable-all-custom-nodes --whitelist-custom-nodes``), and tiny models in temporary model folders given by
``--extra-model-paths-config``. The tokenizer is ComfyUI's bundled one, as for real users. Core's VAELoader only
reads a full-size Flux VAE, so ``ae.safetensors`` here has the real architecture with random weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COMFYUI = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable  # the interpreter that runs the server
ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
W, H = 64, 48

pytestmark = pytest.mark.skipif(
    not COMFYUI or not (Path(COMFYUI) / "main.py").is_file(),
    reason="set COMFYUI_PATH to a ComfyUI checkout (with its requirements installed) to run the real-server tests",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, proc: subprocess.Popen, log: Path):
        self.base, self.proc, self.log = base, proc, log

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
                return r.status, (json.loads(data) if data else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> str:
        code, body = self.post("/prompt", {"prompt": prompt, "client_id": "zimage-tests"})
        assert code == 200, body
        return body["prompt_id"]

    def wait(self, pid: str, timeout: float = 120) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                if h[pid]["status"].get("status_str") in ("success", "error") or h[pid]["status"]["completed"]:
                    return h[pid]
                if any(m[0] == "execution_interrupted" for m in h[pid]["status"].get("messages", [])):
                    return h[pid]
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log.read_text()[-4000:])
            time.sleep(0.1)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s")

    def run(self, prompt: dict) -> dict:
        return self.wait(self.queue(prompt))


def messages(h: dict, kind: str) -> list[dict]:
    return [m[1] for m in h["status"]["messages"] if m[0] == kind]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.factories import comfy as C
    from tests.factories.pipeline import build_tiny_model
    from tests.factories.vae import make_diffusers_vae, save_bfl_vae
    from zimage_core.checkpoints import load_dit
    from zimage_core.config import VAEConfig
    from zimage_core.weights import save_safetensors

    tmp = tmp_path_factory.mktemp("comfyui")
    tiny = build_tiny_model(tmp, seed=51)
    models = C.install_edit_models(tiny, C.install_models(tiny, tmp / "models"), seed=52)
    import shutil

    shutil.rmtree(models / "text_encoders" / "tokenizer")  # use ComfyUI's bundled qwen25_tokenizer
    save_bfl_vae(make_diffusers_vae(VAEConfig(), seed=3), models / "vae" / "ae.safetensors")
    dit = load_dit(tiny.transformer, dtype="fp32")
    save_safetensors(C.peft_lora(dit, ["layers.0.attention.to_q"], seed=1), models / "loras" / "style_lora.safetensors")
    save_safetensors(
        C.peft_lora(dit, ["layers.1.feed_forward.w1"], seed=2), models / "loras" / "detail_lora.safetensors"
    )
    nodes_dir = tmp / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / "zimage").symlink_to(ROOT, target_is_directory=True)
    for sub in ("input", "user", "output", "temp"):
        (tmp / sub).mkdir()
    rgba = np.full((H, W, 4), 255, dtype=np.uint8)
    rgba[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    rgba[8:40, 24:56, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp / "input" / "example.png")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(
        "zimage_test:\n"
        + f"    base_path: {tmp}\n"
        + "".join(
            f"    {k}: models/{k}\n" for k in ("diffusion_models", "text_encoders", "vae", "loras", "clip_vision")
        )
        + "    custom_nodes: custom_nodes\n"
    )
    port = free_port()
    log = tmp / "comfyui.log"
    cmd = [
        COMFYUI_PYTHON,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--extra-model-paths-config",
        str(yaml),
        "--disable-all-custom-nodes",
        "--whitelist-custom-nodes",
        "zimage",
        "--output-directory",
        str(tmp / "output"),
        "--input-directory",
        str(tmp / "input"),
        "--temp-directory",
        str(tmp / "temp"),
        "--user-directory",
        str(tmp / "user"),
        "--preview-method",
        "auto",
        "--database-url",
        f"sqlite:///{tmp / 'comfyui.db'}",  # in-memory gives each connection an empty database
        "--disable-auto-launch",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=COMFYUI, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        end = time.time() + 180
        while True:
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > end:
                    raise RuntimeError("ComfyUI did not start:\n" + log.read_text()[-4000:]) from None
                time.sleep(0.3)
        srv.object_info = srv.get("/object_info")
        srv.tmp, srv.models = tmp, models
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------------
# UI -> API with /object_info, as the front end does
# ---------------------------------------------------------------------------------------------
def input_types(info: dict, node_type: str) -> dict:
    """A node's ``INPUT_TYPES()`` as the server reports it in ``/object_info``, in its declared order."""
    spec = info[node_type]
    order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
    return {
        section: {name: spec["input"][section][name] for name in names}
        for section, names in order.items()
        if section in ("required", "optional")
    }


def to_api(workflow: dict, info: dict) -> dict:
    from tests.factories.comfy import specs_to_api

    return specs_to_api(workflow, lambda node_type: input_types(info, node_type))


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


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


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
