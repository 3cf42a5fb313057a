"""Memory and speed by quantization (CPU, every session) and by memory mode (GPU, where one is lent).

CPU: a random mid-size DiT (dim 1536 x 8 layers, as bench/generate.py) saved as a bf16 ComfyUI file, plus GGUF
Q8_0 / Q4_K files of the same weights. Each quantization runs in a fresh process: load the DiT, then one 8-step
Turbo sampling (the DiT part of a generation: random caption features stand in for the text encoder, no VAE),
computing in bf16. Reported per run, from /proc/self/status (the peak is reset between phases with clear_refs):
- baseline RSS after the imports, then the load's peak and the RSS after loading (the resident DiT);
- the sampling peak and time; ratios against the bf16 (``none``) run of the same benchmark run;
- the load peak above the baseline against the file size (target <= 1.15x).

    python bench/memory.py [--size 512] [--steps 8] [--quants none,int8,nf4,fp8,Q8_0,Q4_K] [--json FILE]

GPU (``--gpu``): full-size random 6B DiT + Qwen3-4B + Flux VAE in the diffusers layout, 1024x1024, 8 steps,
batch 1, per memory mode and quantization through ``ZImagePipeline.load(..., memory=MODE, quant=Q)``, beside
diffusers' ``enable_model_cpu_offload`` and group offloading on the same machine: latency (median of
``--repeats`` after one warm-up) and ``torch.cuda.max_memory_allocated``. Files are built once in ``--workdir``
(``--build-only`` to do just that; later calls reuse them), each run is a fresh process.

    python bench/memory.py --gpu --workdir /tmp/zbench [--runs full/none,block-swap:20/nf4,diffusers-offload]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu_name  # noqa: E402

CPU_QUANTS = ("none", "int8", "nf4", "fp8", "Q8_0", "Q4_K")
GPU_RUNS = (
    "full/none",
    "text-encoder-offload/none",
    "block-swap:20/none",
    "sequential/none",
    "block-swap:20/nf4",
    "full/fp8",
    "diffusers-offload",
    "diffusers-group-offload",
)
FLOOR_S = 0.57  # compute floor of one 8-step 1024x1024 image at 790 TFLOP/s (reference document, section 5.2)
PROMPT = "a watercolor painting of a red fox sitting in fresh snow, soft morning light, pine trees behind"


# ---------------------------------------------------------------------------------------------
# Process memory
# ---------------------------------------------------------------------------------------------
def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# CPU: one run in this (fresh) process
# ---------------------------------------------------------------------------------------------
def cpu_child(args) -> None:
    import torch

    from zimage_core.checkpoints import load_dit
    from zimage_core.denoiser import Denoiser
    from zimage_core.quant import describe, storage_bytes
    from zimage_core.quant.kernels import bitsandbytes_functional
    from zimage_core.sampling import get_sampler, initial_noise, latent_shape, noise_latent
    from zimage_core.schedules import flow_sigmas

    torch.set_grad_enabled(False)
    if args.quant == "nf4":
        bitsandbytes_functional()  # its import (torch.compile machinery) belongs to the baseline, not to the model
    quant = args.quant if args.quant in ("none", "int8", "nf4", "fp8") else "none"
    baseline = status_mb("VmRSS")
    resettable = reset_peak()
    t0 = time.perf_counter()
    dit = load_dit(args.file, dtype="bf16", device="cpu", quant=quant)
    t_load = time.perf_counter() - t0
    load_peak, after_load = status_mb("VmHWM"), status_mb("VmRSS")
    reset_peak()
    h = w = args.size // 8
    caption = [torch.randn(32, dit.cfg.cap_feat_dim, generator=torch.Generator().manual_seed(1))]
    noise = initial_noise(latent_shape(1, args.size, args.size), 0)
    sigmas = flow_sigmas(args.steps, 3.0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = noise_latent(torch.zeros_like(noise), noise, float(sigmas[0]))
        x = get_sampler("euler")(Denoiser(dit, caption, None, (h, w)), x, sigmas)
    t_sample = time.perf_counter() - t0
    quant_b, other_b = storage_bytes(dit)
    print(
        json.dumps(
            {
                "quant": args.quant,
                "file_mb": Path(args.file).stat().st_size / 2**20,
                "baseline_mb": baseline,
                "load_s": t_load,
                "load_peak_mb": load_peak,
                "after_load_mb": after_load,
                "sample_s": t_sample,
                "sample_peak_mb": status_mb("VmHWM"),
                "weights_mb": (quant_b + other_b) / 2**20,
                "finite": bool(torch.isfinite(x).all()),
                "peak_reset": resettable,
                "describe": describe(dit),
            }
        )
    )


def build_cpu_files(folder: Path, quants) -> dict[str, Path]:
    import torch

    from tests.factories.dit import randomize_
    from zimage_core.checkpoints import save_dit
    from zimage_core.config import DiTConfig
    from zimage_core.dit import ZImageDiT
    from zimage_core.quant.gguf_write import save_gguf

    cfg = DiTConfig.mid(cap_feat_dim=1024, t_mid_dim=1024)  # the DiT of bench/generate.py
    state = {k: v.to(torch.bfloat16) for k, v in randomize_(ZImageDiT(cfg), 0).state_dict().items()}
    files = {"bf16": save_dit(state, cfg, folder / "z_image_mid_bf16.safetensors", "comfyui")}
    for q in quants:
        if q.startswith("Q"):
            files[q] = save_gguf(state, folder / f"z_image_mid-{q}.gguf", q)
    return files


def cpu_main(args) -> dict:
    import torch

    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    if "none" not in quants:
        quants.insert(0, "none")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    runs: dict[str, list[dict]] = {q: [] for q in quants}
    with tempfile.TemporaryDirectory() as tmp:
        files = build_cpu_files(Path(tmp), quants)
        for r in range(args.rounds):
            for q in quants if r % 2 == 0 else quants[::-1]:
                f = files[q] if q.startswith("Q") else files["bf16"]
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "cpu",
                    "--file",
                    str(f),
                    "--quant",
                    q,
                    "--size",
                    str(args.size),
                    "--steps",
                    str(args.steps),
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if res.returncode:
                    raise SystemExit(f"{q} failed:\n{res.stderr[-3000:]}")
                runs[q].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[q][-1]), flush=True)
    rows = [summarise(q, runs[q]) for q in quants]
    base = rows[0]
    for row in rows:
        row["resident_vs_bf16"] = row["resident_mb"] / base["resident_mb"]
        row["peak_above_vs_bf16"] = row["peak_above_mb"] / base["peak_above_mb"]
        row["peak_vs_bf16"] = row["peak_mb"] / base["peak_mb"]
        row["sample_vs_bf16"] = row["sample_s"] / base["sample_s"]
    return {
        "config": f"DiT dim 1536 x 8 layers (+2+2 refiners), {args.size}x{args.size}, {args.steps} steps, bf16 compute, "
        "batch 1, random weights and caption features (no text encoder, no VAE)",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "rounds": args.rounds,
        "rows": rows,
        "runs": runs,
    }


def summarise(q: str, runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "quant": q,
        "file_mb": runs[0]["file_mb"],
        "weights_mb": runs[0]["weights_mb"],
        "load_s": med("load_s"),
        "load_above_mb": med("load_peak_mb") - med("baseline_mb"),
        "load_vs_file": (med("load_peak_mb") - med("baseline_mb")) / runs[0]["file_mb"],
        "resident_mb": med("after_load_mb") - med("baseline_mb"),
        "peak_mb": max(max(r["load_peak_mb"], r["sample_peak_mb"]) for r in runs),
        "peak_above_mb": max(max(r["load_peak_mb"], r["sample_peak_mb"]) - r["baseline_mb"] for r in runs),
        "baseline_mb": med("baseline_mb"),
        "sample_s": med("sample_s"),
        "describe": runs[0]["describe"],
        "finite": all(r["finite"] for r in runs),
    }


def cpu_table(s: dict) -> str:
    lines = [
        f"- Config: {s['config']}",
        f"- Machine: {s['machine']}",
        "",
        "| quant | file (MB) | load peak - baseline (MB) | load peak / file | resident DiT (MB) | vs bf16 "
        "| process peak (MB) | peak - baseline (MB) | vs bf16 | sampling (s) | vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['quant'] if r['quant'] != 'none' else 'none (bf16)'} | {r['file_mb']:.0f} | {r['load_above_mb']:.0f} "
            f"| {r['load_vs_file']:.2f}x | {r['resident_mb']:.0f} | {r['resident_vs_bf16']:.2f}x | {r['peak_mb']:.0f} "
            f"| {r['peak_above_mb']:.0f} | {r['peak_above_vs_bf16']:.2f}x | {r['sample_s']:.1f} | {r['sample_vs_bf16']:.2f}x |"
        )
    lines += [
        "",
        f"Baseline (imports, no model): {s['rows'][0]['baseline_mb']:.0f} MB. Targets: resident nf4 <= 0.35x "
        "and int8 <= 0.55x of bf16; load peak <= 1.15x the file.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def _randomize_on_gpu(module, seed: int):
    """``tests.factories.dit.randomize_``'s rules (weights N(0, 1/fan_in), norms ~1, the rest small), drawn on the GPU."""
    import torch

    g = torch.Generator("cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            elif "norm" in name:
                p.normal_(1.0, 0.2, generator=g)
            else:
                p.normal_(0.0, 0.2, generator=g)
    return module


def build_gpu_model(root: Path, tokenizer: Path) -> Path:
    """Full-size random Z-Image-Turbo in the diffusers layout (transformer, text encoder, VAE, tokenizer)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from tests.factories.pipeline import QWEN3_USER_TEMPLATE
    from tests.factories.text_encoder import hf_config
    from tests.factories.vae import make_diffusers_vae
    from zimage_core.config import DiTConfig, TextEncoderConfig, VAEConfig
    from zimage_core.dit_layout import config_to_diffusers

    if (root / "model_index.json").exists():
        return root
    if not (tokenizer / "tokenizer_config.json").exists():
        raise SystemExit(
            f"no Qwen tokenizer in '{tokenizer}'; pass --tokenizer DIR (e.g. tests/fixtures/qwen25_tokenizer)."
        )
    kw = config_to_diffusers(DiTConfig.turbo())
    kw.pop("_class_name")
    kw.pop("siglip_feat_dim")
    with torch.device("cuda"):  # built and randomised on the GPU: minutes instead of an hour on the CPU
        dit = ZImageTransformer2DModel(**kw).to(torch.bfloat16)
    dit = _randomize_on_gpu(dit, 0).cpu()
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        te = Qwen3Model(hf_config(TextEncoderConfig.qwen3_4b())).to(torch.bfloat16)
    te = _randomize_on_gpu(te, 1).cpu()
    torch.cuda.empty_cache()
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    tok.chat_template = QWEN3_USER_TEMPLATE
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=sched, vae=make_diffusers_vae(VAEConfig.flux(), 2), text_encoder=te, tokenizer=tok, transformer=dit
    )
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def gpu_child(args) -> None:
    import inspect

    import torch

    root, run = Path(args.file), args.run
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step_times: list[float] = []
    if run.startswith("diffusers"):
        from diffusers import ZImagePipeline as Ref

        pipe = Ref.from_pretrained(root, torch_dtype=torch.bfloat16, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if run == "diffusers-offload":
            pipe.enable_model_cpu_offload()
        else:
            from diffusers.hooks import apply_group_offloading

            cuda, cpu = torch.device("cuda"), torch.device("cpu")
            pipe.transformer.enable_group_offload(
                onload_device=cuda,
                offload_device=cpu,
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
            apply_group_offloading(
                pipe.text_encoder,
                onload_device=cuda,
                offload_device=cpu,
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
            pipe.vae.enable_group_offload(onload_device=cuda, offload_device=cpu, offload_type="leaf_level")

        def generate():
            def on_step(_pipe, i, t, kw):
                torch.cuda.synchronize()
                step_times.append(time.perf_counter())
                return kw

            pipe(
                prompt=PROMPT,
                height=1024,
                width=1024,
                num_inference_steps=8,
                guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=on_step,
            )
    else:
        from zimage_core.pipeline import GenerateOptions, ZImagePipeline

        mode, _, quant = run.partition("/")
        params = inspect.signature(ZImagePipeline.load).parameters
        if "memory" not in params or "quant" not in params:
            raise SystemExit(
                "ZImagePipeline.load has no memory=/quant= arguments yet (issue 4 wiring); "
                "update zimage_core.pipeline before running the GPU benchmark."
            )
        pipe = ZImagePipeline.load(root, device="cuda", dtype="bf16", memory=mode, quant=quant or "none")
        opts = GenerateOptions(prompt=PROMPT, width=1024, height=1024, steps=8, seed=0)

        def generate():
            def on_step(*_):
                torch.cuda.synchronize()
                step_times.append(time.perf_counter())

            pipe.generate(opts, progress=False, callback=on_step)

    t_load = time.perf_counter() - t0
    timings, steps = [], []
    for i in range(1 + args.repeats):
        step_times.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate()
        torch.cuda.synchronize()
        if i:  # the first generation warms up (allocator, cuDNN autotuning, compilation)
            timings.append(time.perf_counter() - t0)
            steps.append(statistics.median(b - a for a, b in zip(step_times, step_times[1:])))
    print(
        json.dumps(
            {
                "run": run,
                "load_s": t_load,
                "latency_s": statistics.median(timings),
                "dit_step_s": statistics.median(steps),
                "max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                "max_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
                "device": torch.cuda.get_device_name(),
            }
        )
    )


def gpu_main(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; this machine has none (run the CPU part without --gpu).")
    root = build_gpu_model(Path(args.workdir) / "z-image-random-6b", Path(args.tokenizer))
    if args.build_only:
        return {"built": str(root)}
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    results = []
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "gpu",
            "--file",
            str(root),
            "--run",
            run,
            "--repeats",
            str(args.repeats),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            results.append(
                {"run": run, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
            )
        else:
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    full = next((r for r in results if r["run"] == "full/none" and "latency_s" in r), None)
    for r in results:
        if "latency_s" in r:
            r["vs_full"] = r["latency_s"] / full["latency_s"] if full else None
            r["dit_vs_floor"] = r["dit_step_s"] * 8 / FLOOR_S
    return {
        "config": "random Z-Image-Turbo (6.15B DiT, Qwen3-4B, Flux VAE), 1024x1024, 8 steps, batch 1, bf16",
        "results": results,
    }


def gpu_table(s: dict) -> str:
    lines = [
        "| run | latency (s) | DiT 8 steps (s) | vs compute floor | vs full | max allocated (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["results"]:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} | | | | |")
            continue
        vs_full = f"{r['vs_full']:.2f}x" if r.get("vs_full") else "-"
        lines.append(
            f"| {r['run']} | {r['latency_s']:.2f} | {r['dit_step_s'] * 8:.2f} | {r['dit_vs_floor']:.2f}x "
            f"| {vs_full} | {r['max_allocated_gb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="CPU: image side in pixels")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quants", default=",".join(CPU_QUANTS))
    ap.add_argument("--rounds", type=int, default=1, help="CPU: runs per quantization (alternating order)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--gpu", action="store_true", help="the GPU part instead of the CPU part")
    ap.add_argument("--workdir", default=tempfile.gettempdir() + "/zimage-bench", help="GPU: where the 6B files live")
    ap.add_argument("--build-only", action="store_true", help="GPU: build the random full-size files and stop")
    ap.add_argument(
        "--tokenizer",
        default=str(ROOT / "tests/fixtures/qwen25_tokenizer"),
        help="GPU: a Qwen tokenizer folder for the random model",
    )
    ap.add_argument("--runs", default=",".join(GPU_RUNS), help="GPU: MODE/QUANT or diffusers-offload, ...")
    ap.add_argument("--repeats", type=int, default=2, help="GPU: timed generations after the warm-up")
    ap.add_argument("--child", choices=["cpu", "gpu"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "cpu":
        return cpu_child(args)
    if args.child == "gpu":
        return gpu_child(args)
    summary = gpu_main(args) if args.gpu else cpu_main(args)
    if "rows" in summary:
        print("\n" + cpu_table(summary))
    elif "results" in summary:
        print("\n" + gpu_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
