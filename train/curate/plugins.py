"""User-supplied models: image embedders, model scores (aesthetic, AIGC, NSFW, watermark) and captioners.

Nothing here downloads: every model is a local folder or file the user puts in place, and a missing one is a
single :class:`CurateError` naming the file and where it goes. Score kinds (``[curate.scores.<name>]``):

- ``image_classifier``: a transformers image-classification folder (``config.json``, weights,
  ``preprocessor_config.json``, e.g. an NSFW, watermark or AI-generated detector saved with
  ``save_pretrained``); the score is the probability of ``label`` (a single-output model: its raw value).
- ``clip_mlp``: ``path`` = a CLIP / SigLIP(2) folder and ``head`` = a ``.safetensors``/``.pth`` file of
  linear layers applied to the L2-normalised image embedding (the LAION aesthetic predictor's layout,
  ``layers.0.weight`` ... ``layers.7.bias``); ``activation = "relu"`` puts ReLUs between them.
- ``plugin``: ``entry = "package.module:function"``; ``function(**options)`` (every other key of the table,
  ``path`` checked to exist) returns ``score(images: list[PIL.Image]) -> list[float]``.

The captioner (``[curate.caption]``) is a plugin: ``entry = "module:function"``; ``function(**options)``
returns ``caption(images, ocr_texts) -> list[str]`` (the OCR text comes first, as in OCR-aware captioning).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np

from .config import CurateConfig, CurateError

log = logging.getLogger(__name__)


def load_entry(entry: str, what: str):
    """``"package.module:function"`` -> the function."""
    if not isinstance(entry, str) or ":" not in entry:
        raise CurateError(f"{what}: entry must look like 'package.module:function', got {entry!r}.")
    mod, _, fn = entry.partition(":")
    try:
        m = importlib.import_module(mod)
    except ImportError as e:
        raise CurateError(f"{what}: cannot import '{mod}' ({e}); put the module on PYTHONPATH.") from e
    f = getattr(m, fn, None)
    if not callable(f):
        raise CurateError(f"{what}: '{mod}' has no function '{fn}'.")
    return f


def need_path(path, what: str, expect: str) -> Path:
    """The user-supplied file or folder ``path``, or one error saying what to put where."""
    if not path:
        raise CurateError(f'{what}: no model path given; set path = "..." to {expect}.')
    p = Path(path).expanduser()
    if not p.exists():
        raise CurateError(f"{what}: '{p}' does not exist. Put {expect} at '{p}' (nothing is downloaded).")
    return p


def _need_folder(path, what: str, files: list[str], expect: str) -> Path:
    p = need_path(path, what, expect)
    missing = [f for f in files if not (p / f).is_file()]
    if p.is_dir() and not missing and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        return p
    if p.is_dir() and not missing:
        missing = ["model.safetensors (the weights)"]
    raise CurateError(f"{what}: '{p}' lacks {', '.join(missing) or 'the model files'}; put {expect} there.")


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- embeddings ------------------------------------------------------------------------------------------
class Embedder:
    """A CLIP or SigLIP(2) folder loaded with transformers: L2-normalised image and text embeddings."""

    EXPECT = "a CLIP or SigLIP2 model folder (config.json, model.safetensors, preprocessor_config.json; the tokenizer files for text queries)"

    def __init__(self, path, what: str = "embedding model"):
        from transformers import AutoImageProcessor, AutoModel

        self.path = _need_folder(path, what, ["config.json", "preprocessor_config.json"], self.EXPECT)
        self.what = what
        self.device = _torch_device()
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.images_proc = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        self._tok = None

    @staticmethod
    def _as_tensor(out):
        import torch

        if isinstance(out, torch.Tensor):
            return out
        for name in ("image_embeds", "text_embeds", "pooler_output"):
            v = getattr(out, name, None)
            if v is not None:
                return v
        raise CurateError("the embedding model returned no pooled features; use a CLIP or SigLIP folder.")

    def images(self, images) -> np.ndarray:
        import torch

        inputs = self.images_proc(images=[im.convert("RGB") for im in images], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            feats = self._as_tensor(self.model.get_image_features(**inputs)).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch
        from transformers import AutoTokenizer

        if self._tok is None:
            try:
                self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise CurateError(
                    f"{self.what}: '{self.path}' has no tokenizer ({e}); text queries need the model's tokenizer "
                    "files (tokenizer.json or vocab/merges) in that folder."
                ) from e
        padding = "max_length" if "siglip" in type(self.model).__name__.lower() else True
        tok = self._tok(texts, padding=padding, truncation=True, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            feats = self._as_tensor(self.model.get_text_features(**tok)).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)


# ---- scores -------------------------------------------------------------------------------------------------
class _Classifier:
    EXPECT = "an image-classification model folder saved with save_pretrained (config.json, model.safetensors, preprocessor_config.json)"

    def __init__(self, name: str, spec: dict):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        what = f"[curate.scores.{name}]"
        p = _need_folder(spec.get("path"), what, ["config.json", "preprocessor_config.json"], self.EXPECT)
        self.device = _torch_device()
        self.model = AutoModelForImageClassification.from_pretrained(p, local_files_only=True).to(self.device).eval()
        self.proc = AutoImageProcessor.from_pretrained(p, local_files_only=True)
        labels = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        n = self.model.config.num_labels
        label = spec.get("label")
        if n == 1:
            self.index = None
        elif label is None:
            self.index = n - 1
            log.info("%s: no label given; scoring the probability of '%s'", what, self.model.config.id2label[n - 1])
        elif str(label).lower() in labels:
            self.index = labels[str(label).lower()]
        else:
            raise CurateError(f"{what}: label {label!r} is not one of the model's labels {sorted(labels)}.")

    def __call__(self, images) -> list[float]:
        import torch

        inputs = self.proc(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits.float()
        if self.index is None:
            return logits[:, 0].cpu().tolist()
        return logits.softmax(-1)[:, self.index].cpu().tolist()


class _ClipMLP:
    def __init__(self, name: str, spec: dict):
        import torch

        what = f"[curate.scores.{name}]"
        self.embedder = Embedder(spec.get("path"), f"{what} path")
        head = need_path(spec.get("head"), f"{what} head", "the score head (a .safetensors or .pth of linear layers)")
        if head.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(head))
        else:
            sd = torch.load(head, map_location="cpu", weights_only=True)
        weights = sorted((k for k in sd if k.endswith(".weight") and sd[k].ndim == 2), key=_layer_order)
        if not weights:
            raise CurateError(f"{what}: '{head}' holds no linear layer weights (keys ending in '.weight').")
        self.layers = [(sd[k].float(), sd.get(k[: -len("weight")] + "bias")) for k in weights]
        self.relu = spec.get("activation") == "relu"
        dim = self.layers[0][0].shape[1]
        probe = self.embedder.images([_blank()]).shape[1]
        if probe != dim:
            raise CurateError(f"{what}: the head expects {dim}-d embeddings but the model gives {probe}-d.")

    def __call__(self, images) -> list[float]:
        import torch

        x = torch.from_numpy(self.embedder.images(images))
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + (b.float() if b is not None else 0)
            if self.relu and i < len(self.layers) - 1:
                x = x.relu()
        return x[:, 0].tolist()


def _layer_order(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


def _plugin(what: str, spec: dict):
    opts = {k: v for k, v in spec.items() if k not in ("kind", "entry", "min", "max")}
    if "path" in opts:
        opts["path"] = str(need_path(opts["path"], what, "the model file(s) the plug-in loads"))
    fn = load_entry(spec.get("entry"), what)(**opts)
    if not callable(fn):
        raise CurateError(f"{what}: {spec.get('entry')} must return a callable, got {type(fn).__name__}.")
    return fn


def build_scorers(cfg: CurateConfig) -> dict:
    """name -> ``score(images) -> list[float]`` for every ``[curate.scores.<name>]`` table."""
    out = {}
    for name, spec in sorted(cfg.scores.items()):
        kind = spec["kind"]
        if kind == "image_classifier":
            out[name] = _Classifier(name, spec)
        elif kind == "clip_mlp":
            out[name] = _ClipMLP(name, spec)
        else:
            out[name] = _plugin(f"[curate.scores.{name}]", spec)
    return out


def build_captioner(cfg: CurateConfig):
    """``caption(images, ocr_texts) -> list[str]``, or None when no captioner is configured."""
    if not cfg.caption:
        return None
    spec = dict(cfg.caption)
    if "entry" not in spec:
        raise CurateError(
            '[curate.caption]: give entry = "module:function" (your captioner\'s loader; it receives the other '
            "options, e.g. path = the VLM folder)."
        )
    return _plugin("[curate.caption]", spec)
