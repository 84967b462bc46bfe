"""``saliency-lab export-scenes --format imagenet|coco --out DIR --num-train N --num-val M``: the embedded scenes
written as an ImageNet-style folder or a COCO data set (:mod:`saliency_lab.datamodules.scene_export`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from saliency_lab.datamodules.scene_export import _scenes, export_coco, export_imagenet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="saliency-lab export-scenes", description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=("imagenet", "coco"), required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=0, help="scenes of the embedded train split")
    parser.add_argument("--num-val", type=int, default=0, help="scenes of the embedded val split")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg", action="store_true", help="write JPEG (lossy) instead of PNG")
    parser.add_argument("--val-layout", choices=("folders", "flat"), default="folders", help="ImageNet only")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    args = parser.parse_args(argv)
    counts = {split: n for split, n in (("train", args.num_train), ("val", args.num_val)) if n > 0}
    if not counts:
        parser.error("nothing to export: give --num-train and/or --num-val > 0")
    fmt = "jpeg" if args.jpeg else "png"
    kwargs = dict(image_size=args.image_size, seed=args.seed, data_dir=args.data_dir)
    if args.format == "imagenet":
        out = export_imagenet(args.out, counts, fmt=fmt, val_layout=args.val_layout, **kwargs)
        print(f"wrote ImageNet-style folder {out} ({counts})")
    else:
        for split, n in counts.items():
            path = export_coco(_scenes(split, n, **kwargs), Path(args.out) / split, fmt=fmt)
            print(f"wrote COCO {split}: {path.parent.parent / 'images'} + {path} ({n} images)")
