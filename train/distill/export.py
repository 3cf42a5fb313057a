"""What a distillation run leaves in ``OUTPUT_DIR/export/``: the student as a DiT file and as a LoRA over the teacher.

- ``<name>_student.safetensors``: the student in ComfyUI's single-file layout (``models/diffusion_models/``;
  ``zimage generate --transformer FILE --steps N --cfg 1``), and ``<name>_student_diffusers/`` (the diffusers
  ``transformer/`` layout) unless ``distill.export_diffusers = false``;
- ``<name>_turbo_lora_r<R>.safetensors``: the student minus the teacher as a LoRA in ComfyUI's layout
  (``models/loras/``; ``zimage generate --transformer TEACHER --lora FILE --steps N --cfg 1``): every linear
  layer's weight difference truncated to rank ``R`` by SVD (``up = U sqrt(S)``, ``down = sqrt(S) V^T``, alpha = R),
  bias and norm differences as exact ``.diff_b`` / ``.diff`` terms;
- ``<name>_lora_report.json``: how much of the difference each rank keeps (the energy ``sum S_r^2 / sum S^2``, over
  all layers and per layer at the chosen rank) and the differences no LoRA can carry (the learned pad tokens).

A LoRA student is merged into the teacher for the full file; a full student's difference is what the LoRA
approximates. ``python -m train.export RUN`` writes the same files for a distillation checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from zimage_core import validate
from zimage_core.checkpoints import load_dit, save_dit
from zimage_core.dtypes import resolve_dtype
from zimage_core.errors import ZImageError
from zimage_core.lora import Diff, LoRA, LowRank, save_lora
from zimage_core.outputs import atomic_path

from .. import checkpoint as ck
from ..export import dit_config_from_meta
from ..lora_train import lora_from_state

log = logging.getLogger(__name__)

REPORT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def student_state(folder: Path, meta: dict, ema: bool, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's full float32 state dict from a distillation checkpoint (LoRA students merged into the teacher)."""
    name = "ema.safetensors" if ema else "trainable.safetensors"
    if ema and not (folder / name).is_file():
        raise ZImageError(f"checkpoint '{folder}' has no EMA weights (ema.enabled was false); export without EMA.")
    trained = ck.read_tensors(folder, name)
    if meta["distill"]["student"] == "full":
        missing = sorted(k for k in set(teacher) - set(trained) if not k.endswith("pad_token"))  # pad tokens: frozen
        if missing:
            raise ZImageError(f"checkpoint '{folder}' lacks student tensors (e.g. {missing[:3]}).")
        return {k: trained.get(k, teacher[k]).float() for k in teacher}
    lora = lora_from_state(trained, float(meta["distill"]["student_lora_alpha"]))
    state = {k: v.float().clone() for k, v in teacher.items()}
    for module, terms in lora.items():
        for t in terms:
            state[module + ".weight"] += t.delta()
    return state


def linear_names(state: dict[str, torch.Tensor], cfg) -> set[str]:
    """Module names of the DiT's linear layers (from the architecture, on the meta device)."""
    from zimage_core.dit import ZImageDiT

    with torch.device("meta"):
        dit = ZImageDiT(cfg)
    return {n for n, m in dit.named_modules() if isinstance(m, nn.Linear)}


def delta_lora(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], cfg, rank: int, device: str = "cpu"
) -> tuple[LoRA, dict]:
    """``student - teacher`` as a LoRA of rank ``rank`` and the report of what each rank keeps."""
    linears = linear_names(teacher, cfg)
    lora = LoRA(format="zimage-distill", name="turbo LoRA")
    per_layer, curve_kept, total_energy = {}, {r: 0.0 for r in REPORT_RANKS}, 0.0
    kept_energy, exact_energy, lost = 0.0, 0.0, {}
    for key in sorted(teacher):
        delta = student[key].float() - teacher[key].float()
        energy = float(delta.double().pow(2).sum())
        if energy == 0.0:
            continue
        module, _, param = key.rpartition(".")
        if module in linears and param == "weight":
            u, s, vh = torch.linalg.svd(delta.to(device), full_matrices=False)
            s2 = s.double().pow(2)
            r = min(rank, s.numel())
            root = s[:r].sqrt()
            lora.add(
                module,
                LowRank(
                    down=(root[:, None] * vh[:r]).cpu().contiguous(), up=(u[:, :r] * root).cpu().contiguous(), scale=1.0
                ),
            )
            kept = float(s2[:r].sum())
            per_layer[module] = round(kept / energy, 6)
            kept_energy += kept
            for q in REPORT_RANKS:
                curve_kept[q] += float(s2[: min(q, s.numel())].sum())
            total_energy += energy
        elif module in linears and param == "bias":
            lora.add(module, Diff(delta.contiguous(), param="bias"))
            exact_energy += energy
        elif param == "weight" and delta.ndim == 1:  # norm scales
            lora.add(module, Diff(delta.contiguous(), param="weight"))
            exact_energy += energy
        else:  # e.g. the learned pad tokens: a LoRA file has no place for them
            lost[key] = float(delta.norm() / teacher[key].float().norm().clamp_min(1e-12))
    report = {
        "rank": rank,
        "linear_energy_kept": (kept_energy / total_energy) if total_energy else 1.0,
        "energy_kept_by_rank": {str(q): (v / total_energy if total_energy else 1.0) for q, v in curve_kept.items()},
        "exact_terms_energy": exact_energy,
        "linear_delta_energy": total_energy,
        "per_layer_energy_kept": per_layer,
        "not_representable_relative_change": lost,
    }
    return lora, report


