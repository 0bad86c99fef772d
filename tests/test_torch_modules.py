"""The spec-named torch modules: token downsampling (where it pools, how close it stays) and its refusals."""
import numpy as np
import pytest
import torch

from engine import EditPipeline, InputError
from engine.backends.torch_modules import KeyValueDownsampling, set_kv_downsampling, token_grid


@pytest.mark.parametrize("tokens, latent, grid", [(4096, (64, 64), (64, 64)), (1024, (64, 64), (32, 32)),
                                                   (12 * 9, (48, 35), (12, 9)), (6, (5, 3), (3, 2))])
def test_token_grid_follows_the_unets_rounded_up_halving(tokens, latent, grid):
    assert token_grid(tokens, latent) == grid


def test_token_grid_refuses_a_count_of_no_level():
    with pytest.raises(ValueError, match="no level"):
        token_grid(1000, (64, 64))


def key_counts(pipe) -> dict[str, int]:
    """Edits once and returns the number of key tokens each self-attention (attn1) saw, by module name."""
    unet = pipe.backend._modules["unet"][0].unet
    counts, hooks = {}, []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            hooks.append(module.to_k.register_forward_hook(
                lambda m, args, out, name=name: counts.__setitem__(name, out.shape[1])))
    pipe.edit(np.zeros((48, 40, 3), np.uint8), "x", steps=1, seed=0, resolution=None)
    for hook in hooks:
        hook.remove()
    return counts


def test_kv_downsampling_pools_only_the_finest_attention_level(tiny_model):
    exact = key_counts(EditPipeline.from_pretrained(tiny_model, progress=False))
    pooled = key_counts(EditPipeline.from_pretrained(tiny_model, progress=False, backend_options={"kv_downsample": 2}))
    # tiny: 48x40 px -> 24x20 latent; attention starts at the second level (12x10 tokens), the mid block too
    finest = [n for n in exact if n.startswith(("down_blocks.1.", "up_blocks.0."))]
    assert finest and all(exact[n] == 120 and pooled[n] == 30 for n in finest)  # 12x10 -> 6x5
    assert all(pooled[n] == exact[n] for n in exact if n not in finest)


def test_kv_downsampling_is_close_to_exact_and_factor_1_is_exact(tiny_model):
    image = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)

    def edit(**options):
        pipe = EditPipeline.from_pretrained(tiny_model, progress=False, backend_options=options)
        return np.asarray(pipe.edit(image, "make it blue", steps=3, seed=0, resolution=None, output_type="np").images)

    exact, pooled = edit(), edit(kv_downsample=3)  # 16x12 tokens -> 6x4: a partial window on each side
    assert np.array_equal(edit(kv_downsample=1), exact)
    assert 0 < np.abs(pooled - exact).max() < 0.1


def test_pooled_keys_equal_attention_over_averaged_tokens():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = torch.randn(1, 4 * 6, 8)  # a 4x6 grid of tokens
    attn.set_processor(KeyValueDownsampling(2))
    got = attn(x, latent_size=(4, 6))
    averaged = x.reshape(1, 2, 2, 3, 2, 8).mean(dim=(2, 4)).reshape(1, 6, 8)  # 2x2 blocks of the grid
    assert torch.allclose(got, attn(x, encoder_hidden_states=averaged), atol=1e-6)


def test_a_unet_without_attention_in_its_down_blocks_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(InputError, match="no attention in its down blocks"):
        set_kv_downsampling(unet, 2)
