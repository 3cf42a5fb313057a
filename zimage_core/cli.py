"""The ``zimage`` command line: ``generate``, ``convert`` and ``info``.

Bad input (a missing file, the wrong kind of checkpoint, a size that is not a multiple of 16, an
unknown sampler) ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import validate, version
from .commandline import Parser, add_debug_flag, run_command
from .errors import ZImageError

log = logging.getLogger("zimage")


_Parser = Parser  # one-line usage errors that name the subcommand: "zimage generate: error: ..."


def _whole(lo: int, hi: int | None = None, what: str = "value"):
    """An argparse type: a whole number in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        try:
            return validate.int_in_range(what, v, lo, hi)
        except ZImageError as e:
            raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None

    return parse


def _number(text: str) -> float:
    """An argparse type: a finite number (nan and inf are refused here, not after the run)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return v


def _vae_tile(text: str):
    """'auto', 0/off/none (no tiling) or a tile size in pixels (a multiple of 8, at least 32)."""
    t = text.strip().lower()
    if t == "auto":
        return "auto"
    if t in ("0", "off", "none"):
        return None
    try:
        v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'auto', 0 (off) or a tile size in pixels") from None
    if v < 32 or v % 8:
        raise argparse.ArgumentTypeError(f"tile size {v} must be a multiple of 8, at least 32 (or 0 = off, or auto)")
    return v


def _multiple_of_16(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 16 or v % 16:
        raise argparse.ArgumentTypeError(f"{v} is not a positive multiple of 16 (VAE x8 times patch 2)")
    return v


def _memory_mode(text: str):
    """The typed memory mode, parsed here once (the pipeline never parses it again)."""
    from .memory import parse_memory_mode

    try:
        return parse_memory_mode(text)
    except ZImageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .attention import BACKENDS
    from .dtypes import DTYPE_NAMES
    from .quant import QUANT_MODES
    from .sampling import SAMPLERS

    p = _Parser(prog="zimage", description="Z-Image (S3-DiT) inference and checkpoint tools.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and chosen")
    p.add_argument("--version", action="version", version=f"zimage {version()}")
    add_debug_flag(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="text to image (also img2img / inpainting)")
    src = g.add_argument_group("model files")
    src.add_argument("--model", help="diffusers-layout folder (transformer/, text_encoder/, tokenizer/, vae/)")
    src.add_argument("--transformer", help="DiT file (ComfyUI z_image_turbo_bf16.safetensors, or any layout)")
    src.add_argument("--text-encoder", help="Qwen3 file or folder (ComfyUI qwen_3_4b.safetensors)")
    src.add_argument("--vae", help="Flux VAE (ae.safetensors) or diffusers vae/ folder")
    src.add_argument("--tokenizer", help="tokenizer folder (default: found next to the text encoder)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default=None, help="negative prompt (used when --cfg > 1)")
    g.add_argument("--width", type=_multiple_of_16, default=1024)
    g.add_argument("--height", type=_multiple_of_16, default=1024)
    g.add_argument("--steps", type=_whole(1, 10_000, "steps"), default=8)
    g.add_argument("--cfg", type=_number, default=1.0, help="ComfyUI convention: 1 = off (Turbo), ~4 for Base")
    g.add_argument("--cfg-normalization", type=_number, default=0.0, help="cap |guided| at this x |cond| (0 = off)")
    g.add_argument("--cfg-truncation", type=_number, default=1.0, help="no guidance once 1 - sigma exceeds this")
    g.add_argument("--shift", type=_number, default=3.0)
    g.add_argument(
        "--sampler", default="euler", choices=sorted(SAMPLERS), metavar="{" + ",".join(sorted(SAMPLERS)) + "}"
    )
    g.add_argument("--seed", type=_whole(0, validate.SEED_MAX, "seed"), default=0)
    g.add_argument("--batch", type=_whole(1, 4096, "batch"), default=1)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="weights and compute (torch names too)"
    )
    g.add_argument(
        "--max-length", type=_whole(0, None, "max length"), default=512, help="prompt token limit (0 = none)"
    )
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="repeatable")
    g.add_argument("--init-image", help="start from this image (img2img)")
    g.add_argument("--denoise", type=_number, default=1.0, help="img2img strength (ComfyUI denoise)")
    g.add_argument("--mask", help="inpainting mask image (white = repaint); needs --init-image")
    g.add_argument("--vae-tile", type=_vae_tile, default="auto", help="VAE tile size in pixels, 'auto' or 0 (off)")
    add_control_arguments(g)
    perf = g.add_argument_group("memory and speed (never change the image, except --quant)")
    perf.add_argument(
        "--memory",
        type=_memory_mode,
        default="auto",
        metavar="{auto,full,text-encoder-offload,block-swap:N,sequential}",
        help="where weights live: auto picks the fastest mode that fits the free VRAM; block-swap:N "
        "streams N DiT blocks from pinned host memory; sequential streams all of them",
    )
    perf.add_argument(
        "--quant",
        default="none",
        choices=QUANT_MODES,
        help="weight quantization of the DiT and text encoder (GGUF and pre-quantized files are "
        "recognised by themselves)",
    )
    perf.add_argument(
        "--attention",
        default="auto",
        choices=BACKENDS,
        help="attention kernel; auto: FlashAttention 3/2 when installed and usable, else SDPA",
    )
    perf.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (slow first run)")
    g.add_argument(
        "--out",
        required=True,
        help="output PNG (or .jpg/.webp, parameters in EXIF); with --batch B: <stem>_<i><suffix>",
    )
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="rewrite a DiT checkpoint in another layout, losslessly")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--layout", required=True, choices=["comfyui", "diffusers", "zimage"])
    c.add_argument("--dtype", default="keep", choices=["keep", *DTYPE_NAMES])
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="what a model file is: DiT, text encoder, VAE or LoRA, with its layout and config")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)
    return p


def output_paths(out: str, n: int) -> list[Path]:
    p = Path(out)
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]


def generate_options(args):
    """The typed, validated request of ``zimage generate`` and its checked inputs, before any model is loaded:
    options (ranges, finiteness), the device, every output path, the LoRA files and the init image and mask
    (fully decoded). Returns ``(options, device, loras, init image, mask image)``."""
    from .options import GenerateOptions

    if args.mask and not args.init_image:
        raise ZImageError("--mask needs --init-image (the picture to inpaint).")
    controls = control_specs(args)
    opts = GenerateOptions(
        prompt=args.prompt,
        negative=args.negative,
        width=args.width,
        height=args.height,
        steps=args.steps,
        cfg=args.cfg,
        shift=args.shift,
        sampler=args.sampler,
        seed=args.seed,
        batch=args.batch,
        cfg_normalization=args.cfg_normalization,
        cfg_truncation=args.cfg_truncation,
        max_length=args.max_length or None,
        denoise=args.denoise,
        controls=controls,
    )
    opts.validate()
    device = validate.device(args.device)
    for path in output_paths(args.out, len(opts.prompts())):
        validate.writable_path(path, "--out", validate.IMAGE_SUFFIXES)
    loras = _parse_loras(args.lora)
    for path, _ in loras:
        validate.readable_file(path, "--lora file")
    init = validate.readable_image(args.init_image, "--init-image") if args.init_image else None
    mask = validate.readable_image(args.mask, "--mask") if args.mask else None
    return opts, device, loras, init, mask


def cmd_generate(args) -> int:
    from .oneshot import prepare
    from .outputs import save_image
    from .pipeline import ZImagePipeline

    opts, device, loras, init_img, mask_img = generate_options(args)
    prepare()  # one job, then exit: recycle freed memory, collect garbage cheaply
    t0 = time.perf_counter()
    # One-shot: each component is loaded just before its stage and freed right after (files are checked now).
    pipe = ZImagePipeline.load(
        args.model,
        args.transformer,
        args.text_encoder,
        args.vae,
        args.tokenizer,
        device=device,
        dtype=args.dtype,
        memory=args.memory,
        quant=args.quant,
        attention=args.attention,
        compile=args.compile,
        loras=loras,
        lazy=True,
    )
    tile = args.vae_tile
    pipe.check_controls(opts.controls)  # ControlNet headers against the DiT's, before anything loads
    pipe.check_request(opts)  # the size and batch fit the device (from the files' headers, nothing loaded)
    init, mask = _init_latents(pipe, opts, init_img, mask_img) if init_img is not None else (None, None)
    images = pipe.generate(opts, init_latents=init, mask=mask, tile=tile)
    params = {
        "prompt": opts.prompt,
        "negative": opts.negative,
        "width": opts.width,
        "height": opts.height,
        "steps": opts.steps,
        "cfg": opts.cfg,
        "shift": opts.shift,
        "sampler": opts.sampler,
        "seed": opts.seed,
        "batch": opts.batch,
        "loras": args.lora,
        "model": args.model or args.transformer,
        "generator": "zimage",
    }
    if args.quant != "none":
        params["quant"] = args.quant
    if opts.controls:
        params["controlnets"] = [
            {"controlnet": c.name(), "strength": c.strength, "start": c.start, "end": c.end} for c in opts.controls
        ]
    for i, (img, path) in enumerate(zip(images, output_paths(args.out, len(images)))):
        save_image(img, path, {**params, "index": i})  # atomic: a temporary name, then a rename
        log.info("wrote %s", path)
    log.info("done in %.1fs", time.perf_counter() - t0)
    return 0


# ---- ControlNet flags ---------------------------------------------------------------------------------------
CONTROL_PER_NET = (
    ("control_image", "--control-image"),
    ("control_strength", "--control-strength"),
    ("control_start", "--control-start"),
    ("control_end", "--control-end"),
    ("control_inpaint_image", "--control-inpaint-image"),
    ("control_mask", "--control-mask"),
)


def add_control_arguments(g: argparse.ArgumentParser) -> None:
    """``--controlnet FILE --control-image IMG [--control-strength ...]``, repeatable for several ControlNets.

    Pairing rule: the i-th value of each ``--control-*`` flag goes with the i-th ``--controlnet``; a flag given
    once applies to every ControlNet; any other count is an error.
    """
    c = g.add_argument_group(
        "ControlNet (Z-Image Fun ControlNet Union 1.0 / 2.x / lite / Tile)",
        "Repeat --controlnet for several; the i-th value of each --control-* flag goes with the i-th "
        "--controlnet, and a flag given once applies to all of them.",
    )
    c.add_argument("--controlnet", action="append", default=[], metavar="FILE", help="ControlNet file (repeatable)")
    c.add_argument(
        "--control-image", action="append", default=[], metavar="IMG", help="preprocessed control image (canny, ...)"
    )
    c.add_argument(
        "--control-strength", action="append", default=[], type=_number, metavar="S", help="hint scale (default 0.75)"
    )
    c.add_argument(
        "--control-start", action="append", default=[], type=_number, metavar="F", help="first fraction of steps (0)"
    )
    c.add_argument("--control-end", action="append", default=[], type=_number, metavar="F", help="last fraction (1)")
    c.add_argument(
        "--control-inpaint-image",
        action="append",
        default=[],
        metavar="IMG",
        help="2.x files: the image to keep outside --control-mask (not --init-image's img2img)",
    )
    c.add_argument(
        "--control-mask", action="append", default=[], metavar="MASK", help="2.x files: white = generate there"
    )


def control_specs(args) -> list:
    """The ControlSpecs of the ``--controlnet``/``--control-*`` flags (pairing rule: :func:`add_control_arguments`);
    values and files are checked later by ``GenerateOptions.validate``, before any model loads."""
    from .controls import ControlSpec

    nets = list(args.controlnet)
    if not nets:
        given = [flag for attr, flag in CONTROL_PER_NET if getattr(args, attr)]
        if given:
            raise ZImageError(f"{', '.join(given)} given without --controlnet FILE.")
        return []
    n = len(nets)
    per: dict[str, list] = {}
    for attr, flag in CONTROL_PER_NET:
        vals = list(getattr(args, attr))
        if len(vals) not in (0, 1, n):
            raise ZImageError(
                f"{len(vals)} {flag} values for {n} --controlnet files; give one per --controlnet (in the same "
                "order), or one for all."
            )
        per[attr] = vals * n if len(vals) == 1 else vals
    if not per["control_image"]:
        raise ZImageError("--controlnet needs --control-image IMG (the preprocessed control picture).")
    defaults = {"control_strength": 0.75, "control_start": 0.0, "control_end": 1.0}
    out = []
    for i, net in enumerate(nets):
        v = {k: (vals[i] if vals else defaults.get(k)) for k, vals in per.items()}
        out.append(
            ControlSpec(
                controlnet=net,
                image=v["control_image"],
                strength=v["control_strength"],
                start=v["control_start"],
                end=v["control_end"],
                inpaint_image=v["control_inpaint_image"],
                mask=v["control_mask"],
            )
        )
    return out


def _parse_loras(specs: list[str]) -> list[tuple[str, float]]:
    if not specs:
        return []
    from .lora import parse_lora_arg

    return [parse_lora_arg(spec) for spec in specs]


def _init_latents(pipe, opts, init_img, mask_img):
    """Encode the img2img start image (VAE mean) and the optional inpainting mask at latent size."""
    import numpy as np
    import torch
    from PIL import Image

    from .sampling import prepare_mask
    from .vae import pil_to_tensor

    img = init_img.convert("RGB").resize((opts.width, opts.height), Image.LANCZOS)
    x0 = pipe.encode_image(pil_to_tensor([img]))
    mask = None
    if mask_img is not None:
        m = mask_img.convert("L").resize((opts.width, opts.height), Image.NEAREST)
        mask = prepare_mask(torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0), x0.shape[-2], x0.shape[-1])
    return x0, mask


def cmd_convert(args) -> int:
    from .checkpoints import convert_dit

    if not Path(args.src).is_dir():
        validate.readable_file(args.src, "convert SRC")
    validate.writable_path(args.dst, "convert DST", folder_ok=args.layout == "diffusers")
    out = convert_dit(args.src, args.dst, args.layout, None if args.dtype == "keep" else args.dtype)
    log.info("wrote %s (%s layout)", out, args.layout)
    return 0


def cmd_info(args) -> int:
    from .fileinfo import describe_file  # DiT (layout, config, quantization), text encoder, VAE or LoRA

    sys.stdout.write(json.dumps(describe_file(args.path), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(f"zimage {args.command}", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
