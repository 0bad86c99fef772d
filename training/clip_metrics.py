"""CLIP edit metrics, as the InstructPix2Pix paper measures edits (Brooks et al. 2022, sec. 4):

- image similarity: cosine of the CLIP image embeddings of the input and the edited image (how much of the
  input the edit kept);
- text-image similarity: cosine of the edited image's embedding and the output caption's;
- directional similarity (Gal et al. 2021, StyleGAN-NADA): cosine of the change in image embedding (edited
  minus input) and the change in caption embedding (output minus input caption): did the image change the way
  the captions do.

Any CLIP model transformers loads: a local folder, or a hub id from the offline cache (downloaded only when
online). The paper's is ``openai/clip-vit-large-patch14``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from engine.errors import InputError, quote_error
from training.hub import model_folder

log = logging.getLogger(__name__)
METRICS = ("clip_image_similarity", "clip_text_image_similarity", "clip_directional_similarity")
CLIP_FILES = ["*.json", "*.txt", "*.safetensors"]  # configs, tokenizer and processor, weights


def resolve_clip(name: str | os.PathLike) -> Path:
    """The folder of a CLIP model: a local folder, or a hub id's snapshot (InputError naming what is wrong)."""
    path = model_folder(name, "CLIP", CLIP_FILES)
    if (path / "model_index.json").is_file():
        raise InputError(f"{path}: not a CLIP model but a diffusers pipeline folder (model_index.json)")
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise InputError(f"{config_file}: missing or unreadable; a CLIP model folder has a config.json") from None
    if model_type != "clip":
        raise InputError(f"{path}: not a CLIP model (config.json says model_type {model_type!r})")
    return path


def _features(output) -> "torch.Tensor":  # noqa: F821
    """get_*_features' projected embedding (a tensor, or a model output carrying it in pooler_output)."""
    return output if hasattr(output, "norm") else output.pooler_output


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (0 where a row is zero, e.g. the direction of an edit that changed nothing)."""
    return np.sum(_unit(a) * _unit(b), axis=-1)


@dataclass(frozen=True)
class Scores:
    """Per-example CLIP scores of a set of edits, and their means."""

    image_similarity: np.ndarray
    text_image_similarity: np.ndarray
    directional_similarity: np.ndarray

    def means(self) -> dict[str, float]:
        return dict(zip(METRICS, (float(np.mean(v)) for v in self.arrays())))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.image_similarity, self.text_image_similarity, self.directional_similarity

    def per_example(self) -> list[dict[str, float]]:
        return [dict(zip(METRICS, map(float, values))) for values in zip(*self.arrays())]


class ClipScorer:
    """CLIP image and text embeddings (unit length, so the directional change is between points on the sphere,
    as in the paper's evaluation), and the three edit metrics from them."""

    def __init__(self, model: str | os.PathLike, device: str = "cpu", batch_size: int = 32):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        folder = resolve_clip(model)
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise InputError(f"{folder}: transformers cannot load this CLIP model ({quote_error(err)})") from None
        self.torch, self.device, self.batch_size = torch, device, batch_size

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            with self.torch.inference_mode():
                out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu().numpy())
        return _unit(np.concatenate(out)) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor(text=list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                    return_tensors="pt")
            with self.torch.inference_mode():
                features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                        attention_mask=tokens["attention_mask"].to(self.device))
            out.append(_features(features).float().cpu().numpy())
        return _unit(np.concatenate(out)) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def score(self, inputs: Sequence[Image.Image], edited: Sequence[Image.Image], input_captions: Sequence[str],
              output_captions: Sequence[str], input_embeddings: np.ndarray | None = None,
              caption_embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> Scores:
        """The three metrics per example. Embeddings of the inputs and captions, which do not change between the
        settings of a sweep, may be passed in from an earlier call."""
        if not len(inputs) == len(edited) == len(input_captions) == len(output_captions):
            raise ValueError("inputs, edited images and captions must be as many")
        before = self.image_embeddings(inputs) if input_embeddings is None else input_embeddings
        after = self.image_embeddings(edited)
        text_in, text_out = caption_embeddings or (self.text_embeddings(input_captions),
                                                   self.text_embeddings(output_captions))
        return Scores(image_similarity=cosine(before, after), text_image_similarity=cosine(after, text_out),
                      directional_similarity=cosine(after - before, text_out - text_in))
