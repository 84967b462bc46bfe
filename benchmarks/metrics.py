"""Speed of the causal metrics against the bare forward passes they need, and RISE's peak memory vs N.

    python -m benchmarks.metrics [--repeats 7] [--threads 2] [--device auto] [--clock wall|cpu]

1. deletion + insertion (RISE protocol at 64x64: 64 steps -> 2*65 = 130 forwards per image) for a batch of
   32 embedded test images, against pushing the same number of images through the black box in the same
   chunks (the bare forwards). Target: ratio <= 1.15. Timed alternately in one process; medians.
2. RISE's peak resident memory for N = 500, 2000, 8000 masks, each in a fresh process (on the CPU). Target:
   flat in N.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from saliency_lab.metrics import CausalProtocol, causal_curves


def causal_vs_bare(repeats: int, batch: int = 32, chunk: int = 256, stopwatch: Stopwatch | None = None) -> dict:
    stopwatch = stopwatch or Stopwatch()
    model = BlackBox("embedded").to(stopwatch.device)
    data = embedded_batch(batch)
    images = data["image"].to(stopwatch.device)
    saliency = torch.rand(batch, 1, 64, 64, generator=torch.Generator().manual_seed(0)).to(stopwatch.device)
    with torch.no_grad():
        targets = model(images).argmax(1)
    protocol = CausalProtocol.rise(64, max_forward_batch=chunk)
    total = 2 * (protocol.steps + 1) * batch
    stack = images.repeat(chunk // batch, 1, 1, 1)[:chunk]

    def bare():
        with torch.no_grad():
            for start in range(0, total, chunk):
                model(stack[: min(chunk, total - start)])

    def metric():
        causal_curves(model, images, saliency, targets, protocol)

    bare(), metric()  # warm-up
    bare_times, metric_times = [], []
    for _ in range(repeats):  # alternate, so machine noise hits both alike
        bare_times.append(stopwatch.median(bare, 1))
        metric_times.append(stopwatch.median(metric, 1))
    bare_t, metric_t = sorted(bare_times)[repeats // 2], sorted(metric_times)[repeats // 2]
    return {"images": batch, "forwards": total, "bare_seconds": round(bare_t, 3),
            "metric_seconds": round(metric_t, 3), "ratio": round(metric_t / bare_t, 3)}


def rise_peak_memory(n_masks: int) -> dict:
    from saliency_lab import explainers

    model = BlackBox("embedded")
    data = embedded_batch(2)  # memory is per forward chunk; 2 images keep N = 8000 quick (16k forwards)
    explainer = explainers.build("rise", model, n_masks=n_masks, max_forward_batch=256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    explainer(data["image"], data["label"], data["index"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n_masks": n_masks, "peak_rss_mb": round(after / 1024, 1), "growth_mb": round((after - before) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rise-child", type=int, default=None, help=argparse.SUPPRESS)
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    if args.rise_child is not None:
        print(json.dumps(rise_peak_memory(args.rise_child)))
        return
    print(stopwatch.header(), flush=True)
    result = causal_vs_bare(args.repeats, stopwatch=stopwatch)
    print(f"causal metrics, {result['images']} images x {result['forwards'] // result['images']} forwards: "
          f"metric {result['metric_seconds']} s vs bare forwards {result['bare_seconds']} s -> ratio "
          f"{result['ratio']} (target <= 1.15)")
    for n in (500, 2000, 8000):
        out = subprocess.run([sys.executable, __file__, "--rise-child", str(n), "--threads", str(args.threads),
                              "--device", "cpu"], capture_output=True, text=True, check=True).stdout
        mem = json.loads(out.strip().splitlines()[-1])
        print(f"RISE N={n:5d}: peak RSS {mem['peak_rss_mb']} MB (grew {mem['growth_mb']} MB during the call)")


if __name__ == "__main__":
    main()
