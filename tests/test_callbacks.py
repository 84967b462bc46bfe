"""callbacks/: ExplainerEvaluation inside real Trainer runs (inference mode on, 1 and 2 processes), the probe
set, the figures, and the model-randomisation sanity check."""
from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from saliency_lab.callbacks import (
    ExplainerEvaluation,
    ModelRandomisationCheck,
    curves_figure,
    model_randomisation,
    overlay_grid,
)
from saliency_lab.callbacks.probe import collect_probe
from saliency_lab.datamodules.common import collate_samples
from saliency_lab.core.blackbox import BlackBox

SIZE, CLASSES, ITEMS = 32, 4, 8
RISE = {"name": "rise", "n_masks": 32, "max_forward_batch": 64}
UNIT_METRICS = ("deletion", "insertion", "pointing_game", "pointing_game_hit_rate", "iou", "f1", "iou_top",
                "f1_top", "iou_pixel", "f1_pixel")  # in [0, 1]
PERCENT_METRICS = ("mi",)
COUNTS = ("images", "mf_excluded", "forwards_per_image", "backwards_per_image", "seconds_per_image", "mf",
          "deletion_norm", "insertion_norm", "deletion_norm_excluded", "insertion_norm_excluded")


class Scenes(Dataset):
    """Random 32x32 images (seeded by index), class index % 4, a 12x12 ground-truth square."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
        y, x = (5 * i) % 16, (7 * i) % 16
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
        mask[0, y:y + 12, x:x + 12] = True
        return {"image": image, "label": torch.tensor(i % CLASSES), "mask": mask,
                "boxes": torch.tensor([[x, y, x + 12, y + 12]], dtype=torch.float32), "index": torch.tensor(i)}


def scenes_loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(Scenes(), batch_size=4, shuffle=shuffle, collate_fn=collate_samples)


class InputGradient:
    """A minimal explainer of the contract: |d logit_t / d x|, max over channels. Records the indices it
    explained; counts no cost (``cost = None``)."""

    def __init__(self, blackbox: nn.Module):
        self.blackbox, self.cost, self.calls = blackbox, None, []

    def __call__(self, images, targets, indices=None):
        self.calls.append(indices.tolist())
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.blackbox.logits(x).gather(1, targets[:, None]).sum(), x)
        return grad.abs().amax(1, keepdim=True)


class TinyModule(pl.LightningModule):
    """A frozen tiny black box, a dummy trainable scalar (lr 0: nothing changes between epochs), and an
    ``as_explainer()`` for the "self" entry."""

    def __init__(self, shuffle_val: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.blackbox = BlackBox("timm:resnet10t", num_classes=CLASSES, model_kwargs={"channels": [8, 16, 24, 32]})
        self.scale = nn.Parameter(torch.ones(()))
        self.shuffle_val = shuffle_val
        self.own_explainer = None

    def training_step(self, batch, batch_idx):
        return (self.scale * self.blackbox.logits(batch["image"])).logsumexp(1).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD([self.scale], lr=0.0)

    def train_dataloader(self):
        return scenes_loader()

    def val_dataloader(self):
        return scenes_loader(self.shuffle_val)

    def test_dataloader(self):
        return scenes_loader()

    def as_explainer(self):
        self.own_explainer = InputGradient(self.blackbox)
        return self.own_explainer


def tiny_trainer(root, **overrides) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=2,
                   limit_test_batches=1, logger=False, enable_checkpointing=False, inference_mode=True,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    return pl.Trainer(**{**options, **overrides})


def check_logged(metrics: dict, stage: str, keys) -> None:
    for key in keys:
        for metric in UNIT_METRICS + PERCENT_METRICS + COUNTS:
            assert f"{stage}/{key}/{metric}" in metrics, f"{stage}/{key}/{metric} not logged"
        value = {m: float(metrics[f"{stage}/{key}/{m}"]) for m in UNIT_METRICS + PERCENT_METRICS + COUNTS}
        assert all(0 <= value[m] <= 1 for m in UNIT_METRICS), value
        assert 0 <= value["mi"] <= 100 and value["images"] == 4
        assert math.isfinite(value["mf"]) or value["mf_excluded"] == 4
        assert value["seconds_per_image"] > 0


def test_evaluation_during_fit_and_test_with_inference_mode(tmp_path):
    keys = ["self", "gradient", "rise"]
    evaluation = ExplainerEvaluation(["self", "gradient", RISE], num_images=4, overlay_images=3)
    sanity = ModelRandomisationCheck(["gradient"], num_images=2, fractions=(0.0, 1.0))
    module = TinyModule(shuffle_val=True)  # the probe set must not follow the loader's (shuffled) order
    trainer = tiny_trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), num_sanity_val_steps=1,
                           callbacks=[evaluation, sanity])
    trainer.fit(module)

    check_logged(trainer.callback_metrics, "val", keys)
    # Same four images in both epochs (and none during the sanity check): the "self" explainer saw them.
    assert module.own_explainer.calls == [[0, 1, 2, 3], [0, 1, 2, 3]]
    results = evaluation.last_results
    assert results["gradient"]["forwards_per_image"] >= 1 and results["gradient"]["backwards_per_image"] >= 1
    assert math.isnan(results["self"]["forwards_per_image"])  # InputGradient does not count its passes
    # "self" and "gradient" are the same method (max |grad| over channels): same localisation scores.
    assert results["self"]["pointing_game"] == results["gradient"]["pointing_game"]
    for epoch in (0, 1):
        for suffix in ("_overlays.png", "_curves.png", ".json"):
            assert (tmp_path / "eval" / f"val_epoch{epoch:03d}{suffix}").is_file(), (epoch, suffix)
    record = json.loads((tmp_path / "eval" / "val_epoch001.json").read_text())
    assert record["settings"]["protocol"]["steps"] == SIZE and record["settings"]["protocol"]["target"] == "predicted"

    trainer.test(module, verbose=False)
    check_logged(trainer.callback_metrics, "test", keys)
    assert list((tmp_path / "eval").glob("test_epoch*_overlays.png"))
    assert trainer.callback_metrics["test/randomisation/gradient/spearman_000"] == pytest.approx(1.0)
    assert sanity.last_results["gradient"][1.0] < 0.9


def test_an_alias_that_is_not_a_file_name_is_refused_at_construction():
    for alias in ("../x", "/abs/dir", "val/x"):
        with pytest.raises(ValueError, match=r"explainer alias .* cannot name a file"):
            ExplainerEvaluation([{"name": "gradient", "alias": alias}], num_images=2)
        with pytest.raises(ValueError, match=r"explainer alias .* cannot name a file"):
            ModelRandomisationCheck([{"name": "gradient", "alias": alias}], num_images=2)


def test_probe_shards_cover_the_probe_set_once():
    loader = scenes_loader(shuffle=True)
    whole = collect_probe(loader, num_images=5)
    shards = [collect_probe(loader, num_images=5, rank=r, world_size=2) for r in range(2)]
    assert whole.indices.tolist() == [0, 1, 2, 3, 4]
    assert [s.positions.tolist() for s in shards] == [[0, 2, 4], [1, 3]]
    assert torch.equal(shards[1].images, whole.images[[1, 3]]) and torch.equal(shards[0].masks, whole.masks[::2])
    empty = collect_probe(loader, num_images=1, rank=1, world_size=2)
    assert len(empty) == 0 and empty.images.shape[1:] == (3, SIZE, SIZE)


def test_figures_have_one_panel_per_method(tmp_path):
    images = torch.rand(2, 3, SIZE, SIZE)
    maps = {"a": torch.rand(2, 1, SIZE, SIZE), "b": torch.zeros(2, 1, SIZE, SIZE)}
    grid = overlay_grid(images, maps, ["#0", "#1"])
    assert len(grid.axes) == 2 * 3 and grid.axes[1].get_title() == "a"
    curve = torch.linspace(1, 0, 5)
    curves = curves_figure(torch.linspace(0, 1, 5), {"a": (curve, 1 - curve), "b": (curve, curve)})
    assert len(curves.axes) == 2 and len(curves.axes[0].lines) == 2
    grid.savefig(tmp_path / "grid.png")
    curves.savefig(tmp_path / "curves.png")
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(ValueError, match="titles"):
        overlay_grid(images, maps, ["#0"])


def test_model_randomisation_decorrelates_and_leaves_the_black_box_alone():
    torch.manual_seed(0)
    blackbox = BlackBox("timm:resnet10t", num_classes=CLASSES, model_kwargs={"channels": [8, 16, 24, 32]})
    before = {k: v.clone() for k, v in blackbox.state_dict().items()}
    rng = torch.get_rng_state()
    batch = collate_samples([Scenes()[i] for i in range(3)])
    targets = blackbox.logits(batch["image"]).argmax(1)
    with torch.inference_mode():  # as in a Lightning test loop
        rows = model_randomisation(blackbox, ["gradient", InputGradient], batch["image"], targets,
                                   fractions=(0.0, 0.5, 1.0), seed=3, indices=batch["index"])
    assert [(r["explainer"], r["fraction"]) for r in rows] == [
        (k, f) for f in (0.0, 0.5, 1.0) for k in ("gradient", "InputGradient")]
    by = {(r["explainer"], r["fraction"]): r for r in rows}
    for key in ("gradient", "InputGradient"):
        assert by[key, 0.0]["spearman"] > 0.99 and len(by[key, 0.0]["per_image"]) == 3
        assert by[key, 1.0]["spearman"] < by[key, 0.0]["spearman"] - 0.1
    assert by["gradient", 1.0]["layer"] == "conv1.0" and by["gradient", 0.0]["layer"] == ""
    assert all(torch.equal(v, before[k]) for k, v in blackbox.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------------------------------------------
# DDP: two processes log what one process logs


class WriteResults(pl.Callback):
    """After validation, each rank writes the evaluation callbacks' results to ``rank{r}.json``."""

    def __init__(self, folder):
        self.folder = folder

    def on_validation_end(self, trainer, pl_module):
        results = {}
        for callback in trainer.callbacks:
            if isinstance(callback, (ExplainerEvaluation, ModelRandomisationCheck)):
                results[type(callback).__name__] = {k: {str(m): v for m, v in d.items()}
                                                    for k, d in callback.last_results.items()}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(results))


