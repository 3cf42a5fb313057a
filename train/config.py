"""The training configuration: dataclasses read from a TOML file, with ``key=value`` overrides.

One file describes a whole run (model, data, objective, optimizer, EMA, checkpoints, samples, export);
the same file runs on a laptop CPU and on a cluster (the launcher decides the processes: ``python -m
train.run`` or ``accelerate launch -m train.run``). Unknown keys are errors that list the valid ones.
Overrides use dotted paths and TOML values: ``optim.lr=3e-5``, ``max_steps=10``,
``data.sources=[{type="folder", path="my_images"}]``; a value that is not valid TOML is taken as a string.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage_core.dtypes import ALIASES, DTYPES
from zimage_core.errors import ZImageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:  # pragma: no cover
        tomllib = None

#: ``model.text_encoder`` / ``model.vae`` value that builds a seeded random tiny encoder (tests, CPU demos).
RANDOM_TINY = "random-tiny"
#: The options of the built-in rewards (train.rl.rewards) that name a model file or folder the user supplies, checked
#: at the start of a run. Not the judge's ``path``: a DPO run draws the candidates its judge then scores.
REWARD_MODEL_FILES = {"alignment": ("model",), "aesthetic": ("path", "clip")}
PRESETS = ("tiny", "mid", "turbo", "base", "omni")
DEFAULT_LORA_TARGETS = [r"attention\.qkv$", r"attention\.out$", r"feed_forward\.w[123]$"]


class ConfigError(ZImageError):
    """A training configuration file or override is invalid."""


def _dtype_name(name: str, key: str) -> str:
    """The project's short dtype name for ``name`` (torch's names are accepted as aliases)."""
    short = ALIASES.get(name, name)
    if short not in DTYPES:
        raise ConfigError(f"{key} '{name}' must be one of {', '.join(DTYPES)} (or {', '.join(ALIASES)}).")
    return short


@dataclass
class ModelSection:
    """The DiT to train and the frozen encoders that build the cache (and draw the samples)."""

    preset: str = "tiny"  # architecture when training from scratch: tiny | mid | turbo | base | omni
    dims: dict = field(default_factory=dict)  # explicit DiTConfig fields over the preset, e.g. {dim = 128}
    checkpoint: str = ""  # initialise from this DiT file/folder (any layout zimage reads); "" = from scratch
    omni: bool = False  # give a checkpoint without the SigLIP branch a freshly initialised one
    siglip_dim: int = 1152  # width of that branch's input (SigLIP2-so400m)
    dtype: str = "fp32"  # DiT weights: fp32 for (full) training; a LoRA base may be "bf16"
    gradient_checkpointing: bool = False
    text_encoder: str = ""  # Qwen3 file/folder, or "random-tiny"
    tokenizer: str = ""  # tokenizer folder ("" = found next to the text encoder)
    vae: str = ""  # Flux VAE file/folder, or "random-tiny"
    vision: str = ""  # SigLIP2 vision encoder for edit data on Omni models ("" = none)
    encoder_dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    encoder_seed: int = 0  # seed of the random-tiny encoders


@dataclass
class OptimSection:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after the warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1


@dataclass
class ObjectiveSection:
    """Flow matching in Z-Image conventions (see :mod:`train.objective`)."""

    timesteps: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "dynamic"  # dynamic (resolution-dependent, Flux-style) | static | none
    static_shift: float = 3.0  # for shift = "static" (Turbo 3.0, Base 6.0)


@dataclass
class LoraSection:
    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    targets: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # regexes on module names
    init_seed: int = 0


@dataclass
class EMASection:
    enabled: bool = False
    decay: float = 0.9999
    start_step: int = 0  # copy the weights until this step, then average
    every: int = 1  # update every N optimizer steps
    warmup: bool = True  # ramp the decay as min(decay, (1 + n) / (10 + n)) over the first updates


@dataclass
class CheckpointSection:
    every: int = 1000  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 3  # completed checkpoints kept (0 = all)


@dataclass
class SampleSection:
    every: int = 0  # optimizer steps between sample grids (0 = off)
    prompts: list = field(default_factory=lambda: ["a photo of a cat"])
    seeds: list = field(default_factory=lambda: [0])
    width: int = 256
    height: int = 256
    steps: int = 8
    cfg: float = 1.0
    shift: float = 3.0
    sampler: str = "euler"
    use_ema: bool = True  # sample from the EMA weights when EMA is on


@dataclass
class ExportSection:
    final: bool = True  # export when the run reaches max_steps
    layout: str = "comfyui"  # comfyui | diffusers | zimage (full models)
    dtype: str = "bf16"  # full-model export dtype: bf16 | fp16 | fp32
    ema: bool = True  # export the EMA weights when EMA is on


@dataclass
class DistillSection:
    """Few-step distillation (:mod:`train.distill`): present in a config file = this run distills ``teacher``."""

    enabled: bool = False  # set by the presence of a [distill] table
    method: str = "decoupled_dmd"  # decoupled_dmd | dmd2 | ca_only (the CFG-augmentation-only ablation)
    teacher: str = ""  # the DiT to distill (a train.export file, a published file, any layout zimage reads)
    cfg: float = 4.0  # the teacher's guidance, CLI convention (1 = off; diffusers' guidance_scale = cfg - 1)
    student_steps: int = 8  # the student's grid: flow_sigmas(student_steps, student_shift), as zimage generate uses
    student_shift: float = 3.0
    student_input: str = "backward"  # backward (simulation from pure noise) | real (noised real latents)
    simulation: str = "euler"  # the backward simulation's step: euler (the sampler users run) | renoise (DMD2)
    student: str = "full"  # full | lora (the student trains LoRA adapters on the shared frozen teacher)
    student_lora_rank: int = 64
    student_lora_alpha: float = 64.0
    fake: str = "lora"  # lora (adapters on the shared frozen teacher, DMDR) | full (a trainable copy)
    fake_lora_rank: int = 32
    fake_lora_alpha: float = 32.0
    lora_targets: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    fake_lr: float = 0.0  # 0 = optim.lr
    ttur: int = 5  # fake-score updates per generator update
    dm_weight: float = 1.0  # distribution-matching term (decoupled_dmd, dmd2)
    ca_weight: float = 1.0  # CFG-augmentation term (decoupled_dmd, ca_only)
    sigma_min: float = 0.02  # re-noising range of the DM term and of the fake score's training
    sigma_max: float = 0.98
    sigma_shift: float = 1.0  # shift s of those sigmas: s u / (1 + (s - 1) u) (3 for 1024px)
    normalize: bool = True  # per-sample mean-abs normalisation of each term (DMD2)
    gan_weight: float = 0.0  # generator GAN loss weight (0 = no GAN head; DMD2 SDXL 5e-3)
    gan_d_weight: float = 1e-2  # discriminator loss weight
    gan_layer: int = -1  # the fake score's block whose image tokens feed the head
    gan_head: str = "pooled"  # pooled (one logit from the mean image token) | tokens (a logit per image token)
    teacher_dtype: str = "auto"  # frozen teacher / shared base: bf16 on CUDA, fp32 on CPU
    lora_rank: int = 32  # rank of the exported LoRA delta (0 = no LoRA export)
    export_diffusers: bool = True  # also write the student in the diffusers layout


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = ""  # "" = runs/<name>
    seed: int = 0
    max_steps: int = 1000
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | no | bf16 | fp16
    device: str = "auto"  # auto | cpu (force the CPU even when a GPU is present)
    log_every: int = 10
    ddp_find_unused_parameters: bool | None = None  # None = on for Omni models (unused SigLIP branch in T2I)
    sharding: str = "auto"  # auto (the launcher's: one process, DDP, accelerate's FSDP2) | fsdp2 (train.parallel)
    model: ModelSection = field(default_factory=ModelSection)
    data: dict = field(default_factory=dict)  # train.data.DataConfig fields
    synthetic: dict = field(default_factory=dict)  # make the synthetic dataset first: {folder, n_per_class, size, seed}
    optim: OptimSection = field(default_factory=OptimSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    lora: LoraSection = field(default_factory=LoraSection)
    ema: EMASection = field(default_factory=EMASection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    samples: SampleSection = field(default_factory=SampleSection)
    export: ExportSection = field(default_factory=ExportSection)
    distill: DistillSection = field(default_factory=DistillSection)
    rl: dict = field(default_factory=dict)  # RL post-training (train.rl.config.RLConfig); replaces [data]

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def data_config(self):
        from train.data import DataConfig

        return DataConfig.from_dict(dict(self.data), where="[data] section of the training config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        m, o = self.model, self.optim
        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset '{m.preset}' is unknown; use one of {', '.join(PRESETS)}.")
        m.dtype = _dtype_name(m.dtype, "model.dtype")
        if m.dtype != "fp32" and not self.lora.enabled:
            raise ConfigError(
                f"model.dtype = '{m.dtype}' only suits a frozen LoRA base; full training keeps fp32 master weights "
                "(use mixed_precision = 'bf16' for bf16 compute)."
            )
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision '{self.mixed_precision}' must be auto, no, bf16 or fp16.")
        if self.sharding not in ("auto", "fsdp2"):
            raise ConfigError(f"sharding '{self.sharding}' must be 'auto' or 'fsdp2'.")
        if self.device not in ("auto", "cpu"):
            raise ConfigError(f"device '{self.device}' must be 'auto' or 'cpu' (GPUs are chosen by the launcher).")
        if o.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optim.optimizer '{o.optimizer}' must be 'adamw' or 'adamw8bit'.")
        if o.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule '{o.schedule}' must be 'constant' or 'cosine'.")
        if o.grad_accum < 1 or o.warmup_steps < 0 or not o.lr > 0:
            raise ConfigError("optim: grad_accum must be >= 1, warmup_steps >= 0 and lr > 0.")
        if len(o.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, got {o.betas}.")
        ob = self.objective
        if ob.timesteps not in ("logit_normal", "uniform"):
            raise ConfigError(f"objective.timesteps '{ob.timesteps}' must be 'logit_normal' or 'uniform'.")
        if ob.shift not in ("dynamic", "static", "none"):
            raise ConfigError(f"objective.shift '{ob.shift}' must be 'dynamic', 'static' or 'none'.")
        if not ob.logit_std > 0 or not ob.static_shift > 0:
            raise ConfigError("objective: logit_std and static_shift must be > 0.")
        if self.lora.enabled and (self.lora.rank < 1 or not self.lora.targets):
            raise ConfigError("lora: rank must be >= 1 and targets must name at least one module pattern.")
        if not 0.0 <= self.ema.decay < 1.0 or self.ema.every < 1:
            raise ConfigError(
                f"ema.decay must be in [0, 1) and ema.every >= 1, got {self.ema.decay}, {self.ema.every}."
            )
        if self.checkpoint.every < 0 or self.checkpoint.keep_last < 0:
            raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 0.")
        s = self.samples
        if s.every and (not s.prompts or not s.seeds):
            raise ConfigError("samples: give at least one prompt and one seed (or set samples.every = 0).")
        for side in (s.width, s.height):
            if side < 16 or side % 16:
                raise ConfigError(f"samples.width/height must be positive multiples of 16, got {s.width}x{s.height}.")
        if self.export.layout not in ("comfyui", "diffusers", "zimage"):
            raise ConfigError(f"export.layout '{self.export.layout}' must be comfyui, diffusers or zimage.")
        self.export.dtype = _dtype_name(self.export.dtype, "export.dtype")
        if self.rl:
            from train.rl.config import rl_config

            rl_config(self.rl, self.max_steps)
        elif not self.data:
            raise ConfigError("the [data] section is missing; give at least data.sources.")
        if self.distill.enabled:
            self._validate_distill()

    def model_files(self) -> list[tuple[str, str, str]]:
        """``(key, path, what to put there)`` of every model file or folder this configuration names, by the key the
        user wrote it under (``rl.policy`` and ``distill.teacher`` before the ``model.checkpoint`` they are copied
        into), the user-supplied reward models of ``[rl] rewards`` included."""
        files = []
        rl = self.rl or {}
        if rl.get("policy"):
            files.append(("rl.policy", rl["policy"], "the DiT to improve: a file or folder zimage reads"))
        distill = rl.get("distill")
        if isinstance(distill, dict) and distill.get("teacher"):
            files.append(("rl.distill.teacher", distill["teacher"], "the DiT of rl.policy (DMDR distills the policy)"))
        for i, spec in enumerate(rl.get("rewards") or []):
            name = spec.get("name") if isinstance(spec, dict) else None
            for opt in REWARD_MODEL_FILES.get(name, ()) if isinstance(name, str) else ():
                if isinstance(spec.get(opt), str) and spec[opt]:
                    files.append((f"rl.rewards[{i}].{opt}", spec[opt], f"the model file or folder of reward '{name}'"))
        if self.distill.enabled and self.distill.teacher:
            files.append(("distill.teacher", self.distill.teacher, "the DiT file to distill (e.g. from train.export)"))
        for key in ("checkpoint", "text_encoder", "vae", "vision", "tokenizer"):
            value = getattr(self.model, key)
            if value and value != RANDOM_TINY:
                files.append((f"model.{key}", value, "an existing file or folder"))
        return files

    def check_model_files(self) -> None:
        """The model files named here exist and can be read (a run checks this at its start, before the data cache
        or anything else is built; :meth:`validate` does not, so configurations can be read and planned on machines
        without the files). Each path is reported under the first key that names it."""
        seen = set()
        for key, value, what in self.model_files():
            p = Path(value).expanduser()
            if p in seen:
                continue
            seen.add(p)
            if not p.exists():
                raise ConfigError(f"{key} '{value}' does not exist; give the path of {what}.")
            if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
                raise ConfigError(f"{key} '{value}' is not readable (permissions); give the path of {what}.")

    def _validate_distill(self) -> None:
        d = self.distill
        if d.method not in ("decoupled_dmd", "dmd2", "ca_only"):
            raise ConfigError(f"distill.method '{d.method}' must be decoupled_dmd, dmd2 or ca_only.")
        if not d.teacher:
            raise ConfigError("[distill] needs teacher = PATH: the DiT file to distill (e.g. from train.export).")
        if self.model.checkpoint and Path(self.model.checkpoint) != Path(d.teacher):
            raise ConfigError(
                f"model.checkpoint '{self.model.checkpoint}' differs from distill.teacher '{d.teacher}'; the student "
                "starts from the teacher: leave model.checkpoint empty."
            )
        if not d.cfg >= 1.0:
            raise ConfigError(f"distill.cfg must be >= 1 (CLI convention, 1 = off), got {d.cfg}.")
        if d.student_steps < 1 or not d.student_shift > 0:
            raise ConfigError("distill: student_steps must be >= 1 and student_shift > 0.")
        choices = {
            "student_input": ("backward", "real"),
            "simulation": ("euler", "renoise"),
            "student": ("full", "lora"),
            "fake": ("lora", "full"),
            "gan_head": ("pooled", "tokens"),
            "teacher_dtype": ("auto", "bf16", "fp16", "fp32"),
        }
        for key, allowed in choices.items():
            if getattr(d, key) not in allowed:
                raise ConfigError(f"distill.{key} '{getattr(d, key)}' must be one of {', '.join(allowed)}.")
        if d.ttur < 1:
            raise ConfigError(f"distill.ttur (fake updates per generator update) must be >= 1, got {d.ttur}.")
        if not 0.0 <= d.sigma_min < d.sigma_max <= 1.0 or not d.sigma_shift > 0:
            raise ConfigError("distill: need 0 <= sigma_min < sigma_max <= 1 and sigma_shift > 0.")
        if min(d.student_lora_rank, d.fake_lora_rank) < 1 or d.lora_rank < 0:
            raise ConfigError("distill: LoRA ranks must be >= 1 (lora_rank >= 0; 0 = no LoRA export).")
        if min(d.dm_weight, d.ca_weight, d.gan_weight, d.gan_d_weight) < 0:
            raise ConfigError("distill: loss weights must be >= 0.")
        if self.lora.enabled:
            raise ConfigError(
                "[lora] trains a LoRA with flow matching; for a LoRA student use distill.student = 'lora'."
            )
        if self.mixed_precision == "fp16":
            raise ConfigError("distillation runs in bf16 or fp32: set mixed_precision = 'bf16', 'auto' or 'no'.")
        # the student starts from the teacher; its sample images use its own grid without guidance
        self.model.checkpoint = d.teacher
        self.samples.steps, self.samples.cfg, self.samples.shift = d.student_steps, 1.0, d.student_shift


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table, got {type(values).__name__} ({values!r}).")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}.")
    kwargs = {}
    for name, value in values.items():
        default = (
            fields[name].default_factory()
            if fields[name].default_factory is not dataclasses.MISSING
            else fields[name].default
        )
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}" if where != "config" else f"[{name}]")
        else:
            kwargs[name] = _check_type(name, value, default, where)
    return cls(**kwargs)


def _check_type(name: str, value: Any, default: Any, where: str) -> Any:
    if default is None or default == "" and isinstance(value, str):
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"{where}: '{name}' must be true or false, got {value!r}.")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float, str, list, dict)) and not isinstance(value, type(default)):
        raise ConfigError(f"{where}: '{name}' must be a {type(default).__name__}, got {value!r}.")
    return value


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-4``, ``true``, ``"x"``, ``[1, 2]``, ``{a = 1}``), or the raw text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except Exception:  # noqa: BLE001 - anything that is not TOML is a plain string
        return text


def apply_override(tree: dict, spec: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (creating tables on the way)."""
    key, sep, value = spec.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{spec}' must look like key=value, e.g. optim.lr=1e-4 or max_steps=10.")
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{spec}': '{p}' is not a table.")
    node[parts[-1]] = parse_value(value.strip())


def config_from_dict(tree: dict) -> TrainConfig:
    if isinstance(tree.get("distill"), dict) and "enabled" not in tree["distill"]:
        tree = {**tree, "distill": {**tree["distill"], "enabled": True}}
    cfg = _build(TrainConfig, tree, "config")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML file (or start from the defaults) and apply ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        if tomllib is None:  # pragma: no cover
            raise ConfigError("reading TOML needs Python 3.11+ or the 'tomli' package (pip install tomli).")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"training config '{p}' does not exist; see train/configs/ for examples.")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"'{p}' is not valid TOML: {e}") from e
    for spec in overrides or []:
        apply_override(tree, spec)
    return config_from_dict(tree)
