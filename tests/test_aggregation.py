"""One aggregation: evaluate.py and the ExplainerEvaluation callback report the same table for the same images
(metrics.report.summarise); images without ground truth are excluded from the localisation metrics, counted
and warned about; the pointing game is averaged per annotated class; seconds are read after a synchronise."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from saliency_lab.cli import evaluate
from saliency_lab.callbacks import ExplainerEvaluation, ModelRandomisationCheck
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import timed
from saliency_lab.datamodules.common import collate_samples
from saliency_lab.metrics import LOCALISATION_NAMES, EvaluationSettings, score_saliency
from saliency_lab.metrics.report import EXTRA_KEYS, SUMMARY_KEYS, summarise

SIZE, ITEMS = 32, 8
PROTOCOL = {"units": 8, "steps": 8, "deletion_substrate": "blur", "insertion_substrate": "blur", "blur_kernel": 5,
            "blur_sigma": 2.0}


class PartlyAnnotated(Dataset):
    """Random 32x32 images (seeded by index), label index % 3, a 12x12 ground-truth square; every third image
    (0, 3, 6) has no ground truth at all (an empty mask, no boxes), as an ImageNet image without a boxes file."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(100 + i))
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
        boxes = torch.zeros(0, 4)
        if i % 3:
            y, x = (5 * i) % 16, (7 * i) % 16
            mask[0, y:y + 12, x:x + 12] = True
            boxes = torch.tensor([[x, y, x + 12, y + 12]], dtype=torch.float32)
        return {"image": image, "label": torch.tensor(i % 3), "mask": mask, "boxes": boxes, "index": torch.tensor(i)}


class PartlyAnnotatedDataModule(pl.LightningDataModule):
    """The datamodule evaluate.py reads (``dataset(split)``) and the Trainer tests on (``test_dataloader``)."""

    num_classes = 10

    def __init__(self, batch_size: int = 4):
        super().__init__()
        self.batch_size = batch_size

    def dataset(self, split: str) -> Dataset:
        return PartlyAnnotated()

    def test_dataloader(self) -> DataLoader:
        return DataLoader(PartlyAnnotated(), batch_size=self.batch_size, collate_fn=collate_samples)


class Holder(pl.LightningModule):
    """A LightningModule that only holds the black box the callbacks explain."""

    def __init__(self, blackbox: BlackBox):
        super().__init__()
        self.blackbox = blackbox

    def test_step(self, batch, batch_idx):
        pass


def row(index, label, hit, method="m", **values):
    base = {"index": index, "method": method, "label": label, "target": label, "seconds": 0.1, "forwards": 1,
            "backwards": 0, "deletion": 0.2, "insertion": 0.6, "mf": 10.0, "mi": 50.0, "iou": 0.5, "f1": 0.5}
    base.update(pointing_game=hit, **values)
    return base


def test_pointing_is_averaged_per_annotated_class_and_images_without_ground_truth_are_excluded():
    rows = [row(0, 0, 1.0), row(1, 0, 1.0), row(2, 0, 0.0), row(3, 1, 0.0),
            row(4, 1, math.nan, mi=math.nan, iou=math.nan, f1=math.nan),
            row(5, 2, math.nan, mi=math.nan, iou=math.nan, f1=math.nan)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, excluded = summarise(rows, ["m"])
    assert len(caught) == 1 and "2 image(s) have no ground truth" in str(caught[0].message)
    stats = summary["m"]
    # class 0: 2/3, class 1: 0/1, class 2: no image with ground truth (not a class evaluated)
    assert stats["pointing_game"] == pytest.approx((2 / 3 + 0) / 2)
    assert stats["pointing_game_hit_rate"] == pytest.approx(2 / 4)
    assert stats["mi"] == 50.0 and stats["iou"] == 0.5 and stats["images"] == 6
    assert stats["deletion"] == pytest.approx(0.2)  # the causal metrics keep every image
    assert excluded["no_ground_truth"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summarise(rows, ["m"], warn=False)


def test_localisation_metrics_of_an_image_without_ground_truth_are_nan():
    torch.manual_seed(0)
    blackbox = BlackBox("timm:resnet10t", num_classes=3, model_kwargs={"channels": [8, 16, 24, 32]})
    batch = collate_samples([PartlyAnnotated()[i] for i in range(3)])  # image 0 has no ground truth
    saliency = torch.rand(3, 1, SIZE, SIZE)
    settings = EvaluationSettings(protocol=PROTOCOL, mf_steps=4).resolve(SIZE)
    scores = score_saliency(blackbox, batch["image"], saliency, torch.tensor([0, 1, 2]), batch["mask"], settings)
    for name in LOCALISATION_NAMES:
        assert math.isnan(scores.values[name][0]), name
        assert not scores.values[name][1:].isnan().any(), name
    assert not scores.values["deletion"].isnan().any()


def test_seconds_are_read_after_a_device_synchronise(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    result, seconds = timed(lambda: events.append("work") or 7, "cuda")
    assert result == 7 and seconds >= 0 and events == ["sync", "work", "sync"]
    assert timed(lambda: 1, "cpu")[0] == 1


def test_callback_and_evaluate_report_the_same_table(tiny_blackbox_path, tmp_path):
    rise = {"name": "rise", "n_masks": 32}
    results = evaluate.main([
        "--blackbox.class_path=saliency_lab.core.blackbox.BlackBox", f"--blackbox.init_args.model=ckpt:{tiny_blackbox_path}",
        f"--data.class_path={__name__}.PartlyAnnotatedDataModule", "--data.init_args.batch_size=4", "--batch_size=3",
        "--explainers=[gradient, {name: rise, n_masks: 32}]", "--settings.mf_steps=8",
        f"--settings.protocol={PROTOCOL}", "--overlay_images=0", "--randomisation_images=4",
        "--randomisation_fractions=[0.5, 1.0]", "--wandb=false", f"--out={tmp_path / 'evaluate'}"])

    evaluation = ExplainerEvaluation(["gradient", rise], num_images=ITEMS, protocol=PROTOCOL, mf_steps=8,
                                     overlay_images=0, stages=("test",), batch_size=5)
    sanity = ModelRandomisationCheck(["gradient", rise], num_images=4, fractions=(0.0, 0.5, 1.0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[evaluation, sanity])
    with pytest.warns(UserWarning, match="3 image\\(s\\) have no ground truth"):
        trainer.test(Holder(BlackBox(f"ckpt:{tiny_blackbox_path}")), datamodule=PartlyAnnotatedDataModule(),
                     verbose=False)

    assert results["excluded"]["no_ground_truth"] == 3
    assert evaluation.last_results["gradient"]["no_ground_truth"] == 3
    for method in ("gradient", "rise"):
        for key in SUMMARY_KEYS + EXTRA_KEYS + ("images",):
            if key == "seconds_per_image":
                continue
            expected = results["methods"][method][key]
            assert evaluation.last_results[method][key] == pytest.approx(
                math.nan if expected is None else expected, rel=1e-5, abs=1e-6, nan_ok=True), (method, key)
        for key in ("mf", "deletion_norm", "insertion_norm"):
            assert evaluation.last_results[method][f"{key}_excluded"] == results["excluded"][f"{key}_degenerate"][method]
    saved = json.loads((tmp_path / "evaluate" / "randomisation.json").read_text())["rows"]
    assert [(r["explainer"], r["fraction"]) for r in sanity.last_rows] == [(r["explainer"], r["fraction"]) for r in saved]
    for mine, theirs in zip(sanity.last_rows, saved):
        assert mine["per_image"] == pytest.approx(theirs["per_image"], abs=1e-5, nan_ok=True)
