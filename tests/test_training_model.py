import torch
from diffusers import UNet2DConditionModel

from engine.random_models import ARCHITECTURES
from training.conditioning import apply_dropout, dropout_masks
from training.model import expand_conv_in


def test_conv_in_grows_with_weights_and_bias_copied():
    torch.manual_seed(0)
    base = UNet2DConditionModel(**{**ARCHITECTURES["tiny"]["unet"], "in_channels": 4})
    grown = expand_conv_in(base)
    assert grown.conv_in.in_channels == 8
    torch.testing.assert_close(grown.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(grown.conv_in.weight[:, 4:]) == 0
    torch.testing.assert_close(grown.conv_in.bias, base.conv_in.bias)
    torch.testing.assert_close(grown.conv_out.weight, base.conv_out.weight)
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.randn(1, 77, 32)
    with torch.no_grad():  # with any image latent, the grown UNet starts as the base model
        torch.testing.assert_close(grown(torch.cat([x, torch.randn_like(x)], 1), t, e).sample, base(x, t, e).sample)
    assert expand_conv_in(grown) is grown


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
