"""Rewards: images and prompts in, one score per image out, under one interface.

    reward(images, prompts, keys=None) -> Tensor[B] (float32)

``images`` are float ``[B, 3, H, W]`` in 0..1 (RGB), ``prompts`` the ``B`` prompts they were drawn for, ``keys``
optional ids of the images (the judge reward looks its scores up by them). A reward whose model allows it
keeps the autograd graph (``differentiable = True``: image statistics, the alignment and aesthetic models), so
a ReFL-style objective can back-propagate through it; the others return detached scores.

In a configuration (``[rl] rewards``) each entry is one table:

    { name = "ocr", weight = 1.0 }                                   # built in (see BUILT_IN)
    { name = "alignment", weight = 0.5, model = "models/siglip2" }   # options after name/weight
    { function = "my_pkg.rewards:score", weight = 1.0 }              # a plug-in: function(images, prompts) -> B scores
    { name = "judge", path = "judge.jsonl", label = "vlm" }          # label: the name in metrics (default: name)

Built in: ``ocr`` (text rendering, :mod:`train.rl.ocr`), ``alignment`` (prompt-image similarity with a CLIP or
SigLIP folder), ``aesthetic`` (a linear-stack predictor file on CLIP image embeddings, e.g. the LAION one),
``judge`` (scores written by an external judge, JSONL), and the image statistics ``brightness``, ``contrast``,
``saturation``, ``redness`` (for tests and the CPU demo). Model files are always the user's: a missing one is
one error that says what to put where. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from zimage_core.errors import ZImageError

log = logging.getLogger(__name__)


class RewardError(ZImageError):
    """A reward is misconfigured, its model files are missing, or it returned something unusable."""


def check_images(images: torch.Tensor, prompts: list[str], who: str) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise RewardError(f"{who}: images must be a float tensor [B, 3, H, W] in 0..1, got {shape}.")
    if len(prompts) != images.shape[0]:
        raise RewardError(f"{who}: {images.shape[0]} images but {len(prompts)} prompts; give one prompt per image.")


class Reward:
    """Base class: ``__call__(images, prompts, keys=None) -> [B]`` float32 scores."""

    name = ""
    differentiable = False
    options: tuple[str, ...] = ()  # configuration keys the reward takes besides name/weight/label

    def score(self, images: torch.Tensor, prompts: list[str], keys: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str], keys: list[str] | None = None) -> torch.Tensor:
        check_images(images, prompts, f"reward '{self.name}'")
        out = self.score(images, list(prompts), keys)
        return as_scores(out, images.shape[0], f"reward '{self.name}'", keep_graph=self.differentiable)


def as_scores(out, n: int, who: str, keep_graph: bool = False) -> torch.Tensor:
    """``out`` as a float32 ``[n]`` tensor; anything else is a clear error."""
    try:
        t = out if torch.is_tensor(out) else torch.as_tensor(out, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - whatever a plug-in returned
        raise RewardError(f"{who} returned {type(out).__name__}, not {n} numbers: {e}") from e
    t = t.float().reshape(-1) if t.numel() == n else t
    if t.shape != (n,):
        raise RewardError(f"{who} returned shape {tuple(t.shape)}; it must return one score per image ({n}).")
    if not keep_graph:
        t = t.detach()
    if not bool(torch.isfinite(t.detach()).all()):
        raise RewardError(f"{who} returned a non-finite score ({t.detach().tolist()}).")
    return t


# ---------------------------------------------------------------------------------------------
# Image statistics (differentiable; for tests and the synthetic CPU demo)
# ---------------------------------------------------------------------------------------------
_LUMA = (0.299, 0.587, 0.114)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean luminance (Rec. 601), 0..1."""
    w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * w).sum(1).mean(dim=(1, 2))


def contrast(images: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the luminance."""
    w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * w).sum(1).flatten(1).std(dim=1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean of (max - min) over the channels per pixel, 0..1."""
    return (images.amax(1) - images.amin(1)).mean(dim=(1, 2))


def redness(images: torch.Tensor) -> torch.Tensor:
    """Mean of R - (G + B) / 2, -1..1."""
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean(dim=(1, 2))


STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "redness": redness,
}


