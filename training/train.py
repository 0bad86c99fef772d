"""The training loop: ``ip2p train``. One process or many through ``accelerate launch`` (DDP, or FSDP /
DeepSpeed from accelerate's own config).

Every step's randomness (noise, timesteps, dropout, VAE sampling, crops) is derived from (seed, step)
and the data order from (seed, epoch), so a checkpoint needs only the weights, optimiser, schedule,
EMA, step and data cursor to resume exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.backends.torch_modules import load_component
from engine.checkpoints import WEIGHT_SUFFIXES, ModelSource, resolve_model
from engine.schedules import alphas_cumprod
from engine.tokenizer import ClipTokenizer
from training.conditioning import apply_dropout
from training.config import TrainConfig
from training.data import PairedData
from training.model import expand_conv_in
from training.recipe import prepare

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


class DataCursor:
    """Examples in a per-epoch permutation from (seed, epoch); ``position`` counts examples consumed."""

    def __init__(self, size: int, seed: int, position: int = 0):
        self.size, self.seed, self.position = size, seed, position
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def next_index(self) -> int:
        epoch, offset = divmod(self.position, self.size)
        if epoch != self._epoch:  # one permutation per epoch, not per example
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        self.position += 1
        return int(self._order[offset])


def next_batch(data: PairedData, cursor: DataCursor, count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` good examples; bad ones are skipped (and counted by the dataset)."""
    batch: list[dict] = []
    for _ in range(count * 10 + len(data)):
        example = data.load(cursor.next_index(), rng)
        if example is not None:
            batch.append(example)
            if len(batch) == count:
                return batch
    raise RuntimeError(f"{data.source}: could not find {count} readable examples")


