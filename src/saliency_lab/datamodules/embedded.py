"""The embedded default data: cluttered Fashion-MNIST scenes (see ``scenes.py``) as a Dataset and a
LightningDataModule.

Splits: ``train`` and ``val`` draw their items from Fashion-MNIST's 60k training images (a fixed
permutation: the first ``val_items`` go to val, the rest to train), ``test`` from its 10k test images;
distractor fragments come from the same split's items, so no test pixel is seen in training. A split may
hold more scenes than items: scene ``i`` uses item ``i mod len(items)`` with its own layout.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from . import fashion_mnist
from .common import SplitDataModule
from .scenes import SPLIT_CODES, Clutter, render_scene

_SPLIT_PERMUTATION_SEED = 20240601  # fixed: the train/val item split does not move with the scene seed
_MAX_REJECTIONS = 64  # distractor draws before drawing among the other-class items directly


class ClutteredFashionMNIST(Dataset):
    """Scenes of one split. ``dataset[i]`` is a sample dict (see ``datamodules.common``).

    Args:
        split: "train", "val" or "test".
        image_size: canvas side S in pixels.
        clutter: generator knobs.
        seed: scene seed; scene i is a pure function of (seed, split, i).
        num_scenes: number of scenes (default: number of items of the split).
        data_dir: folder with the Fashion-MNIST IDX files (default: the Debian package's folder).
        val_items: training items set aside for the val split.
        cache: keep every rendered scene (as 8-bit pixels, ~16 KB at 64 px) in the memory of the process
            that rendered it, so later epochs only copy. Exact: scenes are 8-bit quantised anyway.
        label_seed: None (default) returns each item's true label. An int returns the labels of a fixed
            permutation of the split's items instead (item i gets the label of item perm[i],
            perm = ``numpy.random.default_rng(label_seed).permutation``): the label-randomisation sanity check
            (Adebayo et al.). The scenes themselves (layout, distractors of other true classes) do not change.
    """

    classes = fashion_mnist.CLASSES
    num_classes = len(fashion_mnist.CLASSES)

    def __init__(
        self,
        split: str,
        image_size: int = 64,
        clutter: Clutter | dict | None = None,
        seed: int = 0,
        num_scenes: int | None = None,
        data_dir: str | os.PathLike | None = None,
        val_items: int = 5000,
        download: bool = False,
        cache: bool = False,
        label_seed: int | None = None,
    ):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.split, self.image_size, self.clutter, self.seed = split, image_size, Clutter.coerce(clutter), seed
        images, labels = fashion_mnist.load("test" if split == "test" else "train", data_dir, download)
        if split != "test":
            order = np.random.default_rng(_SPLIT_PERMUTATION_SEED).permutation(len(images))
            order = order[:val_items] if split == "val" else order[val_items:]
            images, labels = images[order], labels[order]
        self.items, self.labels = images, labels
        if len(images) == 0:
            raise ValueError(f"the {split} split has no Fashion-MNIST items (val_items={val_items})")
        if self.clutter.distractors > 0 and len(np.unique(labels)) < 2:
            raise ValueError(f"the {split} split holds items of class {int(labels[0])} only, and distractors are "
                             "fragments of other classes: use more items or clutter.distractors=0")
        self._other_items: dict[int, np.ndarray] = {}
        # What __getitem__ reports; rendering keeps using the true labels, so only the label changes.
        self.targets = labels if label_seed is None else labels[np.random.default_rng(label_seed).permutation(len(labels))]
        self.num_scenes = len(images) if num_scenes is None else int(num_scenes)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = {} if cache else None
        if self.num_scenes <= 0:
            raise ValueError(f"num_scenes must be positive, got {num_scenes}")

    def __len__(self) -> int:
        return self.num_scenes

    def scene_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])

    def _other_class_item(self, rng: np.random.Generator, label: int) -> int:
        """A uniformly drawn item of another class. Rejection sampling (10 balanced classes: ~1.1 draws)
        with a bound: after _MAX_REJECTIONS misses (a rare class among unbalanced labels) it draws among the
        other-class items directly, so it never loops forever; balanced data never gets there (0.1^64)."""
        for _ in range(_MAX_REJECTIONS):
            j = int(rng.integers(len(self.items)))
            if self.labels[j] != label:
                return j
        if label not in self._other_items:
            self._other_items[label] = np.flatnonzero(self.labels != label)
        others = self._other_items[label]  # never empty: construction checks that two classes are present
        return int(others[rng.integers(len(others))])

    def layout(self, index: int) -> tuple[np.random.Generator, int, list[int]]:
        """The scene's generator (advanced past the draws made here), its item and its distractor items."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene index {index} out of range for {self.num_scenes} {self.split} scenes")
        rng = self.scene_rng(index)
        item_idx = index % len(self.items)
        label = int(self.labels[item_idx])
        return rng, item_idx, [self._other_class_item(rng, label) for _ in range(self.clutter.distractors)]

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scene ``index``: image (3,S,S) float in [0,1], mask (1,S,S) bool, boxes (1,4)."""
        rng, item_idx, distractor_idx = self.layout(index)
        return render_scene(rng, self.items[item_idx], [self.items[j] for j in distractor_idx],
                            self.image_size, self.clutter)

    def __getitem__(self, index: int) -> dict:
        if self._cache is None:
            image, mask, boxes = self.render(index)
        elif index in self._cache:
            pixels, mask, boxes = self._cache[index]
            image = pixels.float().div_(255)
        else:
            image, mask, boxes = self.render(index)
            self._cache[index] = (image.mul(255).round_().to(torch.uint8), mask, boxes)
        label = int(self.targets[index % len(self.items)])
        return {"image": image, "label": torch.tensor(label), "mask": mask.clone(), "boxes": boxes.clone(),
                "index": torch.tensor(index)}


class ClutteredFashionMNISTDataModule(SplitDataModule):
    """Train/val/test loaders of cluttered Fashion-MNIST scenes; batches as in ``datamodules.common``.

    Args:
        data_dir: folder with the Fashion-MNIST IDX files (default: ``/usr/share/datasets/fashion-mnist``).
        image_size: canvas side in pixels.
        clutter: scene generator knobs.
        seed: scene seed.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader workers.
        num_train, num_val, num_test: scenes per split (default: one per item: 55000 / 5000 / 10000).
        download: let torchvision download Fashion-MNIST into ``data_dir`` when missing (needs internet).
        cache: keep rendered scenes in memory across epochs (see ``ClutteredFashionMNIST``).
        shuffle_labels: train on shuffled labels (the label-randomisation sanity check, Adebayo et al.): the
            train split's labels become those of a fixed permutation of its items (``label_seed``); val and
            test keep their true labels, so ``val/acc`` shows how much of the truth such a model learns (chance:
            10%).
        label_seed: seed of that permutation.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: int = 64,
        clutter: Clutter | None = None,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        download: bool = False,
        cache: bool = False,
        shuffle_labels: bool = False,
        label_seed: int = 0,
    ):
        super().__init__()
        self.clutter = Clutter.coerce(clutter)
        self.save_hyperparameters(ignore=["clutter"])
        self.hparams["clutter"] = self.clutter.to_dict()  # plain data: checkpoints stay weights_only-loadable
        self.num_classes = ClutteredFashionMNIST.num_classes
        self.classes = ClutteredFashionMNIST.classes
        self.datasets: dict[str, ClutteredFashionMNIST] = {}

    def prepare_data(self) -> None:
        fashion_mnist.locate(self.hparams.data_dir, self.hparams.download)

    def dataset(self, split: str) -> ClutteredFashionMNIST:
        if split not in self.datasets:
            hp = self.hparams
            num = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}[split]
            self.datasets[split] = ClutteredFashionMNIST(
                split, hp.image_size, self.clutter, hp.seed, num, hp.data_dir, download=hp.download,
                cache=hp.cache, label_seed=hp.label_seed if hp.shuffle_labels and split == "train" else None)
        return self.datasets[split]


def embedded_batch(count: int, split: str = "test", image_size: int = 64) -> dict:
    """The first ``count`` scenes of ``split`` stacked as one batch ``{image, label, mask, index}`` (benchmarks,
    examples)."""
    dataset = ClutteredFashionMNIST(split, image_size=image_size, num_scenes=count)
    samples = [dataset[i] for i in range(count)]
    return {key: torch.stack([s[key] for s in samples]) for key in ("image", "label", "mask", "index")}