def export_distilled(
    ckpt: str | Path,
    out: str | Path,
    ema: bool = False,
    dtype: str = "bf16",
    lora_rank: int = 32,
    diffusers: bool = True,
) -> dict[str, Path]:
    """Write the student (and its LoRA delta over the teacher) of a distillation checkpoint into folder ``out``."""
    folder = ck.resolve_checkpoint(ckpt)
    meta = ck.read_meta(folder)
    if not str(meta.get("kind", "")).startswith("distill"):
        raise ZImageError(f"checkpoint '{folder}' is not a distillation run (kind {meta.get('kind')}).")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZImageError(f"export folder '{out}' is a file; give a folder (the export writes several files).")
    validate.writable_path(out, "export folder", folder_ok=True)  # before the work, not after it
    d, cfg = meta["distill"], dit_config_from_meta(meta)
    stem = f"{meta.get('config', {}).get('name', 'distilled')}_{d['student_steps']}step"
    teacher = load_dit(d["teacher"], dtype=torch.float32, device="cpu").state_dict()
    student = student_state(folder, meta, ema, teacher)
    info = {
        "zimage_train_step": str(meta["step"]),
        "zimage_distill_method": d["method"],
        "zimage_student_steps": str(d["student_steps"]),
        "zimage_student_shift": str(d["student_shift"]),
        "zimage_sample_cfg": "1",
    }
    target = resolve_dtype(dtype, "cpu")
    cast = {k: (v.to(target) if v.is_floating_point() else v) for k, v in student.items()}
    # Every file is written into a temporary folder next to ``out`` and moved into ``out`` only when all of them
    # are complete: a failure (or a kill) part-way leaves no file of this export in ``out``.
    with atomic_path(out, folder=True) as tmp:
        written = _write_export(tmp, stem, cast, student, teacher, cfg, d, meta, info, lora_rank, diffusers)
    paths = {k: out / p.name for k, p in written.items()}
    log.info("exported the %d-step student of step %s to %s", d["student_steps"], meta["step"], paths["student"])
    if "lora" in paths:
        log.info("turbo LoRA (rank %d): %s", lora_rank, paths["lora"])
    return paths


def _write_export(out: Path, stem, cast, student, teacher, cfg, d, meta, info, lora_rank, diffusers) -> dict[str, Path]:
    """The export's files, written into ``out`` (the temporary folder of :func:`export_distilled`)."""
    paths = {"student": save_dit(cast, cfg, out / f"{stem}_student.safetensors", "comfyui")}
    if diffusers:
        paths["diffusers"] = save_dit(cast, cfg, out / f"{stem}_student_diffusers", "diffusers")
    if lora_rank > 0:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        lora, report = delta_lora(student, teacher, cfg, lora_rank, device)
        report.update({"teacher": d["teacher"], "student_steps": d["student_steps"], "step": meta["step"]})
        kept = report["linear_energy_kept"]
        meta_lora = {**info, "zimage_lora_rank": str(lora_rank), "zimage_lora_energy_kept": f"{kept:.6f}"}
        paths["lora"] = save_lora(lora, out / f"{stem}_turbo_lora_r{lora_rank}.safetensors", metadata=meta_lora)
        report_path = out / f"{stem}_lora_report.json"
        report_path.write_text(json.dumps(report, indent=2))  # inside the temporary folder
        paths["report"] = report_path
        curve = ", ".join(f"r{q} {v:.1%}" for q, v in report["energy_kept_by_rank"].items())
        log.info("LoRA delta at rank %d keeps %.2f%% of the weight difference (%s)", lora_rank, 100 * kept, curve)
        if report["not_representable_relative_change"]:
            log.warning(
                "the LoRA cannot carry the change of %s (relative size %s); the full student file has it",
                ", ".join(report["not_representable_relative_change"]),
                ", ".join(f"{v:.2g}" for v in report["not_representable_relative_change"].values()),
            )
    return paths
