"""Cost of the bad-image check per file (datamodules.common.image_problem), quick vs full.

    python -m benchmarks.image_check [--files 2000] [--repeats 5] [--clock wall|cpu]

Writes N random 500x375 JPEGs (ImageNet's typical size) into a temporary folder, reads them once so they
are in the page cache, then times ``drop_bad_images`` over all of them with 2 threads: "quick" (the header
is opened for its size, the decompression-bomb check, then the JPEG end marker is read) and "full" (every
file decoded at 1/8 scale). Prints microseconds per file (medians) and the extrapolation to ImageNet train
(1.28 M files).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from saliency_lab.datamodules.common import drop_bad_images

IMAGENET_TRAIN = 1_281_167


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    if stopwatch.device.type != "cpu":  # reading files: nothing runs on an accelerator
        stopwatch = Stopwatch(torch.device("cpu"), args.clock)
    print(stopwatch.header(), flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(args.files):
            path = Path(folder) / f"{i:06d}.JPEG"
            pixels = rng.integers(0, 256, (375 // 25, 500 // 25, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((500, 375), Image.BILINEAR).save(path, quality=90)
            paths.append(str(path))
        for path in paths:
            Path(path).read_bytes()
        result = {}
        for verify in ("quick", "full"):
            seconds = stopwatch.median(lambda: drop_bad_images(paths, verify, workers=2), args.repeats)
            per_file = seconds / len(paths)
            result[verify] = {"us_per_file": round(per_file * 1e6, 1),
                              "imagenet_train_minutes": round(per_file * IMAGENET_TRAIN / 60, 1)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
