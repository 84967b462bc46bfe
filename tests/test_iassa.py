"""IASSA (explainers/iassa.py): Eq. 5 by hand, window geometry and scaling, the attention (row vs the released
code's double softmax, chunked vs dense), iterations, stopping, forward counts, no ground truth, and the
COCO evaluation path end to end."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import torch.nn as nn

from saliency_lab.cli import evaluate
from saliency_lab import explainers
import saliency_lab.explainers.iassa as iassa  # registers "iassa" (also when explainers/__init__ does not import it)
from saliency_lab.core.blackbox import BlackBox, blackbox_record, create_network

TINY = dict(model="timm:resnet10t", model_kwargs={"channels": [8, 16, 24, 32]})
FAST = dict(window=120.0, stride=60.0, tol=0.0)  # 25 windows per round at 48 px


@pytest.fixture(scope="module")
def blackbox():
    torch.manual_seed(0)
    return BlackBox(TINY["model"], num_classes=5, model_kwargs=TINY["model_kwargs"])


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 48, 48, generator=generator), torch.tensor([0, 4, 2])


class Probe(nn.Module):
    """Two classes; p_0 = 0.9 when every pixel of ``region`` (channel 0) is kept (> 0.5), else 0.1."""

    num_classes = 2

    def __init__(self, region=(5, 5), constant: float | None = None):
        super().__init__()
        self.region = region
        self.constant = constant

    def logits(self, x):
        if self.constant is not None:
            p = torch.full((x.shape[0],), self.constant, dtype=x.dtype)
        else:
            p = 0.1 + 0.8 * (x[:, 0, self.region[0], self.region[1]] > 0.5).to(x.dtype)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [v.flatten().double().argsort().argsort().double() for v in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


# -- geometry ---------------------------------------------------------------------------------------------
def test_windows_are_clipped_at_the_border_and_scale_with_the_image():
    # 12 px axis, window 4, stride 2: starts -2, 0, 2, ..., 10 (the released code's arange(stride - W, size, stride))
    assert iassa.axis_windows(12, 4, 2) == [(0, 2), (0, 4), (2, 6), (4, 8), (6, 10), (8, 12), (10, 12)]
    for step in range(5):
        assert iassa.window_schedule(224, step) == pytest.approx((45 - 1.5 * step, 8 - 0.2 * step))
        assert iassa.window_schedule(112, step) == pytest.approx(((45 - 1.5 * step) / 2, (8 - 0.2 * step) / 2))
        scale = 64 / 224
        assert iassa.window_schedule(64, step) == pytest.approx(((45 - 1.5 * step) * scale, (8 - 0.2 * step) * scale))
    # the same grid of windows relative to the image at 224 and 64 px: 33 x 33 positions
    for size in (224, 64):
        boxes = iassa.sliding_windows(size, size, *iassa.window_schedule(size, 0))
        assert boxes.shape == (33 * 33, 4)
        assert boxes.min() >= 0 and boxes[:, [1, 3]].max() == size
        masks = iassa.window_masks(boxes[::97], size, size)
        some = boxes[::97]
        assert ((1 - masks).flatten(1).sum(1) == (some[:, 1] - some[:, 0]) * (some[:, 3] - some[:, 2])).all()
    assert iassa.attention_grid([(56, 56), (28, 28), (14, 14), (7, 7)], (224, 224)) == (56, 56)
    assert iassa.attention_grid([(112, 112), (56, 56)], (224, 224)) == (56, 56)  # capped
    assert iassa.attention_grid([(16, 16), (8, 8)], (64, 64)) == (16, 16)
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[5, 5] = True
    boxes = iassa.sliding_windows(12, 12, 4, 2)
    hits = iassa.windows_hitting(region, boxes)
    assert hits.sum() == 4 and (iassa.window_masks(boxes[hits], 12, 12)[:, 0, 5, 5] == 0).all()


def test_eq5_per_pixel_normaliser_by_hand():
    """7 x 7 = 49 windows on a 12 x 12 image; p = 0.9 when pixel (5, 5) is kept, else 0.1 (4 windows cover it)."""
    explainer = explainers.build("iassa", Probe(), window=4, stride=2, reference_size=12, iterations=1,
                                 attention="none", substrate="zero", output="estimate", max_forward_batch=10)
    saliency = explainer(torch.ones(1, 3, 12, 12), torch.tensor([0]))[0, 0]
    # (0, 0) is kept by 49 - 4 windows, 4 of which cover (5, 5): Eq. 5 divides by 45, not by N = 49
    assert saliency[0, 0].item() == pytest.approx((41 * 0.9 + 4 * 0.1) / 45, rel=1e-5)
    # (5, 5) and (4, 4) are occluded by the same 4 windows: every mask keeping them scores 0.9
    assert saliency[5, 5].item() == pytest.approx(0.9, rel=1e-5)
    assert saliency[4, 4].item() == pytest.approx(0.9, rel=1e-5)
    assert explainer.cost.forwards == 49 and explainer.trace["masks"] == [[49]]


# -- attention --------------------------------------------------------------------------------------------
def test_chunked_attention_equals_the_dense_computation():
    generator = torch.Generator().manual_seed(0)
    phi = torch.rand(2, 50, 7, generator=generator, dtype=torch.float64) * 2
    values = torch.rand(2, 50, generator=generator, dtype=torch.float64)
    logits = phi @ phi.transpose(1, 2) / 0.7
    dense = {"row": logits.softmax(dim=2), "double": logits.softmax(dim=1).softmax(dim=2)}
    for mode, matrix in dense.items():
        for rows in (1, 7, 50):
            assert torch.allclose(iassa.attention_matrix(phi, mode, 0.7, rows), matrix, atol=1e-12)
            assert torch.allclose(iassa.attend(phi, values, mode, 0.7, rows), (matrix @ values[..., None])[..., 0],
                                  atol=1e-12)
    assert iassa.attention_chunk_rows(8, 3136, 64 * 2**20) == 334  # two (8, 334, 3136) float32 temporaries fit 64 MiB


def test_compact_levels_keep_every_dot_product():
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 40, 3, 3, generator=generator), torch.rand(2, 5, 6, 6, generator=generator)]
    compact = iassa.compact_level(maps[0])
    assert compact.shape == (2, 9, 3, 3) and iassa.compact_level(maps[1]) is maps[1]
    gram = lambda f: f.flatten(2).transpose(1, 2) @ f.flatten(2)  # noqa: E731
    assert torch.allclose(gram(compact), gram(maps[0]), rtol=1e-5)
    phi = iassa.lrpf_features(maps, (6, 6))
    upsampled = nn.functional.interpolate(maps[0], size=(6, 6), mode="bilinear")
    reference = torch.cat([nn.functional.normalize(upsampled, dim=1), nn.functional.normalize(maps[1], dim=1)],
                          dim=1).flatten(2).transpose(1, 2)
    assert phi.shape == (2, 36, 9 + 5)
    assert torch.allclose(phi @ phi.transpose(1, 2), reference @ reference.transpose(1, 2), atol=1e-5)


def test_double_softmax_only_adds_a_constant_while_row_softmax_reranks():
    """56 x 56 grid (224 px) with two feature clusters (left / right half) and a map with a strong bump on
    the left: the released code's double softmax gives S' = beta S + const (the ranking of S), one row-softmax
    pulls each half towards its own mean and reorders pixels across the halves."""
    grid = 56
    left = torch.zeros(1, 2, grid, grid)
    left[:, 0, :, : grid // 2] = 1
    left[:, 1, :, grid // 2:] = 1
    maps = [left] + [nn.functional.avg_pool2d(left, k) for k in (2, 4, 8)]
    phi = iassa.lrpf_features(maps, iassa.attention_grid([m.shape[-2:] for m in maps], (224, 224)))
    assert phi.shape[1] == grid * grid
    y, x = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    saliency = (x / 224 + 5 * torch.exp(-((y - 112) ** 2 + (x - 56) ** 2) / (2 * 32.0**2))
                + 1e-3 * torch.rand(224, 224, generator=torch.Generator().manual_seed(0)))[None, None]
    rows = iassa.attention_chunk_rows(1, grid * grid, 8 * 2**20)
    adjusted = {m: iassa.adjust_map(saliency, (grid, grid), lambda v, m=m: iassa.attend(phi, v, m, 1.0, rows), 0.5)
                for m in ("row", "double")}
    residual = adjusted["double"] - 0.5 * saliency
    assert residual.std() < 1e-4 * saliency.std()  # A x S is a constant: the attention changes nothing
    assert spearman(adjusted["double"], saliency) > 0.99999
    assert spearman(adjusted["row"], saliency) < 0.97
    # a pixel at the left half's edge, far from the bump, vs its neighbour across the border: order flips
    a, b = (0, 108), (0, 116)
    assert saliency[0, 0, a[0], a[1]] < saliency[0, 0, b[0], b[1]]
    assert adjusted["row"][0, 0, a[0], a[1]] > adjusted["row"][0, 0, b[0], b[1]]
    assert adjusted["double"][0, 0, a[0], a[1]] < adjusted["double"][0, 0, b[0], b[1]]


def test_double_softmax_explainer_map_is_the_plain_map_plus_a_constant(blackbox, images):
    x, targets = images
    maps = {mode: explainers.build("iassa", blackbox, attention=mode, iterations=1, **FAST)(x, targets)
            for mode in ("none", "double", "row")}
    for b in range(x.shape[0]):
        plain = 0.5 * maps["none"][b]
        assert (maps["double"][b] - plain).std() < 1e-3 * plain.std()
        assert (maps["row"][b] - plain).std() > 5 * (maps["double"][b] - plain).std()  # ours is not a constant


# -- the explainer ----------------------------------------------------------------------------------------
def test_batch_equals_single_and_memory_knobs_do_not_change_the_map(blackbox, images):
    x, targets = images
    explainer = explainers.build("iassa", blackbox, iterations=3, max_forward_batch=16, **FAST)
    together = explainer(x, targets)
    trace = explainer.trace
    alone = torch.cat([explainer(x[i:i + 1], targets[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-6)
    # attention computed in row chunks every iteration (tiny budget) instead of cached: same map
    chunked = explainers.build("iassa", blackbox, iterations=3, max_forward_batch=7, attention_memory_mb=0.01,
                               **FAST)
    assert torch.allclose(chunked(x, targets), together, rtol=1e-4, atol=1e-6)
    assert chunked.trace["masks"] == trace["masks"] and chunked.trace["iterations"] == [3, 3, 3]


def test_forward_counts(blackbox, images):
    x, targets = images
    boxes = len(iassa.sliding_windows(48, 48, *iassa.window_schedule(48, 0, FAST["window"], FAST["stride"])))
    explainer = explainers.build("iassa", blackbox, iterations=1, **FAST)
    explainer(x, targets)
    assert explainer.cost.forwards == 3 * (1 + boxes) and explainer.cost.backwards == 0  # + one feature pass
    separate = explainers.build("iassa", blackbox, iterations=1, feature_extractor=blackbox.features, **FAST)
    separate(x, targets)
    assert separate.cost.forwards == 3 * boxes  # a separate extractor is not the black box
    explainer = explainers.build("iassa", blackbox, iterations=3, **FAST)
    explainer(x, targets)
    masks = explainer.trace["masks"]
    assert all(len(m) == 3 and m[0] == boxes for m in masks)
    assert explainer.cost.forwards == 3 + sum(map(sum, masks))


def test_stops_on_convergence_or_after_k_iterations():
    probe = Probe(constant=0.7)  # the map never changes: ||S_1 - S_0|| = 0
    kwargs = dict(window=4, stride=2, window_decay=1.0, reference_size=12, attention="none", iterations=4,
                  max_forward_batch=64)
    stopped = explainers.build("iassa", probe, tol=1e-6, **kwargs)
    saliency = stopped(torch.rand(2, 3, 12, 12), torch.tensor([0, 1]))
    assert stopped.trace["iterations"] == [2, 2] and all(c[0] < 1e-6 for c in stopped.trace["change"])
    assert torch.allclose(saliency, torch.tensor([0.7, 0.3]).view(2, 1, 1, 1).expand_as(saliency))
    assert stopped.cost.forwards == sum(map(sum, stopped.trace["masks"]))
    full = explainers.build("iassa", probe, tol=0.0, **kwargs)
    full(torch.rand(2, 3, 12, 12), torch.tensor([0, 1]))
    assert full.trace["iterations"] == [4, 4]
    # the windows shrink round by round (4, 3, 2, 1 px; stride 2, 1.8, 1.6, 1.4 px); a flat map keeps them all
    sizes = [len(iassa.sliding_windows(12, 12, *iassa.window_schedule(12, k, 4, 2, 1.0, reference_size=12)))
             for k in range(4)]
    assert full.trace["masks"] == [sizes, sizes]


def test_no_ground_truth_anywhere():
    assert list(inspect.signature(iassa.IASSA._explain).parameters) == ["self", "images", "targets", "seeds"]
    assert list(inspect.signature(iassa.IASSA.__call__).parameters) == ["self", "images", "targets", "indices"]
    explainer = explainers.build("iassa", Probe(), iterations=1, attention="none")
    with pytest.raises(TypeError):
        explainer(torch.rand(1, 3, 12, 12), torch.tensor([0]), mask=torch.ones(1, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        explainers.build("iassa", Probe(), ground_truth=None)


def test_bad_settings_are_refused():
    for kwargs, message in [({"iterations": 31}, "must stay > 0"), ({"attention": "col"}, "attention"),
                            ({"output": "best_iou"}, "output"), ({"threshold": 1.0}, "threshold")]:
        with pytest.raises(ValueError, match=message):
            explainers.build("iassa", Probe(), **{"attention": "none", **kwargs})
    with pytest.raises(TypeError, match="feature levels"):
        explainers.build("iassa", Probe())  # attention needs features; Probe has none


# -- the COCO evaluation path -----------------------------------------------------------------------------
def test_evaluate_on_an_embedded_coco_export(tmp_path):
    from saliency_lab.datamodules import ClutteredFashionMNIST, COCODataModule
    from saliency_lab.datamodules.scene_export import export_coco

    scenes = ClutteredFashionMNIST("val", image_size=32, num_scenes=4)
    annotations = export_coco(scenes, tmp_path / "coco")
    data = COCODataModule(str(tmp_path / "coco" / "images"), str(annotations), image_size=32, num_workers=0)
    coco = data.dataset("val")
    assert data.num_classes == 10 and len(coco) == 4
    assert [int(coco[i]["label"]) for i in range(4)] == [int(scenes[i]["label"]) for i in range(4)]
    assert torch.equal(coco[0]["mask"], scenes[0]["mask"])

    torch.manual_seed(0)
    net = create_network(TINY["model"], 10, TINY["model_kwargs"])
    record = tmp_path / "tiny.pt"
    torch.save(blackbox_record(TINY["model"], net, 10, TINY["model_kwargs"], (0.5,) * 3, (0.25,) * 3), record)
    out = tmp_path / "eval"
    evaluate.main([
        "--blackbox.class_path=saliency_lab.core.blackbox.BlackBox", f"--blackbox.init_args.model=ckpt:{record}",
        "--data.class_path=saliency_lab.datamodules.COCODataModule",
        f"--data.init_args.image_dir_val={tmp_path / 'coco' / 'images'}",
        f"--data.init_args.annotations_val={annotations}",
        "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--split=val", "--explainers=iassa",
        "--method_hparams={iassa: {window: 120, stride: 60, iterations: 2, tol: 0}}", "--batch_size=4",
        "--settings.mf_steps=4", "--settings.protocol={units: 8, steps: 4, deletion_substrate: blur, "
        "insertion_substrate: blur, blur_kernel: 5, blur_sigma: 2.0}", "--overlay_images=0", "--wandb=false", f"--out={out}"])
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 4 and results["data"]["name"] == "COCODataModule"
    stats = results["methods"]["iassa"]
    for key in ("iou", "f1", "iou_top", "f1_top", "iou_pixel", "f1_pixel", "pointing_game", "deletion", "insertion"):
        assert stats[key] is not None and math.isfinite(stats[key]), key
    assert 0 <= stats["iou"] <= 1 and 0 <= stats["f1"] <= 1 and stats["forwards_per_image"] > 25


# -- snapshots: the maps after k rounds of one run ----------------------------------------------------------
def test_snapshot_after_k_rounds_equals_a_fresh_run_with_k_iterations(blackbox, images):
    x, targets = images
    kwargs = dict(window=120.0, stride=60.0, window_decay=20.0, stride_decay=10.0)  # windows shrink round by round
    long = explainers.build("iassa", blackbox, iterations=5, max_forward_batch=16, **kwargs)
    maps, cost = long.explain_with_snapshots(x, targets, (1, 2, 3, 5), indices=torch.tensor([4, 7, 9]))
    assert sorted(maps) == [1, 2, 3, 5] and long.snapshots == () and long.hparams == explainers.build(
        "iassa", blackbox, iterations=5, max_forward_batch=16, **kwargs).hparams
    for k in (1, 2, 3, 5):
        fresh = explainers.build("iassa", blackbox, iterations=k, max_forward_batch=16, **kwargs)
        assert torch.equal(maps[k], fresh(x, targets, torch.tensor([4, 7, 9]))), k  # bit for bit
        assert cost[k]["forwards"] == fresh.cost.forwards and cost[k]["backwards"] == 0
        assert cost[k]["seconds"] >= 0 and cost[k]["cpu_seconds"] >= 0
    assert not torch.equal(maps[1], maps[5]) and torch.equal(maps[5], long(x, targets))
    assert cost[1]["forwards"] < cost[2]["forwards"] < cost[5]["forwards"] == long.cost.forwards
    # the estimate output and early stopping by tol: every snapshot still equals its fresh run
    probe = Probe(constant=0.7)
    stop = dict(window=4, stride=2, window_decay=1.0, reference_size=12, attention="none", tol=1e-6,
                output="estimate", max_forward_batch=64)
    image = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    maps, cost = explainers.build("iassa", probe, iterations=4, **stop).explain_with_snapshots(
        image, torch.tensor([0, 1]), (1, 3, 4))
    for k in (1, 3, 4):
        fresh = explainers.build("iassa", probe, iterations=k, **stop)
        assert torch.equal(maps[k], fresh(image, torch.tensor([0, 1]))) and cost[k]["forwards"] == fresh.cost.forwards
    with pytest.raises(ValueError, match="snapshots"):
        long.explain_with_snapshots(x, targets, (0, 2))
    with pytest.raises(ValueError, match="snapshots"):
        long.explain_with_snapshots(x, targets, (6,))
