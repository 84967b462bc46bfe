"""``saliency-lab teacher --method rise --method_hparams '{n_masks: 1000}' --num_images 2000 --out FILE``: a costly
explainer's maps on the first training scenes, for the mask predictor's teacher loss
(:mod:`saliency_lab.lightning_modules.teacher`)."""
from __future__ import annotations

import json

from jsonargparse import ArgumentParser

from saliency_lab import explainers
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.datamodules import ClutteredFashionMNISTDataModule
from saliency_lab.lightning_modules.teacher import compute_teacher_maps


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="saliency-lab teacher", description=compute_teacher_maps.__doc__)
    parser.add_argument("--blackbox", type=str, default="ckpt:assets/embedded_blackbox.pt")
    parser.add_argument("--method", type=str, default="rise", help="a registered explainer")
    parser.add_argument("--method_hparams", type=dict, default={}, help="its keyword arguments")
    parser.add_argument("--num_images", type=int, default=2000, help="the first N training scenes")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--split", type=str, default="train")
    parser.add_argument("--data", type=dict, default={}, help="ClutteredFashionMNISTDataModule keyword arguments")
    parser.add_argument("--out", type=str, required=True)
    cfg = parser.parse_args(argv)
    if cfg.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {cfg.num_images}")
    blackbox = BlackBox(cfg.blackbox)
    dataset = ClutteredFashionMNISTDataModule(**cfg.data).dataset(cfg.split)
    if cfg.num_images > len(dataset):
        parser.error(f"--num_images {cfg.num_images} exceeds the {len(dataset)} scenes of the {cfg.split} split")
    explainer = explainers.build(cfg.method, blackbox, **cfg.method_hparams)
    record = compute_teacher_maps(blackbox, explainer, dataset, cfg.num_images, cfg.batch_size, cfg.out)
    n = len(record["indices"])
    print(json.dumps({"out": cfg.out, "images": n, "explainer": record["explainer"],
                      "forwards_per_image": record["forwards"] / n, "seconds_per_image": record["seconds"] / n,
                      "seconds": record["seconds"]}, indent=1))
