"""Cost of the seeds' other baselines at their defaults: Meaningful Perturbation, Extremal Perturbation, Feature
Inversion and LIME. Black-box passes and seconds per image.

    python -m benchmarks.baselines [--methods mpert,xpert,finv,lime] [--batch 8] [--single 1] [--threads 2]
                                   [--max_forward_batch 256] [--device auto] [--clock wall|cpu]

On the embedded black box and embedded test images (64 x 64, explained class = the prediction), per method at
its docs/methods.md defaults:

1. one call on ``--batch`` images: wall and CPU seconds per image, forwards and backwards per image
   (``explainer.cost``) against the method's exact formula (MPert T, T; XPert A T, A T; FInv 1 + T1 + 2 T2,
   T1 + 2 T2; LIME n, 0);
2. the first ``--single`` images explained alone (seconds per image), and the largest difference between their
   maps and the batched ones (the contract: the same map whatever the batch).

The table configs use these figures to choose how many images each method gets. The machine may be shared:
CPU seconds are less sensitive to other jobs than wall seconds; the counts are exact.
"""
from __future__ import annotations

import argparse
import statistics

import torch


from saliency_lab import explainers
from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args

# Cheap settings of each method for the warm-up (oneDNN builds its kernels per shape on first use).
WARM_UP = {"mpert": {"iterations": 2}, "xpert": {"iterations": 2}, "finv": {"inversion_iterations": 1,
           "class_iterations": 1}, "lime": {"n_samples": 20}}


def exact_counts(explainer, images: int) -> tuple[int, int]:
    """(forwards, backwards) of a call on ``images`` images from the method's formula (its module docstring)."""
    hp = explainer.hparams
    if explainer.name == "mpert":
        per_image = (hp["iterations"], hp["iterations"])
    elif explainer.name == "xpert":
        per_image = (len(hp["areas"]) * hp["iterations"],) * 2
    elif explainer.name == "finv":
        steps = hp["inversion_iterations"] + 2 * hp["class_iterations"]
        per_image = (1 + steps, steps)
    elif explainer.name == "lime":
        per_image = (hp["n_samples"], 0)
    else:
        raise ValueError(f"no cost formula for {explainer.name!r}")
    return per_image[0] * images, per_image[1] * images


def timed(stopwatch: Stopwatch, explainer, images, targets, indices) -> tuple[float, float, torch.Tensor]:
    """(seconds of ``stopwatch``'s clock (wall by default), CPU seconds of this process, saliency), synchronised
    on the stopwatch's device."""
    cpu = Stopwatch(stopwatch.device, "cpu")
    (saliency, cpu_seconds), seconds = stopwatch.time(lambda: cpu.time(lambda: explainer(images, targets, indices)))
    return seconds, cpu_seconds, saliency


def bench(name: str, model, data: dict, targets: torch.Tensor, args) -> dict:
    explainer = explainers.build(name, model, max_forward_batch=args.max_forward_batch)
    images, indices = data["image"], data["index"]
    explainers.build(name, model, max_forward_batch=args.max_forward_batch, **WARM_UP[name])(
        images, targets, indices)
    wall, cpu, together = timed(args.stopwatch, explainer, images, targets, indices)
    cost, batch = explainer.cost, len(images)
    exact = exact_counts(explainer, batch)
    print(f"{name}: B={batch}: {wall / batch:.2f} s/image ({cpu / batch:.2f} s CPU), forwards {cost.forwards / batch:.0f}"
          f" / image, backwards {cost.backwards / batch:.0f} / image; formula {exact[0] // batch} / "
          f"{exact[1] // batch}: match {(cost.forwards, cost.backwards) == exact}", flush=True)
    single_wall, diffs = [], []
    for b in range(args.single):
        seconds, _, alone = timed(args.stopwatch, explainer, images[b:b + 1], targets[b:b + 1], indices[b:b + 1])
        single_wall.append(seconds)
        diffs.append((alone[0] - together[b]).abs().max().item())
    if single_wall:
        print(f"{name}: B=1: {statistics.median(single_wall):.2f} s/image (median of {len(single_wall)}); "
              f"max |B=1 map - batched map| = {max(diffs):.2e} (map range {together.min():.3g} .. "
              f"{together.max():.3g})", flush=True)
    return {"seconds_per_image": wall / batch, "cpu_seconds_per_image": cpu / batch,
            "forwards_per_image": cost.forwards / batch, "backwards_per_image": cost.backwards / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="mpert,xpert,finv,lime")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--single", type=int, default=1, help="images explained alone (the first of the batch)")
    parser.add_argument("--max_forward_batch", type=int, default=256)
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    args.stopwatch = stopwatch_from_args(args)
    model = BlackBox("embedded").to(args.stopwatch.device)
    data = embedded_batch(args.batch)
    data["image"] = data["image"].to(args.stopwatch.device)
    with torch.no_grad():
        targets = model.logits(data["image"]).argmax(1)
    print(args.stopwatch.header())
    print(f"embedded black box, {args.batch} test images {tuple(data['image'].shape[-2:])}, {args.threads} threads, "
          f"max_forward_batch {args.max_forward_batch}", flush=True)
    results = {name.strip(): bench(name.strip(), model, data, targets, args) for name in args.methods.split(",")}
    print("\n| method | s / image | CPU s / image | forwards / image | backwards / image |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds_per_image']:.2f} | {r['cpu_seconds_per_image']:.2f} | "
              f"{r['forwards_per_image']:.0f} | {r['backwards_per_image']:.0f} |")


if __name__ == "__main__":
    main()
