"""Training from nothing: the stages that come before the UNet when there is no base model to fine-tune.

A config with a ``recipe`` section (training/configs/shapes.yaml) builds its own base model and data in
``<output>/recipe/``: synthetic pairs, a random-weight model of a named architecture, then a VAE trained on
the data's images and checked (reconstruction PSNR on images it never saw) before the UNet stage starts.
Each stage leaves a finished folder behind, so a rerun skips what is done.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import InputError
from training.evaluation import psnr
from training.synthetic import edit_probabilities, generate, shape_probabilities

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticData:
    count: int = 20000
    seed: int = 1  # evaluation uses other seeds (training/evaluation.py)
    size: int = 64
    shape_weights: tuple[float, float, float] | None = None  # of 1, 2, 3 shapes per scene; None: equal
    edit_weights: tuple[float, float, float] | None = None  # of recolour, background, remove; None: even

    def __post_init__(self) -> None:  # bad weights are refused here, when the config loads
        if self.shape_weights is not None:
            shape_probabilities(self.shape_weights)
        if self.edit_weights is not None:
            edit_probabilities(self.edit_weights)


@dataclass(frozen=True)
class VaeStage:
    steps: int = 2000
    batch_size: int = 32
    crop: int = 32  # the VAE is convolutional: small random crops train it faster
    lr: float = 1e-3
    kl_weight: float = 1e-6
    images: int = 4000  # training images held in memory
    holdout: int = 200  # images kept out, for the PSNR check
    min_psnr: float = 30.0  # dB; below it the recipe stops before the UNet stage


@dataclass(frozen=True)
class Recipe:
    architecture: str = "shapes"  # engine.random_models.ARCHITECTURES
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    vae: VaeStage = field(default_factory=VaeStage)

    @staticmethod
    def from_dict(values: dict, source: str) -> "Recipe":
        unknown = set(values) - {"architecture", "synthetic", "vae"}
        if unknown:
            raise InputError(f"{source}: unknown recipe option(s) {', '.join(sorted(unknown))}")
        try:
            return Recipe(architecture=values.get("architecture", "shapes"),
                          synthetic=SyntheticData(**values.get("synthetic", {})), vae=VaeStage(**values.get("vae", {})))
        except (TypeError, InputError) as err:
            raise InputError(f"{source}: bad recipe option ({err})") from None


def prepare(recipe: Recipe, folder: Path, seed: int, progress: bool = True) -> tuple[Path, Path]:
    """Run the stages not yet done in ``folder``; returns (base model, training data)."""
    from engine.random_models import create_model

    data, base, vae_done = folder / "data", folder / "base", folder / "base" / "vae" / "vae_stage.json"
    if not (data / "metadata.jsonl").is_file():
        log.info("stage 1/3: %d synthetic pairs (seed %d)", recipe.synthetic.count, recipe.synthetic.seed)
        generate(data, recipe.synthetic.count, recipe.synthetic.seed, recipe.synthetic.size, progress,
                 shape_weights=recipe.synthetic.shape_weights, edit_weights=recipe.synthetic.edit_weights)
    if not (base / "model_index.json").is_file():
        log.info("stage 2/3: random-weight %s model", recipe.architecture)
        create_model(recipe.architecture, base, seed=seed)
    if not vae_done.is_file():
        log.info("stage 3/3: VAE, %d steps", recipe.vae.steps)
        report = train_vae(base / "vae", data, recipe.vae, seed, progress)
        if report["holdout_psnr_db"] < recipe.vae.min_psnr:
            raise InputError(f"{base / 'vae'}: reconstruction PSNR {report['holdout_psnr_db']:.1f} dB is below "
                             f"min_psnr {recipe.vae.min_psnr} dB; train it longer (recipe.vae.steps) before the UNet")
    report = json.loads(vae_done.read_text())
    log.info("VAE: %.1f dB reconstruction PSNR on %d held-out images", report["holdout_psnr_db"], recipe.vae.holdout)
    return base, data


def _load_images(data: Path, count: int) -> np.ndarray:
    """(count, 3, H, W) float32 in [-1, 1]: inputs and edited images of the first readable pairs."""
    from training.data import PairedData

    pairs = PairedData(data, resolution=1)  # resolution is only for load(); images() returns files as they are
    found: list[np.ndarray] = []
    for i in range(len(pairs)):
        if len(found) >= count:
            break
        example = pairs.images(i)
        if example is not None:
            found += [np.asarray(example[0].convert("RGB")), np.asarray(example[2].convert("RGB"))]
    stack = np.stack(found[:count])  # (count, H, W, 3) uint8
    return stack.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def train_vae(vae_dir: Path, data: Path, stage: VaeStage, seed: int, progress: bool = True) -> dict:
    """Train the VAE in ``vae_dir`` in place (L1 reconstruction + small KL), set its latent scaling factor
    to 1/std of the latents (as Stable Diffusion's 0.18215 was chosen), and write vae_stage.json last."""
    import torch
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    images = _load_images(data, stage.images + stage.holdout)
    if len(images) <= stage.holdout:
        raise InputError(f"{data}: {len(images)} images is too few for a VAE holdout of {stage.holdout}")
    train_set, holdout = torch.from_numpy(images[stage.holdout:]), torch.from_numpy(images[: stage.holdout])
    vae = AutoencoderKL.from_pretrained(vae_dir).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, stage.lr, total_steps=max(stage.steps, 1), pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    size, crop = train_set.shape[-1], min(stage.crop, train_set.shape[-1])
    started = time.perf_counter()
    bar = tqdm(range(stage.steps), desc="VAE", unit="step", disable=not progress)
    for _ in bar:
        pick = torch.randint(0, len(train_set), (stage.batch_size,), generator=gen)
        y, x = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen))
        batch = train_set[pick, :, y : y + crop, x : x + crop]  # (B, 3, crop, crop)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (recon - batch).abs().mean() + stage.kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(b).latent_dist.mean for b in holdout.split(50)])  # (holdout, 4, h, w)
        recon = torch.cat([vae.decode(m).sample for m in means.split(50)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.save_pretrained(vae_dir)
    report = {"steps": stage.steps, "holdout_psnr_db": psnr(recon.clamp(-1, 1).numpy(), holdout.numpy(), peak=2.0),
              "scaling_factor": vae.config.scaling_factor, "minutes": (time.perf_counter() - started) / 60}
    (vae_dir / "vae_stage.json").write_text(json.dumps(report, indent=2))
    return report