def run_and_read(folder, **trainer_options) -> list[dict]:
    folder.mkdir()
    callbacks = [ExplainerEvaluation(["gradient", RISE], num_images=5, overlay_images=2),
                 ModelRandomisationCheck(["gradient"], num_images=3, fractions=(0.0, 1.0), stages=("validate",)),
                 WriteResults(folder)]
    trainer = tiny_trainer(folder, limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks,
                           **trainer_options)
    trainer.fit(TinyModule())
    return [json.loads(path.read_text()) for path in sorted(folder.glob("rank*.json"))]


def assert_same_results(left: dict, right: dict) -> None:
    for callback, per_key in left.items():
        for key, values in per_key.items():
            for metric, value in values.items():
                if metric == "seconds_per_image":
                    continue
                assert value == pytest.approx(right[callback][key][metric], rel=1e-4, abs=1e-5, nan_ok=True), \
                    (callback, key, metric)


@pytest.mark.slow
def test_ddp_spawn_two_processes_log_the_same_means_as_one(tmp_path):
    (single,) = run_and_read(tmp_path / "single")
    ranks = run_and_read(tmp_path / "ddp", strategy="ddp_spawn", devices=2)
    assert len(ranks) == 2
    assert single["ExplainerEvaluation"]["gradient"]["images"] == 5
    for rank in ranks:  # uneven shards (3 + 2 images) reduce to the single-process numbers on every rank
        assert_same_results(single, rank)


def test_wandb_logger_receives_the_figures_under_the_prefix(tmp_path):
    from unittest import mock

    from pytorch_lightning.loggers import WandbLogger

    evaluation = ExplainerEvaluation(["gradient"], num_images=2, prefix="probe", stages=("validate",))
    logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    with mock.patch.object(WandbLogger, "log_image", autospec=True) as log_image:
        tiny_trainer(tmp_path, logger=logger, num_sanity_val_steps=0, callbacks=[evaluation]).fit(TinyModule())
    keys = sorted(call.kwargs["key"] for call in log_image.call_args_list)
    assert keys == ["probe/val/curves", "probe/val/overlays"]
    assert all(call.kwargs["images"][0].endswith(".png") for call in log_image.call_args_list)
