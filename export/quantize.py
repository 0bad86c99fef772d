"""``ip2p quantize``: an ONNX bundle in, a bundle with an int8 UNet for OpenVINO out (opt-in, approximate).

The UNet's weights and activations are quantized to int8 by NNCF's post-training quantization (its
transformer preset: SmoothQuant, then per-channel weights and per-tensor activations, then bias correction),
calibrated on the UNet inputs of real edits: the engine's own loop runs the calibration edits on OpenVINO in
float32 and records every UNet call, all guidance rows and every step, so the statistics are those of the
distribution the model meets when editing. The other networks are kept as they are. The result is an
``openvino`` bundle: the same manifest, the UNet as an OpenVINO IR (``unet.xml`` and ``unet.bin``) that only
the openvino backend runs. Its cost in quality is measured with ``ip2p eval``, not assumed (docs/export.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from engine.errors import ExportError, InputError, quote_error
from engine.files import write_json_atomic
from engine.manifest import (MANIFEST_NAME, Bundle, CalibrationRecord, Component, FileEntry, Quantization, file_entry,
                             read_bundle)
from export.staging import prepare_output, staging_folder, swap_into_place

log = logging.getLogger(__name__)

IR_FORMAT = "openvino"  # a bundle whose UNet is an OpenVINO IR


@dataclass(frozen=True)
class Calibration:
    """The edits the UNet's activation ranges are measured on."""

    data: Path  # a folder with metadata.jsonl: input_image (or original_image) and edit_prompt per line
    edits: int = 32  # how many of its edits to run
    steps: int | None = None  # denoising steps per edit (None: the default edit's)
    samples: int = 300  # UNet calls NNCF takes its statistics from, spread over all recorded calls


def read_edits(folder: Path, count: int) -> list[tuple[Path, str]]:
    """The first ``count`` (image path, instruction) pairs of ``folder/metadata.jsonl``, as ``ip2p train``'s
    folder format writes them."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: not found; --data takes a folder of edits with a metadata.jsonl "
                         "(input_image and edit_prompt per line), as `ip2p synth` writes")
    edits: list[tuple[Path, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, prompt = row.get("input_image", row.get("original_image")), row["edit_prompt"]
        except (json.JSONDecodeError, AttributeError, KeyError):
            raise InputError(f"{path}:{number}: not a JSON object with input_image and edit_prompt") from None
        if not isinstance(image, str) or not isinstance(prompt, str):
            raise InputError(f"{path}:{number}: input_image and edit_prompt must be strings")
        edits.append((folder / image, prompt))
        if len(edits) == count:
            break
    if not edits:
        raise InputError(f"{path}: holds no edits")
    return edits


class RecordingBackend:
    """A backend that runs another and keeps a copy of the inputs of every call to one component."""

    def __init__(self, backend: Any, component: str):
        self.backend, self.component = backend, component
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        if component == self.component:
            self.calls.append({name: np.array(value, dtype=np.float32) for name, value in inputs.items()})
        return self.backend.run(component, inputs)

    def __getattr__(self, name: str) -> Any:  # has, asarray, to_numpy, concat, constant, macs, value_bytes
        return getattr(self.backend, name)


def record_unet_inputs(bundle: Bundle, calibration: Calibration, progress: bool) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs at every call of the calibration edits, run by the engine on OpenVINO in float32."""
    from engine.backends import openvino_backend
    from engine.pipeline import EditPipeline
    from engine.tokenizer import ClipTokenizer

    edits = read_edits(calibration.data, calibration.edits)
    recorder = RecordingBackend(openvino_backend.load(bundle, dtype="float32"), bundle.model.unet_component)
    pipe = EditPipeline(recorder, bundle.model, ClipTokenizer(bundle.tokenizer_dir),
                        null_embedding=np.load(bundle.null_embedding_file), profile=bundle.profile, progress=False)
    for seed, (image, instruction) in enumerate(tqdm(edits, desc="calibrating", unit="edit", disable=not progress)):
        pipe.edit(image, instruction, steps=calibration.steps, seed=seed)
    return recorder.calls