class StatisticReward(Reward):
    differentiable = True

    def __init__(self, name: str):
        self.name, self.fn = name, STATISTICS[name]

    def score(self, images, prompts, keys):
        return self.fn(images.float())


# ---------------------------------------------------------------------------------------------
# Plug-ins: module:function
# ---------------------------------------------------------------------------------------------
def load_function(spec: str, where: str) -> Callable:
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise RewardError(f"{where}: function '{spec}' must look like 'package.module:function'.")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way
        raise RewardError(
            f"{where}: cannot import module '{module}' for reward function '{spec}' ({type(e).__name__}: {e}); "
            "it must be importable from the working directory or the Python path."
        ) from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise RewardError(f"{where}: module '{module}' has no callable '{attr}'.")
    return fn


class FunctionReward(Reward):
    """A user's ``function(images, prompts) -> B scores`` (a tensor, list or array)."""

    differentiable = True  # whatever graph the function keeps is passed on

    def __init__(self, spec: str, where: str):
        self.name, self.fn = spec, load_function(spec, where)

    def score(self, images, prompts, keys):
        try:
            return self.fn(images, prompts)
        except Exception as e:  # noqa: BLE001 - name the plug-in that failed; the traceback stays attached
            raise RewardError(f"reward function '{self.name}' failed: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# External judge: scores read from JSONL
# ---------------------------------------------------------------------------------------------
class JudgeReward(Reward):
    """Scores an external judge (a VLM run elsewhere) wrote, one JSON object per line: ``{"id": ..., "score": x}``.

    ``key`` names the id field (default ``id``), ``field`` the score field (default ``score``; a dotted path
    such as ``scores.text`` reads nested objects). Images are looked up by the ``keys`` the trainer passes (the
    candidate ids of :mod:`train.rl.rollout`: ``<prompt index>-<seed>``).
    """

    name = "judge"
    options = ("path", "key", "field")

    def __init__(self, path: str = "", key: str = "id", field: str = "score"):
        if not path:
            raise RewardError(
                'reward \'judge\' needs path = the JSONL file the judge wrote (one {"id": ..., "score": ...} per '
                "line; ids are the candidate ids in <output_dir>/candidates/candidates.jsonl)."
            )
        p = Path(path)
        if not p.is_file():
            raise RewardError(
                f"reward 'judge': the scores file '{p}' does not exist. Run the judge on the images listed in "
                '<output_dir>/candidates/candidates.jsonl and write one {"id": ..., "score": ...} per line there.'
            )
        self.path, self.scores = p, {}
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                value = rec
                for part in field.split("."):
                    value = value[part]
                self.scores[str(rec[key])] = float(value)
            except (ValueError, KeyError, TypeError) as e:
                raise RewardError(
                    f"reward 'judge': line {n} of '{p}' is not a JSON object with '{key}' and a numeric '{field}' ({e})."
                ) from e

    def score(self, images, prompts, keys):
        if keys is None:
            raise RewardError("reward 'judge' scores known images only; it needs their ids (the candidate ids).")
        missing = [k for k in keys if str(k) not in self.scores]
        if missing:
            raise RewardError(
                f"reward 'judge': '{self.path}' has no score for {len(missing)} image(s), e.g. {missing[:3]}; "
                "judge every candidate listed in candidates.jsonl."
            )
        return torch.tensor([self.scores[str(k)] for k in keys], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# CLIP / SigLIP: prompt-image alignment and the aesthetic predictor
# ---------------------------------------------------------------------------------------------
def _require_folder(path: str, reward: str, what: str, key: str = "model") -> Path:
    if not path:
        raise RewardError(f"reward '{reward}' needs {key} = the folder of {what}.")
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise RewardError(
            f"reward '{reward}': '{p}' is not a model folder. Put {what} there (the transformers folder with "
            "config.json, the weights and the tokenizer files) and give its path as "
            f'{key} = "..."; nothing is downloaded.'
        )
    return p


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor in older transformers, an output object with ``pooler_output`` in newer."""
    if torch.is_tensor(out):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        t = getattr(out, name, None)
        if t is not None:
            return t
    raise RewardError(f"the vision-language model returned {type(out).__name__} without embeddings.")


class VisionLanguage:
    """A CLIP or SigLIP model from a local folder, with differentiable image preprocessing in torch."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.folder = folder
        try:
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise RewardError(
                f"cannot load a CLIP/SigLIP model and tokenizer from '{folder}' ({type(e).__name__}: {e})."
            ) from e
        self.model.to(device)
        pre = {}
        if (folder / "preprocessor_config.json").is_file():
            pre = json.loads((folder / "preprocessor_config.json").read_text())
        vis = getattr(self.model.config, "vision_config", None)
        size = pre.get("size", getattr(vis, "image_size", 224))
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height") or 224
        self.size = int(size)
        self.mean = torch.tensor(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)
        self.max_length = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean.to(x.device)) / self.std.to(x.device)
        dtype = next(self.model.parameters()).dtype
        return _features(self.model.get_image_features(pixel_values=x.to(self.device, dtype))).float()

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        kw = {"input_ids": tok["input_ids"].to(self.device)}
        if "attention_mask" in tok and "siglip" not in self.model.config.model_type:
            kw["attention_mask"] = tok["attention_mask"].to(self.device)
        return _features(self.model.get_text_features(**kw)).float()


class AlignmentReward(Reward):
    """Cosine similarity of CLIP/SigLIP image and prompt embeddings (times ``scale``, default 1)."""

    name = "alignment"
    differentiable = True
    options = ("model", "scale", "device")

    def __init__(self, model: str = "", scale: float = 1.0, device: str = "cpu"):
        folder = _require_folder(model, "alignment", "a CLIP or SigLIP/SigLIP2 model (e.g. siglip2-so400m-patch14-384)")
        self.vl, self.scale = VisionLanguage(folder, device), float(scale)

    def score(self, images, prompts, keys):
        img = F.normalize(self.vl.image_embeds(images), dim=-1)
        txt = F.normalize(self.vl.text_embeds(prompts), dim=-1).to(img.device)
        return (img * txt).sum(-1).cpu() * self.scale


def load_linear_stack(path: Path) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The linear layers of an MLP file in order (``*.weight`` 2-D, with their ``*.bias``); safetensors or torch."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise RewardError(f"reward 'aesthetic': '{path}' does not hold a state dict of linear layers.")

    def order(key: str):
        return [int(p) if p.isdigit() else p for p in key.split(".")]

    weights = sorted((k for k, v in sd.items() if k.endswith("weight") and v.ndim == 2), key=order)
    layers = [(sd[k].float(), sd.get(k[: -len("weight")] + "bias")) for k in weights]
    if not layers:
        raise RewardError(f"reward 'aesthetic': '{path}' holds no linear layer weights.")
    for (w, _), (nxt, _) in zip(layers, layers[1:]):
        if w.shape[0] != nxt.shape[1]:
            raise RewardError(
                f"reward 'aesthetic': the layers of '{path}' do not chain ({tuple(w.shape)} then {tuple(nxt.shape)})."
            )
    if layers[-1][0].shape[0] != 1:
        raise RewardError(
            f"reward 'aesthetic': the last layer of '{path}' has {layers[-1][0].shape[0]} outputs, not 1."
        )
    return [(w, None if b is None else b.float()) for w, b in layers]


class AestheticReward(Reward):
    """An aesthetic predictor: a stack of linear layers (``activation`` between them: none, as the LAION
    predictor, or relu / gelu) on the L2-normalised image embedding of a CLIP model."""

    name = "aesthetic"
    differentiable = True
    options = ("path", "clip", "activation", "device")

    def __init__(self, path: str = "", clip: str = "", activation: str = "none", device: str = "cpu"):
        if not path or not Path(path).is_file():
            raise RewardError(
                f"reward 'aesthetic' needs path = the predictor file (e.g. the LAION aesthetic predictor "
                f"sac+logos+ava1-l14-linearMSE.pth or .safetensors); {'not found: ' + repr(path) if path else 'none given'}. "
                "Put the file there yourself; nothing is downloaded."
            )
        if activation not in ("none", "relu", "gelu"):
            raise RewardError(f"reward 'aesthetic': activation '{activation}' must be none, relu or gelu.")
        folder = _require_folder(
            clip, "aesthetic", "the CLIP model the predictor was trained on (e.g. ViT-L/14)", "clip"
        )
        self.vl = VisionLanguage(folder, device)
        self.layers = [(w.to(device), None if b is None else b.to(device)) for w, b in load_linear_stack(Path(path))]
        width = self.layers[0][0].shape[1]
        dim = getattr(self.vl.model.config, "projection_dim", None)
        if dim is not None and dim != width:
            raise RewardError(
                f"reward 'aesthetic': the predictor reads embeddings of width {width}, the CLIP model in '{folder}' "
                f"gives {dim}; they do not belong together."
            )
        self.act = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu}[activation]

    def score(self, images, prompts, keys):
        x = F.normalize(self.vl.image_embeds(images), dim=-1)
        for i, (w, b) in enumerate(self.layers):
            x = F.linear(x, w, b)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x[:, 0].cpu()


