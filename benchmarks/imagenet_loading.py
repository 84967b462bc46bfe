"""Images per second of the ImageNet datamodule's loaders, by JPEG decoder, resize path and number of workers.

    python -m benchmarks.imagenet_loading [--images 512] [--width 500 --height 375] [--image-size 224]
        [--workers 0,2,8] [--batch-size 32] [--repeats 3] [--threads 1] [--clock wall|cpu] [--json FILE]

Data: ``--images`` train and ``--images`` val embedded scenes, rendered at max(width, height) px, resized to
width x height (default 500 x 375, ImageNet's most common size) and exported with
``datamodules.scene_export.export_imagenet`` as quality-95 ``.JPEG`` files in ImageNet's folder layout, in a
temporary folder (offline; the files are read once so that they are in the page cache). The scenes are
smoother than photographs, so their files are smaller than ImageNet's (the mean size is printed).

Figures, on the datamodule's own loaders (``ImageNetDataModule``, ``image_size`` 224, the train loader shuffles,
random-resized-crops and flips; val resizes the shorter side to 256 and centre-crops):

1. per-image milliseconds of each step in this process: decoding (``decoder="pil"``: ``PIL.Image.open(path)
   .convert("RGB")`` through ``common.load_rgb``, to a PIL image and on to a uint8 tensor; ``"torchvision"``:
   the file's bytes through ``torchvision.io.decode_jpeg``, see ``common.load_rgb_uint8``) and the train / val
   geometry (Pillow's bilinear resize on the PIL image, or ``torchvision.transforms.v2`` on the (3,H,W) uint8
   tensor with ``antialias=True``);
2. images per second of whole loader passes (median of ``--repeats`` passes after one warm-up pass that also
   starts the persistent workers; the decoder/resize choices are interleaved within each repeat) for every
   decoder x resize x ``--workers``;
3. the largest and the mean absolute difference in [0,1] of each choice's images against
   ``decoder="pil", resize="pil"`` for the same files and crop parameters (train: the same torch seed before
   each sample), against ``imagenet.PIXEL_TOLERANCE``, beside JPEG's own coding error on these files.

``--threads`` is the torch threads of this process (1, like each DataLoader worker, by default); wall clock
only when workers run (a CPU clock would not see their time).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from saliency_lab.datamodules import ClutteredFashionMNIST, ImageNetDataModule, ImageNetFolder
from saliency_lab.datamodules.common import load_rgb, load_rgb_uint8
from saliency_lab.datamodules.imagenet import DECODERS, PIXEL_TOLERANCE, RESIZERS
from saliency_lab.datamodules.scene_export import export_imagenet

CHOICES = [(decoder, resize) for decoder in DECODERS for resize in reversed(RESIZERS)]  # (pil, pil) first
REFERENCE = ("pil", "pil")  # what the module did before the options


class ResizedScenes(Dataset):
    """Embedded scenes of one split rendered at max(width, height) px and resized (bilinear, antialiased) to
    width x height: sample dicts with ``image`` (3,height,width) float in [0,1], 8-bit levels, and boxes scaled."""

    def __init__(self, split: str, count: int, width: int, height: int):
        self.scenes = ClutteredFashionMNIST(split, max(width, height), num_scenes=count)
        self.classes, self.width, self.height = self.scenes.classes, width, height

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.scenes[i])
        side = self.scenes.image_size
        image = F.interpolate(sample["image"][None], size=(self.height, self.width), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        sample["image"] = image.clamp(0, 1).mul(255).round().div(255)
        sample["boxes"] = sample["boxes"] * torch.tensor([self.width / side, self.height / side] * 2)
        return sample


def write_jpegs(folder: Path, count: int, width: int, height: int) -> dict:
    """Export ``count`` train and ``count`` val scenes as ImageNet-layout JPEGs; their count and mean KB."""
    splits = {split: ResizedScenes(split, count, width, height) for split in ("train", "val")}
    export_imagenet(folder, splits, fmt="jpeg")
    files = sorted(folder.glob("*/*/*.JPEG"))
    for path in files:  # into the page cache
        path.read_bytes()
    return {"files": len(files), "mean_kb": round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1),
            "width": width, "height": height}


def step_costs(root: Path, image_size: int, stopwatch: Stopwatch, repeats: int) -> dict:
    """Per-image milliseconds of decoding and of the train / val geometry, in this process."""
    out = {}
    paths = [p for p, _ in ImageNetFolder(root, "val", image_size, verify="off").samples]
    seconds = stopwatch.median(lambda: [load_rgb(p) for p in paths], repeats)
    out["decode pil (file to PIL image)"] = 1000 * seconds / len(paths)
    for decoder in DECODERS:
        seconds = stopwatch.median(lambda: [load_rgb_uint8(p, decoder) for p in paths], repeats)
        out[f"decode {decoder} (file to uint8 tensor)"] = 1000 * seconds / len(paths)
    for split in ("train", "val"):
        for resize in reversed(RESIZERS):
            data = ImageNetFolder(root, split, image_size, verify="off", resize=resize)
            images = [data.load(p) for p, _ in data.samples]
            seconds = stopwatch.median(lambda: [data.transform(image) for image in images], repeats)
            out[f"{split} geometry on {'PIL image' if resize == 'pil' else 'uint8 tensor'}"] = (
                1000 * seconds / len(images))
    return out


def loader_rates(root: Path, image_size: int, batch_size: int, workers: list[int], repeats: int,
                 stopwatch: Stopwatch) -> dict:
    """{split: {"decoder/resize": {workers: images per second}}}: medians of whole passes over the loader."""
    rates: dict = {}
    for split in ("train", "val"):
        rates[split] = {f"{d}/{r}": {} for d, r in CHOICES}
        for count in workers:
            loaders = {}
            for decoder, resize in CHOICES:
                data = ImageNetDataModule(str(root), image_size, batch_size, count, verify="off", decoder=decoder,
                                          resize=resize)
                loaders[f"{decoder}/{resize}"] = data.train_dataloader() if split == "train" else data.val_dataloader()
            images = len(next(iter(loaders.values())).dataset)
            seconds: dict[str, list[float]] = {name: [] for name in loaders}
            for round_ in range(repeats + 1):  # round 0 warms up (and starts the workers)
                for name, loader in loaders.items():
                    _, elapsed = stopwatch.time(lambda: sum(len(batch["label"]) for batch in loader))
                    if round_:
                        seconds[name].append(elapsed)
            for name, values in seconds.items():
                rates[split][name][count] = images / sorted(values)[len(values) // 2]
            print(f"  {split}, {count} workers: " + ", ".join(f"{n} {r[count]:.0f}/s" for n, r in rates[split].items()),
                  flush=True)
            del loaders  # ends the persistent workers
            gc.collect()
    return rates


def agreement(root: Path, image_size: int, width: int, height: int, count: int) -> dict:
    """Largest and mean absolute differences in [0,1] of every choice against REFERENCE, and JPEG's coding error."""
    out = {}
    for split in ("train", "val"):
        reference = ImageNetFolder(root, split, image_size, verify="off", decoder=REFERENCE[0], resize=REFERENCE[1])
        for decoder, resize in CHOICES:
            if (decoder, resize) == REFERENCE:
                continue
            other = ImageNetFolder(root, split, image_size, verify="off", decoder=decoder, resize=resize)
            largest, total, values = 0.0, 0.0, 0
            for i in range(len(reference)):
                torch.manual_seed(i)
                a = reference[i]["image"]
                torch.manual_seed(i)
                b = other[i]["image"]
                diff = (a - b).abs()
                largest, total, values = max(largest, diff.max().item()), total + diff.sum().item(), values + diff.numel()
            out[f"{split} {decoder}/{resize}"] = {"max_abs": largest, "mean_abs": total / values}
    scenes = ResizedScenes("val", count, width, height)
    data = ImageNetFolder(root, "val", image_size, verify="off")
    errors = []
    for path, _ in data.samples:
        index = int(Path(path).stem.rsplit("_", 1)[1])
        errors.append((load_rgb_uint8(path).float() / 255 - scenes[index]["image"]).abs().mean().item())
    out["jpeg coding error (val files vs their scenes)"] = {"max_abs": None, "mean_abs": sum(errors) / len(errors)}
    return out