def split_calls(calls: list, samples: int) -> tuple[list, list]:
    """(up to ``samples`` calls to calibrate on, evenly spread so every step is represented; about 8 others held
    back to measure the error on). With a single call, it is both."""
    held_back = set(range(1, len(calls), max(2, len(calls) // 8))) if len(calls) > 1 else set()
    rest = [call for i, call in enumerate(calls) if i not in held_back]
    if len(rest) > samples:
        rest = [rest[i] for i in np.linspace(0, len(rest) - 1, samples).round().astype(int)]
    return rest, [calls[i] for i in sorted(held_back)] or rest


def relative_error(reference: Any, quantized: Any, calls: list[dict[str, np.ndarray]]) -> float:
    """||int8 - float|| / ||float|| of the UNet's outputs over ``calls``."""
    num = den = 0.0
    for inputs in calls:
        want = next(iter(reference(inputs).values()))
        got = next(iter(quantized(inputs).values()))
        num += float(np.sum((got - want) ** 2))
        den += float(np.sum(want ** 2))
    return (num / max(den, 1e-30)) ** 0.5


def quantize_unet(path: Path, calls: list[dict[str, np.ndarray]], samples: int, progress: bool) -> tuple[Any, float]:
    """The UNet graph at ``path`` quantized on ``calls`` (an ov.Model), and its relative output error on
    calls it was not calibrated on. ``progress``: show NNCF's own progress bars (written to stdout)."""
    import nncf
    import openvino as ov

    chosen, held = split_calls(calls, samples)
    model = ov.Core().read_model(str(path))
    with contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(chosen), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(chosen), preset=nncf.QuantizationPreset.MIXED)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    error = relative_error(core.compile_model(model, "CPU", config), core.compile_model(quantized, "CPU", config),
                           held)
    return quantized, error


def quantize_bundle(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, calibration: Calibration,
                    force: bool = False, progress: bool = True) -> tuple[Path, float]:
    """Write ``out_dir``: the ONNX bundle at ``bundle_dir`` with its UNet quantized to int8 (an OpenVINO IR).
    Returns the folder and the UNet's relative output error on held-back calibration calls."""
    from engine.extras import import_extra

    nncf = import_extra("nncf", "ip2p quantize")
    import openvino as ov

    out = Path(out_dir)
    prepare_output(out, force)
    bundle = read_bundle(bundle_dir)
    if bundle.format != "onnx":
        raise InputError(f"{bundle.folder}: an {bundle.format} bundle; quantize an ONNX bundle (`ip2p export`)")
    if calibration.edits < 1 or calibration.samples < 1:
        raise InputError("--edits and --samples must be at least 1")
    calls = record_unet_inputs(bundle, calibration, progress)
    log.info("recorded %d UNet calls of %d edits", len(calls), calibration.edits)
    try:
        quantized, error = quantize_unet(bundle.component_file(bundle.model.unet_component), calls, calibration.samples,
                                         progress)
    except InputError:
        raise
    except Exception as err:
        raise ExportError(f"unet: quantization failed ({quote_error(err)})") from err
    log.info("int8 UNet: relative output error %.4f on held-back calibration calls", error)

    staging = staging_folder(out)
    try:
        ov.save_model(quantized, str(staging / "unet.xml"), compress_to_fp16=False)
        for entry in [*bundle.manifest.tokenizer.files, bundle.manifest.null_embedding]:
            _copy(bundle.folder, staging, entry.path)
        quantization = Quantization(
            tool=f"nncf {nncf.__version__}, openvino {ov.get_version().split('-')[0]}",
            method="post-training, transformer preset (SmoothQuant), mixed symmetric/asymmetric",
            calibration=CalibrationRecord(str(calibration.data), calibration.edits, calibration.steps, len(calls)),
            unet_relative_error=error,
        )
        manifest = replace(bundle.manifest, format=IR_FORMAT, precision="int8", quantization=quantization,
                           components=_ir_components(bundle, staging))
        write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
        swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, error


def _ir_components(bundle: Bundle, staging: Path) -> dict[str, Component]:
    """The bundle's components with their files copied into the staging folder, the UNet's the int8 IR there."""
    components = {}
    for name, component in bundle.manifest.components.items():
        if name == bundle.model.unet_component:
            files = (file_entry(staging, staging / "unet.xml"), file_entry(staging, staging / "unet.bin"))
            components[name] = replace(component, precision="int8", files=files)
        else:
            files = tuple(_copy(bundle.folder, staging, f.path) for f in component.files)
            components[name] = replace(component, files=files)
    return components


def _copy(source: Path, staging: Path, relative: str) -> FileEntry:
    """Copy one bundle file into the staging folder; its manifest entry."""
    target = staging / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / relative, target)
    return file_entry(staging, target)
