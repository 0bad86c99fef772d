"""Conditioning dropout (training/conditioning.py): its proportions and what a dropped row holds."""
import torch

from training.conditioning import apply_dropout, dropout_masks


def test_dropout_proportions_over_many_draws():
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    keep_text, keep_image = dropout_masks(r, 0.05)
    text_only = (~keep_text & keep_image).float().mean().item()
    both = (~keep_text & ~keep_image).float().mean().item()
    image_only = (keep_text & ~keep_image).float().mean().item()
    for share in (text_only, both, image_only):
        assert abs(share - 0.05) < 0.003
    assert abs((keep_text & keep_image).float().mean().item() - 0.85) < 0.003


def test_dropped_text_is_null_and_dropped_image_is_zero():
    text, null = torch.ones(4, 77, 8), torch.full((1, 77, 8), 2.0)
    image = torch.ones(4, 4, 2, 2)
    r = torch.tensor([0.01, 0.07, 0.12, 0.5])  # text only, both, image only, none
    t, i = apply_dropout(text, null, image, r, 0.05)
    assert [float(t[k, 0, 0]) for k in range(4)] == [2.0, 2.0, 1.0, 1.0]
    assert [float(i[k].sum()) for k in range(4)] == [16.0, 0.0, 0.0, 16.0]
