"""Full-resolution edits: peak resident memory and time, and what tiling and ``keep_detail`` cost in pixels.

``python -m benchmarks.highres memory --json OUT.json``: one-step edits of the random-weight sd15 model (bfloat16,
torch; 1 and 3 UNet rows) at full size, and the VAE alone (encode + decode) at 4096x4096, beside diffusers'
pipeline (bfloat16, channels-last; with and without ``vae.enable_tiling()``). Every run is a process of its own,
watched: its peak resident set is recorded, and it is killed ("does not fit") past ``--cap-gib``.

``python -m benchmarks.highres tiles --json OUT.json``: tiled against whole VAE encode and decode (PSNR of the
decoded pictures) on the shipped shapes model, whose VAE is trained (the sd15 model's is random: its pictures
mean nothing).

``python -m benchmarks.highres detail --count 300 --json OUT.json``: held-out shapes scenes blown up 8x with
added texture, edited with ``keep_detail`` and with the plain ``keep_size`` resize: PSNR of the untouched parts
against the input, and the edit's success (scored on the result scaled back to the scene's size).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
PROMPT = "make it snowy"
EDIT_SIZES = ((1024, 1024), (1920, 1080), (2048, 2048))
VAE_SIZE = (4096, 4096)
SCALE = 8  # keep_detail: the scenes blown up this much
# the engine's systems: the torch backend in bfloat16 on a diffusers folder; onnxruntime on an fp32 bundle, with its
# attention fused (the default) and the graphs as exported (the score matrix whole)
RUNTIMES = {"engine": dict(backend="torch", dtype="bfloat16"), "onnxruntime": dict(backend="onnxruntime"),
            "onnxruntime-unfused": dict(backend="onnxruntime", backend_options={"fused_attention": False})}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture with some fine texture (no photo can be downloaded here)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 64 + 2, width // 64 + 2, 3)).astype(np.float32)
    base = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC),
                      np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


# -- one measured run, in a process of its own ------------------------------------------------------------------
def run_one(system: str, width: int, height: int, rows: int, what: str, model: str) -> dict:
    """Time one full-size edit (``what`` "edit": one step, ``rows`` UNet rows) or VAE round trip ("vae")."""
    import torch

    torch.manual_seed(0)
    image = photo(width, height)
    scales = dict(text_guidance=7.5, image_guidance=1.5) if rows == 3 else dict(text_guidance=1.0, image_guidance=1.0)
    if system in RUNTIMES:
        from engine import EditPipeline
        from engine import images as imaging

        pipe = EditPipeline.from_pretrained(model, progress=False, **RUNTIMES[system])
        start = time.perf_counter()
        if what == "edit":
            result = pipe.edit(image, PROMPT, steps=1, sampler="euler", resolution=None, seed=0, output_type="np",
                               **scales)
            return {"seconds": time.perf_counter() - start, "tiles": result.tiles,
                    "rows": result.unet_evaluations[0], "timings": result.timings}
        tiles = pipe.vae_tiling("auto", image.size, 1)
        latents = pipe.encode_image(imaging.to_model_input([image]), tiles)
        pipe.decode(latents * pipe.model.scaling_factor, tiles)
        return {"seconds": time.perf_counter() - start, "tile": None if tiles is None else tiles.tile * 8}
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, torch_dtype=torch.bfloat16,
                                                                  safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if system == "diffusers-tiled":
        pipe.vae.enable_tiling()
    start = time.perf_counter()
    with torch.inference_mode():
        if what == "edit":
            pipe(PROMPT, image=image, num_inference_steps=1, guidance_scale=scales["text_guidance"],
                 image_guidance_scale=scales["image_guidance"], output_type="np")
        else:
            pixels = pipe.image_processor.preprocess(image).to(torch.bfloat16)
            latents = pipe.vae.encode(pixels).latent_dist.mode()
            pipe.vae.decode(latents).sample
    return {"seconds": time.perf_counter() - start}


def watched(args: list[str], cap_gib: float, timeout: float) -> dict:
    """Run this module's ``one`` command in a child process; its answer with the peak resident set added, or
    "does not fit" where it passed ``cap_gib`` (killed) or the time limit."""
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.highres", "one", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    peak, start, verdict = 0, time.monotonic(), None
    while child.poll() is None:
        peak = max(peak, _resident_bytes(child.pid))
        if peak > cap_gib * 2**30:
            verdict = f"does not fit: passed {cap_gib} GiB"
        elif time.monotonic() - start > timeout:
            verdict = f"stopped after {timeout:.0f} s"
        if verdict:
            child.kill()
            child.wait()
            break
        time.sleep(0.1)
    out = child.stdout.read() if child.stdout else ""
    if verdict is None and child.returncode != 0:
        verdict = f"failed (exit {child.returncode})"
    answer = json.loads(out.strip().splitlines()[-1]) if verdict is None else {"error": verdict}
    return answer | {"peak_rss_gib": round(peak / 2**30, 2)}


def _resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # the kernel's own high-water mark of the resident set
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def memory(model: str, bundle: str | None, cap_gib: float, timeout: float, only: list[str] | None) -> list[dict]:
    """The runs above, each watched in a process of its own; with ``bundle`` (the sd15 model exported for
    sides up to 1024), also onnxruntime's 1024x1024 3-row edit with its attention fused and as exported."""
    plan = [("engine", *VAE_SIZE, 0, "vae"), ("engine", 2048, 2048, 1, "edit"), ("diffusers-tiled", *VAE_SIZE, 0, "vae")]
    plan += [("engine", w, h, rows, "edit") for w, h in EDIT_SIZES for rows in (1, 3) if (w, rows) != (2048, 1)]
    plan += [(system, w, h, 1, "edit") for w, h in EDIT_SIZES for system in ("diffusers", "diffusers-tiled")]
    plan += [(system, 1024, 1024, 3, "edit") for system in ("diffusers", "diffusers-tiled")]
    plan += [(system, 1024, 1024, 3, "edit") for system in ("onnxruntime", "onnxruntime-unfused") if bundle]
    results = []
    for system, width, height, rows, what in plan:
        name = f"{system} {what} {width}x{height}" + (f" {rows} rows" if what == "edit" else "")
        if only and not any(key in name for key in only):
            continue
        log.info("%s ...", name)
        source = bundle if system.startswith("onnxruntime") else model
        answer = watched([system, str(width), str(height), str(rows), what, source], cap_gib, timeout)
        log.info("%s: %s", name, answer)
        results.append({"system": system, "what": what, "size": [width, height], "rows": rows} | answer)
    return results