class PairEncoder:
    """The frozen VAE's encodings of a batch of training pairs: the edited image's posterior mean and std
    (a fresh latent is sampled from them every step) and the input image's mode.

    With ``cache_mb`` > 0 the encodings of each pair are kept in memory, keyed by the exact pixels after
    crop and flip, until ``cache_mb`` is used up. A pair seen again with the same crop and flip (a small
    dataset at its own resolution, over many epochs) then costs no VAE pass; results are unchanged.
    """

    def __init__(self, vae, device, cache_mb: int = 0):
        self.vae, self.device, self.limit = vae, device, cache_mb * 2**20
        self.entries: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.used = self.hits = self.misses = 0

    @torch.no_grad()
    def _encode(self, source: np.ndarray, edited: np.ndarray) -> tuple[torch.Tensor, ...]:
        posterior = self.vae.encode(torch.from_numpy(edited).to(self.device)).latent_dist
        image_latents = self.vae.encode(torch.from_numpy(source).to(self.device)).latent_dist.mode()
        return posterior.mean, posterior.std, image_latents  # each (B, 4, h, w)

    def __call__(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = np.stack([e["input"] for e in examples])  # (B, 3, H, W) in [-1, 1]
        edited = np.stack([e["edited"] for e in examples])
        if self.limit <= 0:
            return self._encode(source, edited)
        keys = [hashlib.blake2b(s.tobytes() + e.tobytes(), digest_size=16).digest() for s, e in zip(source, edited)]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            encoded = self._encode(source[missing], edited[missing])
            for row, i in enumerate(missing):
                fresh[keys[i]] = tuple(t[row].clone() for t in encoded)
                size = sum(t.numel() * t.element_size() for t in fresh[keys[i]])
                if self.used + size <= self.limit:
                    self.entries[keys[i]] = fresh[keys[i]]
                    self.used += size
        rows = [self.entries.get(k) or fresh[k] for k in keys]
        return tuple(torch.stack(parts) for parts in zip(*rows))


def _checkpoint_paths(output: Path) -> list[Path]:
    return sorted((output / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def train(config: TrainConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Fine-tune and write a diffusers-format InstructPix2Pix model to ``config.output``."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    if config.recipe is not None:
        base, data_dir = prepare(config.recipe, Path(config.output) / "recipe", config.seed, progress)
        config = dataclasses.replace(config, base=str(base), data=str(data_dir))
    data = PairedData(config.data, config.resolution)  # bad data fails before any model loads
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision)
    source = resolve_model(config.base, variant=config.base_variant)
    folder, output = source.folder, Path(config.output)
    tokenizer = ClipTokenizer(folder / "tokenizer")
    vae = load_component(source, "vae").requires_grad_(False).to(accelerator.device)
    text_encoder = load_component(source, "text_encoder").requires_grad_(False).to(accelerator.device)
    unet = expand_conv_in(load_component(source, "unet")).train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    acp = torch.from_numpy(alphas_cumprod(scheduler_config)).to(accelerator.device)  # (T,)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    scaling = float(vae.config.scaling_factor)
    with torch.no_grad():
        null_text = text_encoder(torch.from_numpy(tokenizer([""])).to(accelerator.device))[0]  # (1, 77, D)
    encoder = PairEncoder(vae, accelerator.device, config.latent_cache_mb)

    optimizer = _optimizer(config)(unet.parameters(), lr=config.lr, weight_decay=config.adam_weight_decay)
    lr_schedule = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                num_training_steps=max(config.max_steps, 1))
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True) if config.ema_decay > 0 else None
    cursor = DataCursor(len(data), config.seed)
    step = 0
    if resume:
        step = _load_checkpoint(_resume_path(output, resume), unet, optimizer, lr_schedule, ema, cursor)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    if ema is not None:
        ema.to(accelerator.device)

    per_process = config.batch_size
    bar = tqdm(total=config.max_steps, initial=step, desc="training", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    started, first_step, losses = time.perf_counter(), step, []
    while step < config.max_steps:
        for micro in range(config.grad_accum):
            rng = np.random.default_rng([config.seed, step, micro])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            # Every process reads the whole global batch and keeps its share: the cursor stays identical on
            # all processes (exact resume) at the cost of decoding other processes' images too.
            examples = next_batch(data, cursor, per_process * accelerator.num_processes, rng)
            mine = examples[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
            with accelerator.accumulate(unet):
                loss = _loss(mine, unet, encoder, text_encoder, tokenizer, null_text, acp, scaling, prediction_type,
                             config.conditioning_dropout, gen, accelerator.device)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad()
            losses.append(loss.detach().item())
        step += 1
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        rate = (step - first_step) * config.batch_size * config.grad_accum * accelerator.num_processes / (
            time.perf_counter() - started)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_per_s=f"{rate:.1f}")
        bar.update()
        if accelerator.is_main_process and config.log_every and step % config.log_every == 0:
            _log_row(output, step, float(np.mean(losses[-config.log_every * config.grad_accum:])),
                     lr_schedule.get_last_lr()[0], rate)
        if accelerator.is_main_process and config.validate_every and step % config.validate_every == 0:
            _validate(output, step, accelerator.unwrap_model(unet), vae, text_encoder, tokenizer, folder, data, config)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            _save_checkpoint(accelerator, output, step, unet, optimizer, lr_schedule, ema, cursor, config)
    bar.close()
    if encoder.hits:
        log.info("latent cache: %d hits, %d misses, %.0f MB", encoder.hits, encoder.misses, encoder.used / 2**20)
    if data.skipped.total:
        log.warning("%s", data.skipped.summary())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(final.parameters())
        _save_model(source, final, output, config, losses)
    return output


def _optimizer(config: TrainConfig):
    if not config.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        from engine.errors import InputError

        raise InputError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit


def _log_row(output: Path, step: int, loss: float, lr: float, rate: float) -> None:
    """One row of <output>/log.csv (step, loss, lr, images/s); TensorBoard or others can read it."""
    path = output / "log.csv"
    output.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("step,loss,lr,images_per_second\n")
        f.write(f"{step},{loss:.6f},{lr:.6g},{rate:.3f}\n")


def _validate(output, step, unet, vae, text_encoder, tokenizer, folder, data, config) -> None:
    """Edit the first training pair's input with its instruction using the current weights; save the
    input, the edit and the target side by side in <output>/validation/step-N.png."""
    from PIL import Image

    from engine.backends.torch_backend import TorchBackend
    from engine.backends.torch_modules import wrap_components
    from engine.config import model_config_from
    from engine.pipeline import EditPipeline

    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    model = model_config_from(unet.config, vae.config, text_encoder.config.to_dict(), scheduler)
    device = next(unet.parameters()).device
    pipe = EditPipeline(TorchBackend(wrap_components(unet, vae, text_encoder), device, torch.float32), model,
                        tokenizer, progress=False)
    source, prompt, target = next(found for i in range(len(data)) if (found := data.images(i)) is not None)
    edited = pipe.edit(source, prompt, steps=config.validation_steps, seed=0, resolution=config.resolution).images[0]
    size = edited.size
    sheet = Image.new("RGB", (size[0] * 3, size[1]))
    for i, im in enumerate((source, edited, target)):
        sheet.paste(im.resize(size), (i * size[0], 0))
    (output / "validation").mkdir(parents=True, exist_ok=True)
    sheet.save(output / "validation" / f"step-{step}.png")
    unet.train()


def _loss(examples, unet, encoder: PairEncoder, text_encoder, tokenizer, null_text, acp, scaling, prediction_type, p,
          gen, device):
    """Denoising loss of one batch with the paper's conditioning dropout."""
    b = len(examples)
    mean, std, image_latents = encoder(examples)  # image latents unscaled, as InstructPix2Pix conditions
    with torch.no_grad():
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(device)) * scaling
        text = text_encoder(torch.from_numpy(tokenizer([e["prompt"] for e in examples])).to(device))[0]
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = torch.randint(0, acp.shape[0], (b,), generator=gen).to(device)
    a = acp[t].sqrt()[:, None, None, None]
    s = (1 - acp[t]).sqrt()[:, None, None, None]
    noisy = a * latents + s * noise
    text, image_latents = apply_dropout(text, null_text, image_latents, torch.rand(b, generator=gen).to(device), p)
    pred = unet(torch.cat([noisy, image_latents], 1), t, text).sample
    target = noise if prediction_type == "epsilon" else a * noise - s * latents
    return F.mse_loss(pred.float(), target.float())


def _resume_path(output: Path, resume: str) -> Path:
    if resume == "latest":
        found = _checkpoint_paths(output)
        if not found:
            from engine.errors import InputError

            raise InputError(f"{output}: no checkpoint to resume from")
        return found[-1]
    return Path(resume)


def _save_checkpoint(accelerator, output, step, unet, optimizer, lr_schedule, ema, cursor, config,
                     extra: dict | None = None) -> None:
    """<output>/checkpoints/step-N, written whole or not at all; ``extra``: more modules to keep (by name)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    target = output / CHECKPOINTS / f"step-{step}"
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"unet": accelerator.unwrap_model(unet).state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "step": step, "cursor": cursor.position, "config": dataclasses.asdict(config),
                "extra": {name: module.state_dict() for name, module in (extra or {}).items()}}, tmp / "state.pt")
    tmp.rename(target)
    for old in _checkpoint_paths(output)[: -config.keep_checkpoints]:
        shutil.rmtree(old)


def _load_checkpoint(path: Path, unet, optimizer, lr_schedule, ema, cursor, extra: dict | None = None) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    unet.load_state_dict(state["unet"])
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    for name, module in (extra or {}).items():
        module.load_state_dict(state["extra"][name])
    cursor.position = state["cursor"]
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def _save_model(source: ModelSource, unet, output: Path, config: TrainConfig, losses: list[float]) -> None:
    """Diffusers format: the base's VAE, text encoder (the weight files trained with) and tokenizer, the new
    UNet, an Euler-ancestral scheduler."""
    base = source.folder
    copy_frozen_parts(source, output)
    unet.save_pretrained(output / "unet")
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    scheduler["_class_name"] = "EulerAncestralDiscreteScheduler"
    (output / "scheduler").mkdir(exist_ok=True)
    (output / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = json.loads((base / "model_index.json").read_text()) if (base / "model_index.json").is_file() else {}
    index.update({"_class_name": "StableDiffusionInstructPix2PixPipeline",
                  "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    (output / "model_index.json").write_text(json.dumps(index, indent=2))
    (output / "training_config.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "final_loss": float(np.mean(losses[-20:])) if losses else None}, indent=2))
    if config.save_dtype == "float16":
        save_half_precision(output)


def copy_frozen_parts(source: ModelSource, output: Path) -> None:
    """The base's tokenizer, VAE and text encoder (the weight files trained with) into diffusers folder ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.folder / "tokenizer", output / "tokenizer", dirs_exist_ok=True)
    for name in ("vae", "text_encoder"):
        (output / name).mkdir(exist_ok=True)
        kept = source.weights(name).files
        for path in (source.folder / name).iterdir():
            if path.is_file() and (path in kept or path.suffix not in WEIGHT_SUFFIXES):
                shutil.copy2(path, output / name / path.name)


def save_half_precision(model_dir: Path) -> None:
    """Rewrite every component's safetensors weights of a diffusers folder in float16, each file atomically."""
    from safetensors.torch import load_file, save_file

    for path in sorted(Path(model_dir).glob("*/*.safetensors")):
        weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(weights, tmp, metadata={"format": "pt"})
        tmp.replace(path)
