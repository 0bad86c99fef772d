import torch
from diffusers import UNet2DConditionModel

from engine.random_models import ARCHITECTURES
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
