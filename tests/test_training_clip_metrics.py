"""CLIP edit metrics (training/clip_metrics.py) against transformers' CLIPModel computing the same similarities,
on a tiny random CLIP written by transformers' save_pretrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import InputError
from training.clip_metrics import ClipScorer, resolve_clip

CAPTIONS = [("a red circle on white", "a blue circle on white", "make the circle blue"),
            ("a green square", "a green square at night", "make it night"),
            ("two shapes on grey", "one shape on grey", "remove the triangle")]


def images(seed: int, n: int = 3, size=(48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def reference_scores(folder: str, before, after, captions_in, captions_out) -> np.ndarray:
    """The three similarities from CLIPModel's forward pass (its normalised image_embeds and text_embeds)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.inference_mode():
        first = model(**processor(text=list(captions_in), images=before, return_tensors="pt", padding=True))
        second = model(**processor(text=list(captions_out), images=after, return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity
    return np.stack([cos(first.image_embeds, second.image_embeds).numpy(),
                     cos(second.image_embeds, second.text_embeds).numpy(),
                     cos(second.image_embeds - first.image_embeds, second.text_embeds - first.text_embeds).numpy()])


def test_scores_equal_clipmodels_own_similarities(tiny_clip):
    before, after = images(0), images(1)
    captions_in, captions_out = [c[0] for c in CAPTIONS], [c[1] for c in CAPTIONS]
    scores = ClipScorer(tiny_clip, batch_size=2).score(before, after, captions_in, captions_out)  # 2 batches
    expected = reference_scores(tiny_clip, before, after, captions_in, captions_out)
    np.testing.assert_allclose(np.stack(scores.arrays()), expected, atol=1e-5)
    means = scores.means()
    assert means["clip_image_similarity"] == pytest.approx(float(expected[0].mean()), abs=1e-5)
    assert len(scores.per_example()) == 3


def test_an_unchanged_image_scores_one_and_has_no_direction(tiny_clip):
    before = images(0)
    same = ClipScorer(tiny_clip).score(before, before, ["a"] * 3, ["b"] * 3)
    np.testing.assert_allclose(same.image_similarity, 1.0, atol=1e-5)
    np.testing.assert_array_equal(same.directional_similarity, 0.0)  # no change: no direction


def test_resolve_clip_names_what_is_wrong(tmp_path, tiny_model, monkeypatch):
    with pytest.raises(InputError, match="not a CLIP model"):
        resolve_clip(f"{tiny_model}/text_encoder")  # a CLIP *text* model: model_type clip_text_model
    with pytest.raises(InputError, match="config.json: missing"):
        resolve_clip(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_clip("nobody/no-such-clip")
