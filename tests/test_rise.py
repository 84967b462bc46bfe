"""RISE specifics: per-image mask streams, bounded mask memory, and a toy model with a known answer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from saliency_lab import explainers
import saliency_lab.explainers.rise as rise
from saliency_lab.explainers.rise import MASKS_PER_STREAM, draw_grids, render_masks

SIZE = 32


class ToyBlackBox(nn.Module):
    """Class 0's logit = gain * (mean of channel 0 over a region) - offset; class 1's logit = 0.

    Records every batch it sees, so tests can read back the perturbed images (= the masks, on a white
    channel 0 with RISE's black substrate, ``substrate="zero"``).
    """

    num_classes = 2

    def __init__(self, region=(slice(None), slice(None)), gain=16.0, offset=8.0):
        super().__init__()
        self.region, self.gain, self.offset = region, gain, offset
        self.inputs = []

    def logits(self, x):
        self.inputs.append(x.detach().clone())
        score = self.gain * x[:, 0][:, self.region[0], self.region[1]].mean(dim=(1, 2)) - self.offset
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def coded_images(count):
    """Image b: channel 0 white, channel 1 = its code (b + 1) / 8, channel 2 grey."""
    images = torch.empty(count, 3, SIZE, SIZE)
    images[:, 0] = 1.0
    images[:, 1] = ((torch.arange(count) + 1) / 8).view(-1, 1, 1)
    images[:, 2] = 0.5
    return images


def masks_by_image(inputs, count):
    """Split recorded perturbed images back into per-image mask sequences, using channel 1's code."""
    seen = torch.cat(inputs)
    codes = seen[:, 1].sum(dim=(1, 2)) / seen[:, 0].sum(dim=(1, 2)).clamp_min(1e-12)
    owner = (codes * 8 - 1).round().long()
    return [seen[owner == b, 0] for b in range(count)]


def test_masks_of_an_image_do_not_depend_on_its_batch():
    n_masks, indices = MASKS_PER_STREAM + 44, torch.tensor([5, 9, 2])  # two streams, a partial one
    box = ToyBlackBox()
    explainer = explainers.build("rise", box, n_masks=n_masks, seed=11, max_forward_batch=50, substrate="zero")
    images, targets = coded_images(3), torch.zeros(3, dtype=torch.long)
    explainer(images, targets, indices)
    in_batch = masks_by_image(box.inputs, 3)
    for b in range(3):
        box.inputs.clear()
        alone = explainers.build("rise", box, n_masks=n_masks, seed=11, max_forward_batch=64, substrate="zero")
        alone(images[b:b + 1], targets[b:b + 1], indices[b:b + 1])
        assert in_batch[b].shape == (n_masks, SIZE, SIZE)
        assert torch.equal(in_batch[b], torch.cat(box.inputs)[:, 0])
    # another index or another run seed gives other masks (the CPU generator keeps 32 bits of its seed;
    # derive_seeds puts the run seed in the high bits, so this catches a seed passed through unhashed)
    assert not torch.equal(in_batch[0], in_batch[1])
    box.inputs.clear()
    explainers.build("rise", box, n_masks=n_masks, seed=12, substrate="zero")(images[:1], targets[:1], indices[:1])
    assert not torch.equal(in_batch[0], torch.cat(box.inputs)[:, 0])


def test_mask_memory_is_bounded_by_max_forward_batch(monkeypatch):
    rendered, drawn = [], []

    def spy_render(grids, shifts, size):
        masks = render_masks(grids, shifts, size)
        rendered.append(masks.numel())
        return masks

    def spy_draw(generator, count, *args):
        drawn.append(count)
        return draw_grids(generator, count, *args)

    monkeypatch.setattr(rise, "render_masks", spy_render)
    monkeypatch.setattr(rise, "draw_grids", spy_draw)
    max_batch, images = 16, coded_images(3)
    for n_masks in (40, 600):
        rendered.clear()
        box = ToyBlackBox()
        explainer = explainers.build("rise", box, n_masks=n_masks, max_forward_batch=max_batch)
        explainer(images, torch.zeros(3, dtype=torch.long))
        assert max(rendered) <= max_batch * SIZE * SIZE  # never more than one forward batch of masks
        assert len(rendered) == math.ceil(3 * n_masks / max_batch)  # batches stay full across streams
        assert max(len(x) for x in box.inputs) <= max_batch
        assert explainer.cost.forwards == 3 * n_masks
    assert max(drawn) <= MASKS_PER_STREAM  # low-resolution draws are bounded too


def test_render_masks_is_an_upsample_then_shifted_crop():
    generator = torch.Generator().manual_seed(0)
    size, grid = (20, 26), 4
    cell = (math.ceil(20 / grid), math.ceil(26 / grid))
    grids, shifts = draw_grids(generator, 6, grid, 0.5, cell)
    assert set(grids.unique().tolist()) <= {0.0, 1.0}
    assert (shifts >= 0).all() and (shifts[:, 0] < cell[0]).all() and (shifts[:, 1] < cell[1]).all()
    masks = render_masks(grids, shifts, size)
    up = F.interpolate(grids, size=((grid + 1) * cell[0], (grid + 1) * cell[1]), mode="bilinear",
                       align_corners=False)
    for mask, full, (dy, dx) in zip(masks, up, shifts.tolist()):
        assert torch.equal(mask, full[:, dy:dy + size[0], dx:dx + size[1]])


def test_saliency_is_higher_inside_the_region_the_toy_model_looks_at():
    region = (slice(8, 20), slice(12, 28))
    box = ToyBlackBox(region)
    explainer = explainers.build("rise", box, n_masks=1000, max_forward_batch=500, substrate="zero")
    saliency = explainer(torch.ones(1, 3, SIZE, SIZE), torch.zeros(1, dtype=torch.long))[0, 0]
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[region] = True
    core = torch.zeros_like(inside)
    core[10:18, 14:26] = True  # away from the region's border, which bilinear masks blur across
    far = ~F.max_pool2d(inside[None].float(), 9, stride=1, padding=4)[0].bool()
    assert saliency[core].min() > saliency[far].max()
    assert saliency[inside].mean() > saliency[~inside].mean() + 0.05
    assert inside.flatten()[saliency.argmax()]


def test_rise_options_are_checked_and_substrates_work():
    box = ToyBlackBox()
    with pytest.raises(ValueError, match="substrate"):
        explainers.build("rise", box, substrate="noise")
    with pytest.raises(ValueError, match="keep_prob"):
        explainers.build("rise", box, keep_prob=0.0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for substrate in ("mean", "zero", "blur"):
        saliency = explainers.build("rise", box, n_masks=16, substrate=substrate)(images, torch.zeros(2).long())
        assert saliency.shape == (2, 1, SIZE, SIZE) and torch.isfinite(saliency).all()


def test_default_masking_colour_is_the_black_boxs_normalisation_mean():
    """As the released code (it masks the normalised image, so masked pixels become the model's mean colour)."""
    box = ToyBlackBox()
    box.mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)  # a BlackBox's normalisation buffer
    explainer = explainers.build("rise", box, n_masks=8, grid_size=2)
    assert explainer.substrate == "mean"
    explainer(torch.ones(1, 3, SIZE, SIZE), torch.zeros(1, dtype=torch.long))
    seen = torch.cat(box.inputs)  # each = 1 * M + mean * (1 - M): M = 1 - (x - 1) / (mean - 1) per channel
    masks = (seen - box.mean) / (1 - box.mean)
    assert torch.allclose(masks[:, 0], masks[:, 1], atol=1e-5) and torch.allclose(masks[:, 0], masks[:, 2], atol=1e-5)
    assert masks.min() < 0.01  # some pixels are fully masked: they hold exactly the mean colour
    box.inputs.clear()
    explainers.build("rise", box, n_masks=8, grid_size=2, mean_colour=(0.0, 0.0, 0.0))(
        torch.ones(1, 3, SIZE, SIZE), torch.zeros(1, dtype=torch.long))
    assert torch.cat(box.inputs).min() < 0.01  # an explicit colour wins
