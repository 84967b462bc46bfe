"""Tests for core/perturbation.py and core/seeding.py: phi(I, M, A), the blur and every substrate."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from saliency_lab.core.blackbox import IMAGENET_MEAN
from saliency_lab.core.perturbation import (
    clip_kernel_size,
    gaussian_blur,
    make_substrate,
    perturb,
    random_colour_noise,
    scaled_blur,
)
from saliency_lab.core.seeding import derive_seeds


def _images(batch=2, size=8, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- perturb ----------------------------------------------------------------------------------------


def test_perturb_is_the_convex_combination_and_exact_at_the_end_points():
    images, substrate = _images(seed=0), _images(seed=1)
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = images * mask + substrate * (1 - mask)
    torch.testing.assert_close(perturb(images, mask, substrate), expected)
    assert torch.equal(perturb(images, torch.ones(2, 1, 8, 8), substrate), images)
    assert torch.equal(perturb(images, torch.zeros(2, 1, 8, 8), substrate), substrate)


def test_perturb_upsamples_a_small_mask():
    images, substrate = _images(size=4), torch.zeros(3, 4, 4)  # (3, H, W) substrate broadcasts
    coarse = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    nearest = coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(perturb(images, coarse, substrate, mode="nearest"), images * nearest)
    # Bilinear keeps a constant mask constant and interpolates in between.
    half = perturb(images, torch.full((2, 1, 2, 2), 0.5), substrate)
    torch.testing.assert_close(half, images * 0.5)
    soft = perturb(torch.ones(1, 3, 4, 4), coarse[:1], torch.zeros(1, 3, 4, 4))
    assert soft[0, 0, 0, 0] == 1 and 0 < soft[0, 0, 1, 1] < 1


def test_perturb_rejects_bad_shapes():
    images = _images()
    with pytest.raises(ValueError, match="larger than the image"):
        perturb(images, torch.ones(2, 1, 16, 16), images)
    with pytest.raises(ValueError, match="mask must be"):
        perturb(images, torch.ones(2, 3, 8, 8), images)
    with pytest.raises(ValueError, match="do not broadcast"):
        perturb(images, torch.ones(2, 1, 8, 8), torch.zeros(3, 8, 7))


def test_perturb_is_differentiable_in_the_mask():
    mask = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    perturb(torch.ones(1, 3, 4, 4), mask, torch.zeros(1, 3, 4, 4)).sum().backward()
    torch.testing.assert_close(mask.grad, torch.full((1, 1, 2, 2), 12.0))  # 3 channels x 4 pixels each


# --- blur -------------------------------------------------------------------------------------------


def test_gaussian_blur_matches_torchvision_when_the_kernel_fits():
    images = _images(size=16)
    expected = TF.gaussian_blur(images, kernel_size=[5, 5], sigma=[1.5, 1.5])
    torch.testing.assert_close(gaussian_blur(images, 5, 1.5), expected)


@pytest.mark.parametrize("size, expected_kernel", [(64, 51), (16, 31), (4, 7)])
def test_gaussian_blur_with_a_kernel_wider_than_the_image(size, expected_kernel):
    assert clip_kernel_size(51, size, size) == (expected_kernel, expected_kernel)
    images = _images(size=size)
    blurred = gaussian_blur(images, 51, 50.0)
    assert blurred.shape == images.shape
    assert blurred.min() >= images.min() - 1e-6 and blurred.max() <= images.max() + 1e-6
    assert blurred.std() < images.std()  # it did blur
    constant = torch.full((1, 3, size, size), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, 51, 50.0), constant)  # reflect padding


def test_clip_kernel_size_per_axis():
    assert clip_kernel_size(51, 5, 40) == (51, 9)  # (kernel_x for width 40, kernel_y for height 5)
    assert gaussian_blur(torch.rand(1, 3, 5, 40), 51, 50.0).shape == (1, 3, 5, 40)


def test_gaussian_blur_rejects_bad_parameters():
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(_images(), 4, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(_images(), 5, 0.0)


def test_scaled_blur():
    assert scaled_blur(11, 5.0, 224) == (11, 5.0)
    assert scaled_blur(51, 50.0, 224) == (51, 50.0)
    kernel, sigma = scaled_blur(11, 5.0, 64)
    assert kernel == 3 and sigma == pytest.approx(5 * 64 / 224)
    kernel, sigma = scaled_blur(51, 50.0, 64)
    assert kernel == 15 and sigma == pytest.approx(50 * 64 / 224)
    assert scaled_blur(3, 1.0, 8)[0] == 3  # never below 3


# --- substrates -------------------------------------------------------------------------------------


def test_mean_and_zero_substrates():
    images = _images()
    mean = make_substrate("mean", images)
    assert mean.shape == images.shape
    assert torch.equal(mean[1, :, 3, 5], torch.tensor(IMAGENET_MEAN))
    custom = make_substrate("mean", images, mean=(0.1, 0.2, 0.3))
    assert torch.equal(custom[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(make_substrate("zero", images), torch.zeros_like(images))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_substrate("mean", images, mean=(0.1, 0.2, 1.3))


def test_blur_substrate():
    images = _images(size=16)
    torch.testing.assert_close(make_substrate("blur", images, blur_kernel=5, blur_sigma=2.0),
                               gaussian_blur(images, 5, 2.0))
    with pytest.raises(ValueError, match="blur_kernel"):
        make_substrate("blur", images)


def test_random_substrate_is_reproducible_and_in_range():
    images = _images(batch=3, size=16)
    first = make_substrate("random", images, generator=torch.Generator().manual_seed(7))
    again = make_substrate("random", images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert first.min() >= 0 and first.max() <= 1
    other = make_substrate("random", images, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(first, other)


def test_random_substrate_statistics():
    images = torch.zeros(64, 3, 32, 32)
    substrate = make_substrate("random", images, generator=torch.Generator().manual_seed(0))
    colour = substrate.mean((2, 3))  # per image and channel: close to the drawn colour
    middle = (colour > 0.2) & (colour < 0.8)  # away from the clamp, the noise std is untouched
    std = substrate.std((2, 3))[middle]
    assert std.mean() == pytest.approx(0.055, rel=0.05)
    # One constant colour per image: the channels differ, spatial variation is only the noise.
    assert colour.std(0).min() > 0.15


def test_random_substrate_per_image_seeds_do_not_depend_on_the_batch():
    images = _images(batch=4, size=8)
    seeds = derive_seeds(3, torch.tensor([10, 11, 12, 13]))
    whole = make_substrate("random", images, seeds=seeds)
    alone = random_colour_noise(images[2:3], seeds[2:3])
    assert torch.equal(whole[2:3], alone)
    assert torch.equal(whole, random_colour_noise(images, seeds))
    assert not torch.equal(whole[0], whole[1])
    with pytest.raises(ValueError, match="one seed per image"):
        random_colour_noise(images, seeds[:2])


def test_derive_seeds_is_injective():
    index = torch.arange(50)
    seeds = torch.cat([derive_seeds(seed, index) for seed in range(5)])
    assert seeds.unique().numel() == seeds.numel()
    with pytest.raises(ValueError):
        derive_seeds(-1, index)
    with pytest.raises(ValueError):
        derive_seeds(0, torch.tensor([2**32]))


def test_tensor_substrate_is_validated_and_expanded():
    images = _images(batch=2, size=8)
    single = torch.full((3, 8, 8), 0.25)
    assert torch.equal(make_substrate(single, images), single.expand(2, 3, 8, 8))
    batch = torch.rand(2, 3, 8, 8)
    assert torch.equal(make_substrate(batch, images), batch)
    with pytest.raises(ValueError, match="tensor substrate must be"):
        make_substrate(torch.zeros(3, 4, 4), images)
    with pytest.raises(ValueError, match="tensor substrate must be"):
        make_substrate(torch.zeros(5, 3, 8, 8), images)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_substrate(torch.full((3, 8, 8), 1.5), images)


def test_unknown_substrate():
    with pytest.raises(ValueError, match="unknown substrate"):
        make_substrate("grey", _images())


def test_random_substrate_depends_on_the_run_seed():
    """The run seed sits in the high 32 bits of derive_seeds: it must still change the draws on the CPU."""
    from saliency_lab.core.perturbation import random_colour_noise
    from saliency_lab.core.seeding import derive_seeds

    images = torch.zeros(2, 3, 8, 8)
    index = torch.arange(2)
    a = random_colour_noise(images, derive_seeds(0, index))
    b = random_colour_noise(images, derive_seeds(1, index))
    assert not torch.equal(a, b)
