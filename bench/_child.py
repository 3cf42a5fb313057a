"""One timed generation in a fresh process (so peak RSS is this run's alone); prints one JSON line.

python bench/_child.py zimage|diffusers MODEL_DIR OUT.png WIDTH HEIGHT STEPS SEED [extra zimage args...]
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    engine, model, out, width, height, steps, seed, *extra = sys.argv[1:]
    t0 = time.perf_counter()
    if engine == "zimage":
        from zimage_core.cli import main as cli

        rc = cli(
            [
                "generate",
                "--model",
                model,
                "--prompt",
                PROMPT,
                "--width",
                width,
                "--height",
                height,
                "--steps",
                steps,
                "--seed",
                seed,
                "--device",
                "cpu",
                "--out",
                out,
                *extra,
            ]
        )
        if rc:
            raise SystemExit(rc)
    else:
        import torch
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        img = pipe(
            prompt=PROMPT,
            height=int(height),
            width=int(width),
            num_inference_steps=int(steps),
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(int(seed)),
        ).images[0]
        img.save(out)
    wall = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    print(json.dumps({"engine": engine, "wall_s": wall, "peak_rss_mb": peak_mb}))


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM); ru_maxrss would include the parent's peak before exec."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PROMPT = "a watercolor painting of a red fox sitting in fresh snow, soft morning light, pine trees behind"

if __name__ == "__main__":
    main()
