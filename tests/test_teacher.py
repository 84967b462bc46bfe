"""Teacher maps for the predictor's teacher loss: computed once, resumable, read back safely, and a loss that
pulls the mask's ranking towards the teacher's."""
from __future__ import annotations

import warnings

import pytest
import torch

from saliency_lab import explainers
from saliency_lab.datamodules import ClutteredFashionMNIST
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.lightning_modules.mask_predictor import MaskPredictor
from saliency_lab.lightning_modules.objectives import Preservation, Teacher
from saliency_lab.lightning_modules.teacher import compute_teacher_maps, load_teacher_maps, rank_targets

SIZE = 32


def test_rank_targets_are_standardised_ranks():
    maps = torch.tensor([[[[0.1, 0.9], [0.5, 0.2]]]])
    ranks = rank_targets(maps, (2, 2))
    assert ranks.flatten().argsort().tolist() == [0, 3, 2, 1]  # same order as the map
    assert abs(ranks.mean().item()) < 1e-6 and abs(ranks.std(unbiased=False).item() - 1) < 1e-5


def test_teacher_maps_resume_and_train_the_mask_towards_them(tiny_blackbox_path, tmp_path):
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    dataset = ClutteredFashionMNIST("train", SIZE, num_scenes=6)
    explainer = explainers.build("rise", blackbox, n_masks=16)
    out = tmp_path / "teacher.pt"
    compute_teacher_maps(blackbox, explainer, dataset, 2, 2, out)  # as if killed after two maps
    resumed = compute_teacher_maps(blackbox, explainer, dataset, 6, 4, out)
    fresh = compute_teacher_maps(blackbox, explainer, dataset, 6, 4, tmp_path / "six.pt")
    assert resumed["indices"].tolist() == fresh["indices"].tolist() == list(range(6))
    assert torch.equal(resumed["maps"], fresh["maps"]) and fresh["maps"].shape == (6, 1, SIZE, SIZE)
    assert resumed["forwards"] == fresh["forwards"] == 6 * 16 and fresh["seconds"] > 0
    assert fresh["explainer"] == "rise" and fresh["hparams"]["n_masks"] == 16
    assert compute_teacher_maps(blackbox, explainer, dataset, 6, 4, out)["forwards"] == 6 * 16  # reused as it is
    with pytest.raises(ValueError, match="another explainer"):
        compute_teacher_maps(blackbox, explainers.build("rise", blackbox, n_masks=8), dataset, 6, 4, out)
    with pytest.raises(ValueError, match="incomplete"):
        torch.save({**fresh, "complete": False}, tmp_path / "cut.pt")
        load_teacher_maps(tmp_path / "cut.pt")
    # a run asked for more maps, stopped after 6, is complete for a request of 6 (or fewer) without new work
    assert compute_teacher_maps(blackbox, explainer, dataset, 6, 4, tmp_path / "cut.pt")["forwards"] == 6 * 16
    assert load_teacher_maps(tmp_path / "cut.pt")["complete"]
    record = load_teacher_maps(tmp_path / "six.pt")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained filter
        torch.manual_seed(0)
        teacher = Teacher(maps=str(tmp_path / "six.pt"))
        model = MaskPredictor(blackbox=blackbox, filter_checkpoint=None, objectives=[Preservation(), teacher])
    with pytest.raises(ValueError, match="scores the explained class"):
        MaskPredictor(blackbox=blackbox, filter_checkpoint=None, objectives=[teacher])
    images = torch.stack([dataset[i]["image"] for i in range(6)])
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        features = model.blackbox.features(images)
    optimizer = torch.optim.Adam([p for p in model.net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        batch = model.training_batch(images, model.net(features, record["targets"]), record["targets"], index, 0)
        term = teacher.value(batch, [], None)
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
        losses.append(term.item())
    assert losses[-1] < losses[0] - 0.1, losses
    unknown = teacher.value(model.training_batch(images, model.net(features, record["targets"]), record["targets"],
                                                 torch.arange(100, 106), 0), [], None)
    assert unknown.item() == 0.0  # images without a teacher map do not contribute