# -- pictures: tiled against whole, keep_detail against keep_size -------------------------------------------------
def tiles_quality(sizes=((512, 384), (768, 768)), tiles=(64, 128, 256)) -> list[dict]:
    """PSNR of tiled against whole encode + decode on the shipped shapes model (trained VAE)."""
    from engine import EditPipeline
    from engine import images as imaging
    from training.evaluation import psnr

    pipe = EditPipeline.from_pretrained(progress=False)
    scale = pipe.model.scaling_factor
    out = []
    for width, height in sizes:
        pixels = imaging.to_model_input([photo(width, height, seed=width)])
        whole = pipe.decode(pipe.encode_image(pixels) * scale)
        for tile in tiles:
            tiling = pipe.vae_tiling(tile, (width, height), 1)
            encoded = pipe.decode(pipe.encode_image(pixels, tiling) * scale)
            decoded = pipe.decode(pipe.encode_image(pixels) * scale, tiling)
            both = pipe.decode(pipe.encode_image(pixels, tiling) * scale, tiling)
            out.append({"size": [width, height], "tile": tile, "tiles": tiling.count(height // 4, width // 4),
                        "encode_tiled_db": round(psnr(encoded, whole, 2.0), 2),
                        "decode_tiled_db": round(psnr(decoded, whole, 2.0), 2),
                        "both_tiled_db": round(psnr(both, whole, 2.0), 2),
                        "whole_vs_input_db": round(psnr(whole, pixels, 2.0), 2)})
            log.info("%s", out[-1])
    return out


def textured(image: Image.Image, seed: int) -> np.ndarray:
    """``image`` blown up SCALE times (nearest: sharp edges) with fine grain added, as uint8 (H, W, 3)."""
    big = np.asarray(image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST), np.float32)
    grain = np.random.default_rng(seed).normal(0, 8, big.shape[:2])[..., None]
    return np.clip(big + grain, 0, 255).astype(np.uint8)


def detail(count: int) -> dict:
    """Untouched-part PSNR against the textured input and success, with keep_detail and with keep_size."""
    from engine import EditPipeline
    from training.evaluation import BORDER, _grow, held_out_cases, psnr, score

    pipe = EditPipeline.from_pretrained(progress=False)
    report = {}
    cases = held_out_cases(count)
    inputs = [textured(case.image, i) for i, case in enumerate(cases)]
    for mode in ("keep_detail", "keep_size"):
        rows = []
        for start in range(0, count, 16):
            batch = list(range(start, min(start + 16, count)))
            result = pipe.edit([Image.fromarray(inputs[i]) for i in batch], [cases[i].instruction for i in batch],
                               seed=batch, output_type="np", **{mode: True})
            for i, out in zip(batch, result.images):
                case, big = cases[i], inputs[i]
                edited = (out * 255).round().astype(np.uint8)  # (8h, 8w, 3)
                untouched = np.repeat(np.repeat(~_grow(case.region, BORDER), SCALE, 0), SCALE, 1)
                small = np.asarray(Image.fromarray(edited).resize(case.image.size, Image.BOX))
                rows.append({"untouched_db": psnr(edited[untouched], big[untouched], 255.0),
                             "success": score(case, small).success})
        report[mode] = {"median_untouched_db": float(np.median([r["untouched_db"] for r in rows])),
                        "p10_untouched_db": float(np.percentile([r["untouched_db"] for r in rows], 10)),
                        "success": 100.0 * float(np.mean([r["success"] for r in rows])), "count": count}
        log.info("%s: %s", mode, report[mode])
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    one = sub.add_parser("one")
    for name in ("system", "width", "height", "rows", "what", "model"):
        one.add_argument(name)
    mem = sub.add_parser("memory")
    mem.add_argument("--model", default=str(Path.home() / ".cache/ip2p/bench/sd15"))
    mem.add_argument("--bundle", help="an fp32 ONNX bundle of sd15 taking 1024x1024: onnxruntime's runs too")
    mem.add_argument("--cap-gib", type=float, default=20.0)
    mem.add_argument("--timeout", type=float, default=1800.0)
    mem.add_argument("--only", nargs="*")
    sub.add_parser("tiles")
    det = sub.add_parser("detail")
    det.add_argument("--count", type=int, default=300)
    for part in (mem, sub.choices["tiles"], det):
        part.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.part == "one":
        print(json.dumps(run_one(args.system, int(args.width), int(args.height), int(args.rows), args.what,
                                 args.model)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.hardware import cpu_capability, device_name

    if args.part == "memory":
        figures = memory(args.model, args.bundle, args.cap_gib, args.timeout, args.only)
    elif args.part == "tiles":
        figures = tiles_quality()
    else:
        figures = detail(args.count)
    if args.json:
        from engine.files import write_json_atomic

        write_json_atomic(Path(args.json), {"cpu": device_name("cpu"), **cpu_capability(), "figures": figures})


if __name__ == "__main__":
    main()