def print_tables(costs: dict, rates: dict, agree: dict, workers: list[int]) -> None:
    print("\nPer image, this process (ms):")
    print("| step | ms/image |\n|---|---|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.2f} |")
    print("\nLoaders (images/s, median of whole passes):")
    print("| split | decoder / resize | " + " | ".join(f"{w} workers" for w in workers) + " |")
    print("|---|---|" + "---|" * len(workers))
    for split, by_choice in rates.items():
        base = by_choice["/".join(REFERENCE)]
        for name, by_workers in by_choice.items():
            cells = [f"{by_workers[w]:.0f} ({by_workers[w] / base[w]:.2f}x)" for w in workers]
            print(f"| {split} | {name} | " + " | ".join(cells) + " |")
    print(f"\nPixels against {'/'.join(REFERENCE)} ([0,1] units; tolerance max {PIXEL_TOLERANCE['max_abs']:.4f}, "
          f"mean {PIXEL_TOLERANCE['mean_abs']:.5f}):")
    print("| images | max abs | mean abs | within tolerance |\n|---|---|---|---|")
    for name, d in agree.items():
        if d["max_abs"] is None:
            print(f"| {name} | – | {d['mean_abs']:.5f} | – |")
            continue
        ok = d["max_abs"] <= PIXEL_TOLERANCE["max_abs"] and d["mean_abs"] <= PIXEL_TOLERANCE["mean_abs"]
        print(f"| {name} | {d['max_abs']:.4f} ({d['max_abs'] * 255:.0f}/255) | {d['mean_abs']:.6f} "
              f"({d['mean_abs'] * 255:.4f}/255) | {'yes' if ok else 'NO'} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="JPEG files per split")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=224, help="the loaders' output side")
    parser.add_argument("--workers", default="0,2,8", help="num_workers values, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_timing_arguments(parser, threads=1, clock="wall")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.clock != "wall" and any(workers):
        parser.error("--clock cpu counts this process only, not its DataLoader workers: use --workers 0 with it")
    stopwatch = stopwatch_from_args(args)
    if stopwatch.device.type != "cpu":  # loading runs on the CPU
        stopwatch = Stopwatch(torch.device("cpu"), args.clock)
    cores, usable = os.cpu_count(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(stopwatch.header())
    print(f"This machine has {cores} logical cores ({usable} usable by this process): num_workers above that share "
          f"them.", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write_jpegs(root, args.images, args.width, args.height)
        print(f"{data['files']} JPEG files of {args.width} x {args.height} (quality 95, mean {data['mean_kb']} KB), "
              f"loaders at {args.image_size} px, batch {args.batch_size}, median of {args.repeats} passes", flush=True)
        costs = step_costs(root, args.image_size, stopwatch, args.repeats)
        with warnings.catch_warnings():  # torch's "more workers than cores": the line above gives the cores
            warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes")
            rates = loader_rates(root, args.image_size, args.batch_size, workers, args.repeats, stopwatch)
        agree = agreement(root, args.image_size, args.width, args.height, args.images)
    print_tables(costs, rates, agree, workers)
    result = {"machine": stopwatch.header(), "logical_cores": cores, "usable_cores": usable, "data": data,
              "image_size": args.image_size, "batch_size": args.batch_size, "ms_per_image": costs,
              "images_per_second": rates, "pixels_vs_pil_pil": agree, "tolerance": PIXEL_TOLERANCE}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
