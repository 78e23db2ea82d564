"""The denoising networks: sizes, shapes, the image-size check and BatchNorm's train/eval modes."""

from __future__ import annotations

import pytest
import torch

from kneegen.config import ModelConfig
from kneegen.engine.network import build_network, check_image_size, size_multiple
from kneegen.engine.seed_unet import SeedUNet, SeedUNetConfig
from kneegen.engine.sinusoidal import sinusoidal_embedding
from kneegen.engine.unet import UNet
from kneegen.errors import KneegenError

TINY = dict(channels=16, channel_mults=[1, 2], blocks_per_level=1, attention_levels=[1], patch_size=1)


def unet(**keys) -> ModelConfig:
    """A U-Net config with these keys in its section."""
    return ModelConfig("unet", {"unet": keys})


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_seed_unet_has_the_original_parameter_count():
    assert n_parameters(SeedUNet(SeedUNetConfig())) == 31_140_577
    assert n_parameters(build_network(ModelConfig(arch="seed"), (32, 32))) == 31_140_577


def test_seed_arch_ignores_the_unet_section():
    network = build_network(ModelConfig("seed", {"unet": dict(channels=8, channel_mults=[1], patch_size=4)}), (16, 16))
    assert isinstance(network, SeedUNet)


@pytest.mark.parametrize(
    "cfg",
    [
        unet(**TINY),
        unet(**{**TINY, "patch_size": 2}),
        unet(**{**TINY, "patch_size": 2, "unfold_head": 4}),
        unet(channels=8, channel_mults=[1, 2, 2], blocks_per_level=2, attention_levels=[0, 2], patch_size=1),
        unet(**{**TINY, "channels": 5}),
        unet(**{**TINY, "channels": 1}),
    ],
    ids=["tiny", "tiny-patch2", "tiny-patch2-unfold-head", "three-levels", "odd-width", "width-1"],
)
def test_unet_output_shape_equals_input_shape_for_non_square_images(cfg):
    torch.manual_seed(0)
    network = build_network(cfg, (32, 48))
    assert isinstance(network, UNet)
    x = torch.randn(3, 1, 32, 48)
    out = network(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape


def test_an_odd_width_embeds_timesteps_as_the_even_width_below_it_and_a_zero():
    t = torch.tensor([0, 17, 999])
    odd = sinusoidal_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, -1], torch.zeros(3))
    assert torch.equal(odd[:, :6], sinusoidal_embedding(t, 6))


