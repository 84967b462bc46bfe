"""Label randomisation (Adebayo et al.): the datamodule's shuffled labels, the check as a function, as a callback
and in evaluate.py (randomisation.json and summary), on tiny models; evaluate.py's per-method image counts."""
from __future__ import annotations

import json
import warnings

import pytest
import pytorch_lightning as pl
import torch

from saliency_lab.cli import evaluate
from saliency_lab.callbacks import LabelRandomisationCheck, label_randomisation
from saliency_lab.datamodules import ClutteredFashionMNISTDataModule
from saliency_lab.datamodules.common import collate_samples
from saliency_lab.core.blackbox import BlackBox, blackbox_record, create_network
from tests.test_callbacks import CLASSES, InputGradient, Scenes, TinyModule, scenes_loader
from tests.test_evaluate import args_for

TINY = {"channels": [8, 16, 24, 32]}


@pytest.fixture(scope="module")
def other_blackbox_path(tmp_path_factory):
    """Another random-weight 10-class tiny black box (seed 1): a stand-in for the shuffled-label model."""
    torch.manual_seed(1)
    net = create_network("timm:resnet10t", 10, TINY)
    path = tmp_path_factory.mktemp("bb") / "other.pt"
    torch.save(blackbox_record("timm:resnet10t", net, 10, TINY, (0.5,) * 3, (0.25,) * 3), path)
    return path


def test_shuffled_labels_permute_the_training_labels_only():
    def data(**kwargs):
        module = ClutteredFashionMNISTDataModule(image_size=32, num_train=120, num_val=20, num_test=20, **kwargs)
        module.setup("fit")
        return module

    plain, shuffled, again = data(), data(shuffle_labels=True), data(shuffle_labels=True)
    other = data(shuffle_labels=True, label_seed=1)
    labels = {name: torch.stack([m.dataset("train")[i]["label"] for i in range(120)])
              for name, m in (("plain", plain), ("shuffled", shuffled), ("again", again), ("other", other))}
    assert (labels["plain"] != labels["shuffled"]).float().mean() > 0.8  # ~90% change for 10 balanced classes
    assert torch.equal(labels["shuffled"], labels["again"]) and not torch.equal(labels["shuffled"], labels["other"])
    assert torch.equal(plain.dataset("train")[5]["image"], shuffled.dataset("train")[5]["image"])  # same scenes
    for split in ("val", "test"):
        assert all(plain.dataset(split)[i]["label"] == shuffled.dataset(split)[i]["label"] for i in range(20))
    # A permutation of the items' labels: the class counts of the whole split are kept.
    items = plain.dataset("train").labels
    assert sorted(shuffled.dataset("train").targets.tolist()) == sorted(items.tolist())


def test_label_randomisation_compares_the_maps_of_two_black_boxes():
    torch.manual_seed(0)
    trained = BlackBox("timm:resnet10t", num_classes=CLASSES, model_kwargs=TINY)
    torch.manual_seed(1)
    shuffled = BlackBox("timm:resnet10t", num_classes=CLASSES, model_kwargs=TINY)
    batch = collate_samples([Scenes()[i] for i in range(3)])
    targets = trained.logits(batch["image"]).argmax(1)
    same = label_randomisation(trained, trained, ["gradient", InputGradient], batch["image"], targets,
                               indices=batch["index"])
    assert [r["explainer"] for r in same] == ["gradient", "InputGradient"]
    assert all(r["spearman"] > 0.999 and len(r["per_image"]) == 3 for r in same)
    with torch.inference_mode():  # as in a Lightning test loop
        rows = label_randomisation(trained, shuffled, ["gradient"], batch["image"], targets, indices=batch["index"])
    assert rows[0]["spearman"] < 0.9
    with pytest.raises(ValueError, match="classes"):
        label_randomisation(trained, BlackBox("timm:resnet10t", num_classes=7, model_kwargs=TINY), ["gradient"],
                            batch["image"], targets)


def test_label_randomisation_callback_logs_per_explainer(other_blackbox_path, tmp_path):
    # The callback loads the shuffled model from a record; TinyModule's black box has 4 classes.
    torch.manual_seed(2)
    net = create_network("timm:resnet10t", CLASSES, TINY)
    path = tmp_path / "shuffled.pt"
    torch.save(blackbox_record("timm:resnet10t", net, CLASSES, TINY, (0.5,) * 3, (0.25,) * 3), path)
    check = LabelRandomisationCheck(f"ckpt:{path}", ["gradient"], num_images=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[check])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(TinyModule(), dataloaders=scenes_loader(), verbose=False)
    value = trainer.callback_metrics["test/label_randomisation/gradient/spearman"]
    assert value == pytest.approx(check.last_results["gradient"]) and -1 <= value < 0.9
    assert len(check.last_rows[0]["per_image"]) == 4


def test_evaluate_writes_the_label_check_beside_the_model_check(tiny_blackbox_path, other_blackbox_path, tmp_path):
    args = args_for(f"ckpt:{tiny_blackbox_path}", tmp_path, "--randomisation_images=2",
                    f"--label_randomisation_blackbox=ckpt:{other_blackbox_path}")
    evaluate.main(args)
    saved = json.loads((tmp_path / "randomisation.json").read_text())
    assert saved["label_settings"]["label_blackbox"] == f"ckpt:{other_blackbox_path}"
    assert [r["explainer"] for r in saved["label_rows"]] == ["gradient", "rise"]
    assert all(len(r["per_image"]) == 2 and -1 <= r["spearman"] <= 1 for r in saved["label_rows"])
    summary = (tmp_path / "summary.md").read_text()
    assert "## Model randomisation and label randomisation" in summary
    assert "| method | 50% of layers | shuffled labels |" in summary
    with pytest.raises(ValueError, match="randomisation_images"):
        evaluate.main(args_for(f"ckpt:{tiny_blackbox_path}", tmp_path / "x",
                               f"--label_randomisation_blackbox=ckpt:{other_blackbox_path}"))


def test_method_num_images_limits_one_method(tiny_blackbox_path, tmp_path):
    results = evaluate.main(args_for(f"ckpt:{tiny_blackbox_path}", tmp_path, "--method_num_images={rise: 3}"))
    rows = [json.loads(line) for line in (tmp_path / "rows" / "rows-rank0.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows if r["method"] == "rise") == [0, 1, 2]
    assert sum(r["method"] == "gradient" for r in rows) == 6
    assert results["methods"]["rise"]["images"] == 3 and results["methods"]["gradient"]["images"] == 6
    assert results["method_num_images"] == {"rise": 3}
    assert (tmp_path / "summary.md").read_text().splitlines()[2].endswith("| f1_top | images |")
    # mf_normalized only on the images both methods explained: NaN on the others.
    csv = (tmp_path / "results.csv").read_text().splitlines()
    header = csv[0].split(",")
    gradient_rows = [dict(zip(header, line.split(","))) for line in csv[1:] if ",gradient," in line]
    assert all(r["mf_normalized"] == "nan" for r in gradient_rows if int(r["index"]) >= 3)
    # Not a setting that changes rows: a rerun with a larger count into the same folder only adds the missing ones.
    again = evaluate.main(args_for(f"ckpt:{tiny_blackbox_path}", tmp_path, "--method_num_images={rise: 4}"))
    assert again["methods"]["rise"]["images"] == 4 and again["methods"]["gradient"]["images"] == 6
    with pytest.raises(ValueError, match="method_num_images"):
        evaluate.main(args_for(f"ckpt:{tiny_blackbox_path}", tmp_path / "y", "--method_num_images={lime: 3}"))
