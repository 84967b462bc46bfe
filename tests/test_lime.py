"""LIME: the superpixel weights recover a known linear model, SLIC segments and substrates as documented,
seeded samples and exact cost."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from saliency_lab import explainers
from saliency_lab.explainers.lime import cosine_kernel, segment_means, superpixels

SIZE, CELLS = 32, 4  # a 4 x 4 grid of 8 x 8 px blocks of distinct flat colours
SIDE = SIZE // CELLS
WEIGHTS = torch.tensor([0.10, 0.0, -0.05, 0.02, 0.0, 0.15, 0.0, -0.02, 0.04, 0.0, 0.08, 0.0, 0.0, -0.03, 0.0, 0.06])
BIAS = 0.4


def block_image() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, SIZE, SIZE) image of flat blocks with well-separated colours, and the block labels (SIZE, SIZE)."""
    generator = torch.Generator().manual_seed(0)
    colours = 0.2 + 0.8 * torch.rand(CELLS * CELLS, 3, generator=generator)
    colours[:, 0] = torch.linspace(0.3, 1.0, CELLS * CELLS)[torch.randperm(CELLS * CELLS, generator=generator)]
    labels = (torch.arange(SIZE)[:, None] // SIDE) * CELLS + torch.arange(SIZE)[None, :] // SIDE
    return colours[labels].permute(2, 0, 1).unsqueeze(0), labels


class LinearInBlocks(nn.Module):
    """p_0(x) = BIAS + sum_s WEIGHTS[s] * (kept fraction of block s), exactly: the block's channel-0 mass relative
    to the original image's (a block turned off to black keeps 0). logits = log(p_0), log(1 - p_0)."""

    num_classes = 2

    def __init__(self, original: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("original", original[:, 0])
        self.register_buffer("labels", labels)

    def logits(self, x):
        kept = torch.zeros(x.shape[0], CELLS * CELLS).index_add_(1, self.labels.flatten(),
                                                                (x[:, 0] / self.original).flatten(1))
        p = BIAS + kept / SIDE ** 2 @ WEIGHTS
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def block_weights(saliency: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean saliency per block (16,) of one map (1, 1, SIZE, SIZE)."""
    return torch.stack([saliency[0, 0][labels == s].mean() for s in range(CELLS * CELLS)])


@pytest.fixture(scope="module")
def toy():
    image, labels = block_image()
    return image, labels, LinearInBlocks(image, labels)


def test_slic_finds_the_blocks(toy):
    image, labels, _ = toy
    segments = superpixels(image[0], CELLS * CELLS, compactness=10.0, sigma=0.0)
    assert segments.shape == (SIZE, SIZE) and segments.unique().tolist() == list(range(int(segments.max()) + 1))
    for block in range(CELLS * CELLS):  # each block is one segment
        assert segments[labels == block].unique().numel() == 1


def test_superpixel_weights_recover_a_known_linear_model(toy):
    image, labels, model = toy
    target = torch.zeros(1, dtype=torch.long)
    common = {"n_segments": CELLS * CELLS, "slic_sigma": 0.0, "substrate": "zero"}
    exact = explainers.build("lime", model, alpha=0.0, **common)(image, target)
    assert torch.allclose(block_weights(exact, labels), WEIGHTS, atol=1e-4)
    # The defaults (ridge alpha = 1, 1000 samples) shrink the weights a little, nothing more.
    default = explainers.build("lime", model, **common)
    ridge = block_weights(default(image, target), labels)
    assert torch.allclose(ridge, WEIGHTS, atol=0.01), ridge
    assert torch.corrcoef(torch.stack([ridge, WEIGHTS]))[0, 1] > 0.99
    assert (default.cost.forwards, default.cost.backwards) == (1000, 0)


def test_substrates_and_kernel(toy):
    image, labels, _ = toy
    means = segment_means(image[0], labels)
    assert torch.allclose(means, image[0])  # flat blocks are their own mean
    ramp = torch.linspace(0, 1, 4).view(1, 1, 4).expand(3, 4, 4)
    halves = (torch.arange(4) >= 2).long().view(1, 4).expand(4, 4)
    assert torch.allclose(segment_means(ramp, halves)[0, 0], torch.tensor([1 / 6, 1 / 6, 5 / 6, 5 / 6]))
    kernel = cosine_kernel(0.25)
    assert kernel(None, None, torch.ones(1, 8)) == pytest.approx(1.0)
    quarter = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]])  # cosine distance 1 - sqrt(2 / 8) = 0.5
    assert kernel(None, None, quarter) == pytest.approx(torch.exp(torch.tensor(-0.25 / 0.125)).item())


def test_samples_are_seeded_per_image(toy):
    image, _, model = toy
    images = image.repeat(2, 1, 1, 1)
    targets = torch.zeros(2, dtype=torch.long)
    lime = explainers.build("lime", model, n_samples=50, n_segments=16, slic_sigma=0.0, max_forward_batch=7)
    maps = lime(images, targets, torch.tensor([3, 4]))
    assert not torch.equal(maps[0], maps[1])  # another index, other samples
    assert torch.equal(maps[1:], lime(images[1:], targets[1:], torch.tensor([4])))


def test_bad_hyper_parameters_are_named(toy):
    _, _, model = toy
    for bad, message in (({"n_samples": 0}, "n_samples"), ({"keep_prob": 1.0}, "keep_prob"),
                         ({"substrate": "noise"}, "substrate")):
        with pytest.raises(ValueError, match=message):
            explainers.build("lime", model, **bad)