# ---------------------------------------------------------------------------------------------
# Building rewards from the configuration
# ---------------------------------------------------------------------------------------------
def _ocr(**kw) -> Reward:
    from .ocr import OCRReward

    return OCRReward(**kw)


BUILT_IN: dict[str, tuple[Callable[..., Reward], tuple[str, ...]]] = {
    "ocr": (_ocr, ("threads", "min_confidence")),
    "alignment": (AlignmentReward, AlignmentReward.options),
    "aesthetic": (AestheticReward, AestheticReward.options),
    "judge": (JudgeReward, JudgeReward.options),
    **{name: ((lambda n=name: StatisticReward(n)), ()) for name in STATISTICS},
}


class RewardSet:
    """The configured rewards: ``scores(images, prompts, keys) -> {label: [B]}`` and their weights."""

    def __init__(self, entries: list[tuple[str, Reward, float]]):
        self.entries = entries

    @property
    def labels(self) -> list[str]:
        return [label for label, _, _ in self.entries]

    @property
    def weights(self) -> dict[str, float]:
        return {label: w for label, _, w in self.entries}

    @property
    def differentiable(self) -> bool:
        return all(r.differentiable for _, r, _ in self.entries)

    def scores(self, images: torch.Tensor, prompts: list[str], keys: list[str] | None = None) -> dict:
        return {label: r(images, prompts, keys) for label, r, _ in self.entries}

    def total(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the scores (reward aggregation)."""
        return sum(self.weights[k] * v for k, v in scores.items())


def build_rewards(specs: list[dict], where: str = "[rl] rewards") -> RewardSet:
    """Rewards from the configuration's list of tables (see the module docstring)."""
    if not isinstance(specs, list) or not specs:
        raise RewardError(
            f'{where}: give at least one reward, e.g. rewards = [{{ name = "ocr", weight = 1.0 }}] or '
            f'[{{ function = "my_module:my_reward", weight = 1.0 }}]; built in: {", ".join(BUILT_IN)}.'
        )
    entries, seen = [], set()
    for i, spec in enumerate(specs):
        here = f"{where}[{i}]"
        if not isinstance(spec, dict):
            raise RewardError(f'{here}: each reward is a table like {{ name = "ocr", weight = 1.0 }}, got {spec!r}.')
        spec = dict(spec)
        name, function = spec.pop("name", None), spec.pop("function", None)
        weight, label = spec.pop("weight", 1.0), spec.pop("label", None)
        if (name is None) == (function is None):
            raise RewardError(f'{here}: give exactly one of name = "..." (built in) or function = "module:function".')
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"{here}: weight must be a number, got {weight!r}.")
        if function is not None:
            if spec:
                raise RewardError(
                    f"{here}: a function reward takes only function, weight and label; got {sorted(spec)}."
                )
            reward = FunctionReward(function, here)
        else:
            if name not in BUILT_IN:
                raise RewardError(
                    f"{here}: unknown reward '{name}'; built in: {', '.join(BUILT_IN)} (or use function = \"module:fn\")."
                )
            make, options = BUILT_IN[name]
            unknown = sorted(set(spec) - set(options))
            if unknown:
                raise RewardError(
                    f"{here}: reward '{name}' takes no {unknown}; its options are {list(options) or 'none'}."
                )
            reward = make(**spec)
        label = str(label or name or function)
        if label in seen:
            raise RewardError(f"{here}: two rewards are called '{label}'; give one of them label = \"...\".")
        seen.add(label)
        entries.append((label, reward, float(weight)))
    return RewardSet(entries)
