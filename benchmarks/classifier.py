"""Training throughput of embedded black-box candidates (images/s, forward + backward + SGD step, batch 128).

    python -m benchmarks.classifier [--repeats 5] [--steps 3] [--threads 2] [--device auto] [--clock wall|cpu]

Why the embedded classifier uses ``stem_width: 16``: at a quarter of resnet10t's width the deep stem
dominates the cost; this prints the candidates side by side, timed alternately in one run (medians).
"""
from __future__ import annotations

import argparse
import statistics

import timm
import torch

from saliency_lab.core.timing import add_timing_arguments, stopwatch_from_args

CANDIDATES = {
    "resnet10t channels/4, stem 32, 64 px": ({"channels": (32, 64, 128, 256)}, 64),
    "resnet10t channels/4, stem 16, 64 px (ours)": ({"channels": (32, 64, 128, 256), "stem_width": 16}, 64),
    "resnet10t channels/4, stem 32, 48 px": ({"channels": (32, 64, 128, 256)}, 48),
    "resnet10t full width, 64 px": ({}, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    print(stopwatch.header())
    torch.manual_seed(0)
    runs = {}
    for name, (kwargs, size) in CANDIDATES.items():
        model = timm.create_model("resnet10t", num_classes=10, **kwargs).to(stopwatch.device)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01),
                      torch.rand(128, 3, size, size).to(stopwatch.device))
    labels = torch.randint(0, 10, (128,)).to(stopwatch.device)
    rates = {name: [] for name in runs}

    def steps(model, opt, x):
        for _ in range(args.steps):
            torch.nn.functional.cross_entropy(model(x), labels).backward()
            opt.step()
            opt.zero_grad()

    for _ in range(args.repeats + 1):  # the first round warms up
        for name, (model, opt, x) in runs.items():
            seconds = stopwatch.time(lambda: steps(model, opt, x))[1]
            rates[name].append(128 * args.steps / seconds)
    for name, values in rates.items():
        params = sum(p.numel() for p in runs[name][0].parameters()) / 1e6
        print(f"{name:45s} {statistics.median(values[1:]):7.0f} img/s  ({params:.2f} M parameters)")


if __name__ == "__main__":
    main()