@pytest.mark.parametrize("keys", [TINY, {**TINY, "patch_size": 2, "unfold_head": 4}], ids=["tiny", "unfold-head"])
def test_unet_starts_as_zero_predictor_and_depends_on_t_once_trained(keys):
    torch.manual_seed(0)
    network = build_network(unet(**keys), (16, 16))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(network(x, torch.tensor([3, 3])), torch.zeros_like(x))  # zero-initialised head
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    same_x = x[:1].expand(2, -1, -1, -1)
    out = network(same_x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().max().item() > 1e-4


def test_unfold_head_adds_only_its_wider_unfold_and_one_full_resolution_conv():
    """Closed form: the last folded conv writes k channels per pixel instead of 1, and a 3×3 conv
    from those k plus the image's 1 channel back to 1 channel is added; nothing else changes."""
    k, patch, width = 4, 2, TINY["channels"]  # the decoder ends at the first level's width
    plain = build_network(unet(**{**TINY, "patch_size": patch}), (16, 16))
    unfolded = build_network(unet(**{**TINY, "patch_size": patch, "unfold_head": k}), (16, 16))
    wider_head = (k - 1) * patch * patch * (width * 9 + 1)
    full_resolution_conv = (k + 1) * 9 + 1
    assert n_parameters(unfolded) - n_parameters(plain) == wider_head + full_resolution_conv


def changed_pixels(network: torch.nn.Module, channels: int) -> torch.Tensor:
    """Which output pixels move when the head's output (the folded features) moves at one position:
    the head's output is replaced through a forward hook, so the rest is the network's own forward."""
    folded = torch.randn(1, channels * 4, 8, 8)  # channels × 2×2 pixels per folded position
    moved = folded.clone()
    moved[:, :, 3, 3] += 1.0
    x = torch.randn(1, 1, 16, 16)
    t = torch.tensor([500])
    outputs = []
    for features in (folded, moved):
        hook = network.head.register_forward_hook(lambda module, args, out, f=features: f)
        with torch.no_grad():
            outputs.append(network(x, t))
        hook.remove()
    return (outputs[1] - outputs[0]).abs()[0, 0] > 0


def test_unfold_head_mixes_pixels_across_the_patch_seams():
    """Without it, each 2×2 output patch is one folded position's features unfolded: a change there
    moves exactly its own patch. With it, the full-resolution 3×3 conv spreads it over the seams."""
    torch.manual_seed(0)
    plain = build_network(unet(**{**TINY, "patch_size": 2}), (16, 16))
    alone = changed_pixels(plain, 1)
    assert alone[6:8, 6:8].all() and alone.sum() == 4

    network = build_network(unet(**{**TINY, "patch_size": 2, "unfold_head": 4}), (16, 16))
    with torch.no_grad():
        network.unfold_head.weight.normal_()  # zero at the start: as after some training
    spread = changed_pixels(network, 4)
    assert spread[5:9, 5:9].all()  # the patch and a pixel beyond each of its seams
    assert spread.sum() == 16  # a 3×3 conv reaches one pixel further, no more


def test_seed_unet_output_shape_equals_input_shape_for_non_square_images():
    torch.manual_seed(0)
    network = build_network(ModelConfig(arch="seed"), (32, 48)).eval()
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        out = network(x, torch.tensor([10]))
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "cfg, shape, multiple",
    [
        (ModelConfig(arch="seed"), (40, 48), 16),
        (ModelConfig(arch="seed"), (48, 36), 16),
        (unet(channel_mults=[1, 2, 2]), (36, 30), 4),
        (unet(channel_mults=[1, 2, 2], patch_size=2), (36, 36), 8),
    ],
)
def test_build_network_refuses_a_size_it_cannot_downsample(cfg, shape, multiple):
    assert size_multiple(cfg) == multiple
    with pytest.raises(KneegenError) as info:
        build_network(cfg, shape)
    message = str(info.value)
    assert "--size" in message
    assert f"{shape[0]}x{shape[1]}" in message
    assert f"multiples of {multiple}" in message


def test_size_suggestion_fits_the_network():
    """The --size the message suggests must itself be accepted."""
    for cfg, shape in [
        (ModelConfig(arch="seed"), (40, 56)),
        (ModelConfig(arch="seed"), (8, 8)),  # the smallest size `prepare` accepts
        (unet(channel_mults=[1, 2, 2, 2]), (12, 20)),
    ]:
        with pytest.raises(KneegenError) as info:
            check_image_size(cfg, shape)
        suggested = str(info.value).split("--size ")[1].split(",")[0].split()[0]
        height, width = (int(v) for v in suggested.split("x"))
        assert height > 0 and width > 0, f"suggested --size {suggested} for {shape}"
        check_image_size(cfg, (height, width))


def test_attention_level_outside_the_levels_is_refused():
    with pytest.raises(KneegenError, match="attention_levels"):
        build_network(unet(channel_mults=[1, 2], attention_levels=[2]), (32, 32))


def test_seed_batchnorm_in_eval_mode_is_independent_of_the_rest_of_the_batch():
    torch.manual_seed(0)
    network = SeedUNet(SeedUNetConfig())
    # Non-trivial running statistics, as after training.
    network.train()
    with torch.no_grad():
        network(torch.randn(4, 1, 16, 16), torch.tensor([1, 200, 400, 999]))
    batch = torch.randn(4, 1, 16, 16) * torch.tensor([1.0, 3.0, 0.2, 5.0]).view(4, 1, 1, 1)
    t = torch.tensor([100, 200, 300, 400])
    network.eval()
    with torch.no_grad():
        alone = network(batch[:1], t[:1])
        together = network(batch, t)[:1]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)

    network.train()
    with torch.no_grad():
        alone = network(batch[:2], t[:2])[:1]
        together = network(batch, t)[:1]
    assert (alone - together).abs().max().item() > 1e-3  # batch statistics couple the images
