"""Running the pack inside a real ComfyUI server for the tests in this folder (one server per test session).

ComfyUI needs torchvision, which does not import beside the CPU torch 2.13.0 the suite runs on, so the server may run
in its own venv (``COMFYUI_PYTHON``, default this interpreter) while pytest stays here; the pack is then imported inside
that venv. Tested with ComfyUI 0.14.1 (commit 83dd65f2) and 0.8.0 (all pass; 0.8.0's Lumina2 does not forward
Omni conditioning, which the bridge then does itself)::

    python -m venv /work/venv-comfy
    /work/venv-comfy/bin/pip install torch==2.14.1 torchvision==0.29.1
    grep -vxE 'torch|torchvision|torchaudio' /work/comfyui/requirements.txt > /tmp/comfy-req.txt
    /work/venv-comfy/bin/pip install -r /tmp/comfy-req.txt -r requirements.txt "torch==2.14.1"
    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/venv-comfy/bin/python python -m pytest tests/comfyui

The server is started on 127.0.0.1 at a free port with ``--cpu``, the pack linked into a temporary custom_nodes folder
(``--disable-all-custom-nodes --whitelist-custom-nodes``) next to a test-only probe node (``ZImageTestLoadedModels``:
what ``comfy.model_management`` has loaded), and tiny models in temporary model folders given by
``--extra-model-paths-config``. The tokenizer is ComfyUI's bundled one, as for real users. Core's VAELoader only reads a
full-size Flux VAE, so ``ae.safetensors`` here has the real architecture with random weights.
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
W, H = 64, 48

requires_comfyui = pytest.mark.skipif(
    not COMFYUI or not (Path(COMFYUI) / "main.py").is_file(),
    reason="set COMFYUI_PATH to a ComfyUI checkout (with its requirements installed) to run the real-server tests",
)

PROBE_NODE = '''
import json

import comfy.model_management as mm


class ZImageTestLoadedModels:
    """Test only: ComfyUI's loaded models as JSON (class, size it counts, bridged Z-Image slot, its memory mode, whether it is ``model``'s)."""

    CATEGORY = "_for_testing"
    FUNCTION = "probe"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"after": ("LATENT",), "model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def probe(self, after=None, model=None):
        mine = getattr(getattr(model, "zimage_bridge", None), "slot", None)
        out = []
        for m in mm.current_loaded_models:
            patcher = m.model
            if patcher is None:
                continue
            bridge = getattr(patcher, "zimage_bridge", None)
            sampling = getattr(patcher.model, "model_sampling", None)
            out.append({
                "class": type(patcher.model).__name__,
                "memory": m.model_memory(),
                "loaded": m.model_loaded_memory(),
                "sampling_bytes": sum(t.nbytes for t in sampling.state_dict().values()) if sampling is not None else 0,
                "slot": id(bridge.slot) if bridge is not None else None,
                "mode": str(bridge.slot.residency.mode) if bridge is not None else None,
                "this": bridge is not None and bridge.slot is mine,
            })
        return {"ui": {"text": [json.dumps(out)]}}


NODE_CLASS_MAPPINGS = {"ZImageTestLoadedModels": ZImageTestLoadedModels}
'''


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


def start_server(tmp_path_factory):
    """Start ComfyUI with the pack and tiny models (see the module doc); yields the :class:`Server`."""
    from tests.factories import comfy as C
    from tests.factories.pipeline import build_tiny_model
    from tests.factories.vae import make_diffusers_vae, save_bfl_vae
    from zimage_core.checkpoints import load_dit
    from zimage_core.config import VAEConfig
    from zimage_core.weights import save_safetensors

    tmp = tmp_path_factory.mktemp("comfyui")
    tiny = build_tiny_model(tmp, seed=51)
    models = C.install_edit_models(tiny, C.install_models(tiny, tmp / "models"), seed=52)
    C.install_controlnet(tiny, models, seed=53)
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
    probe = nodes_dir / "zimage_test_probe"  # a test-only node that reports ComfyUI's loaded models
    probe.mkdir()
    (probe / "__init__.py").write_text(PROBE_NODE)
    for sub in ("input", "user", "output", "temp"):
        (tmp / sub).mkdir()
    rgba = np.full((H, W, 4), 255, dtype=np.uint8)
    rgba[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    rgba[8:40, 24:56, 3] = 0
    rgba[12:36, 6:22, :3] = 20  # a dark block: edges for the Canny preprocessor
    Image.fromarray(rgba, "RGBA").save(tmp / "input" / "example.png")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(
        "zimage_test:\n"
        + f"    base_path: {tmp}\n"
        + "".join(
            f"    {k}: models/{k}\n"
            for k in ("diffusion_models", "text_encoders", "vae", "loras", "clip_vision", "model_patches")
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
        "zimage_test_probe",
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


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)
