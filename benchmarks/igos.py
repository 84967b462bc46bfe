"""Speed and black-box passes of iGOS++ / I-GOS at default settings: B = 16 images in one call vs one at a time.

    python -m benchmarks.igos [--methods igos_pp,igos] [--batch 16] [--single 3] [--repeats 1]
                              [--iterations T] [--max_forward_batch 256] [--threads 2]
    python -m benchmarks.igos --pass-limit K [--methods igos_pp] [--iterations T] [--converge_tol TOL]
                              [--clock wall|cpu]

``--pass-limit K``: per-image wall time against its bare black-box passes, K images one at a time (the
target is <= 1.15x; see :func:`pass_limit`; figures in docs/results/speed.md). Building the rows (per image and term one
upsampled product, one gather and one multiply-add per row, the noise drawn into the rows' buffer) is small
next to their forward pass (the timings are in docs/results/speed.md).
Batching the line-search trials of a step would not save passes: the backtracking search evaluates exactly the
trials it needs (mean ~5-8 of at most 13), a batch of k trials costs k evaluations whether or not the first
would have been accepted, and per row the black box was measured no faster at 160-1000 rows than at 80 (docs/results/speed.md).
Otherwise:

On the embedded black box and embedded test images (64 x 64, explained class = the prediction), per method:

1. B = 16: ``--repeats`` calls on the 16 images; seconds per image = call time / 16 (median over repeats).
2. B = 1: the first ``--single`` of those images explained alone, one call each (median seconds per image);
   their maps are compared with the batched ones (same seeds and indices: they must agree).
   The calls are interleaved (image 0 alone, the batch, the other images alone); wall and CPU time both.
3. Per-image speedup B = 16 vs B = 1 (target >= 4x on 2 cores), raw and per forward pass: each image's
   line search takes its own number of trials, so images differ in work; the per-pass ratio removes that.
4. Forward / backward counts: measured (``explainer.cost``) against the exact formula
   P (2T + sum of trials), P T (P = 4n for igos_pp, n for igos) and docs/methods.md's 4 n T (2 + mean trials).

What it found (2 cores, 64 px, quiet machine): B = 16 is *not* faster per image (0.8-0.9x). One image alone
already sends all its 4n = 80 IG points (n = 20 for igos) through the black box together, which fills both
cores; bigger chunks only cost cache (per forward pass at batch 20 / 80 / 256 in channels_last: 0.60 / 0.49 /
0.55 ms forward, 1.54 / 1.37 / 1.56 ms forward + backward). Batching images pays where one image's points
leave the device idle (GPUs, small n).

Default settings take minutes per method on 2 cores (an untrained black box makes the line search backtrack
to its floor often, ~13 trials). The machine may be shared: figures are noisy; the counts are exact.
"""
from __future__ import annotations

import argparse
import statistics

import torch


from saliency_lab import explainers
import saliency_lab.explainers.igos  # noqa: F401  registers igos_pp / igos
from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from benchmarks.pass_overhead import measure


def timed_call(stopwatch: Stopwatch, explainer, images, targets, indices) -> tuple[float, float, torch.Tensor]:
    """(seconds of ``stopwatch``'s clock (wall by default), CPU seconds of this process, saliency), synchronised on
    the stopwatch's device. CPU time is less sensitive to other jobs taking the cores (it does not count time
    spent descheduled), so both are reported."""
    cpu = Stopwatch(stopwatch.device, "cpu")
    (saliency, cpu_seconds), seconds = stopwatch.time(lambda: cpu.time(lambda: explainer(images, targets, indices)))
    return seconds, cpu_seconds, saliency


def exact_counts(explainer, trials: torch.Tensor, ran: torch.Tensor) -> tuple[int, int]:
    """(forwards, backwards) of a call from its line-search record (B, T) and the iterations each image ran
    (``last_iterations`` (B,)): the formula of explainers/igos.py."""
    points, ran = explainer.points_per_evaluation, int(ran.sum())
    if explainer.optimizer == "nag":
        return points * ran, points * ran
    return points * (2 * ran + int(trials.sum())), points * ran


def pass_limit(name: str, model, data: dict, targets: torch.Tensor, args) -> None:
    """Per-image time against its bare passes (target <= 1.15x), images explained one at a time: the black box's
    calls recorded and replayed alone (:func:`benchmarks.pass_overhead.measure`, the same measurement for every
    method); ``--clock cpu`` times with the process's CPU time (a shared machine; with ``--threads 1``)."""
    hparams = {"max_forward_batch": args.max_forward_batch}
    if args.iterations:
        hparams["iterations"] = args.iterations
    if args.converge_tol is not None:
        hparams["converge_tol"] = args.converge_tol
    options = argparse.Namespace(hparams={name: hparams}, images=args.pass_limit, clock=args.clock,
                                 stopwatch=args.stopwatch)
    measure(name, model, data, targets, options)


def bench(name: str, model, data: dict, targets: torch.Tensor, args) -> None:
    hparams = {"max_forward_batch": args.max_forward_batch}
    if args.iterations:
        hparams["iterations"] = args.iterations
    explainer = explainers.build(name, model, **hparams)
    images, indices = data["image"], data["index"]
    # Warm-up: one iteration alone and one on the batch. oneDNN builds its kernels per input shape, and the
    # line search meets many batch shapes (chunk remainders of the still-searching images): a cold run
    # would charge that one-off cost to whichever call comes first.
    warm = explainers.build(name, model, **{**hparams, "iterations": 1})
    warm(images[:1], targets[:1], indices[:1])
    warm(images, targets, indices)

    single_seconds, single_cpu, single_forwards, single_maps, single_trials = [], [], [], [], []
    batch_seconds, batch_cpu = [], []
    # Interleaved (B=1 image 0, the B=16 call(s), then the other B=1 images), so load changes on a shared
    # machine hit both sides.
    for b in range(args.single):
        if b == min(1, args.single - 1):
            for _ in range(args.repeats):
                seconds, cpu, together = timed_call(args.stopwatch, explainer, images, targets, indices)
                batch_seconds.append(seconds)
                batch_cpu.append(cpu)
                cost, trials, ran = explainer.cost, explainer.last_trials, explainer.last_iterations
                print(f"  B={len(images)} call: {seconds:7.2f} s ({cpu:7.2f} s CPU), {cost.forwards} forwards, "
                      f"{cost.backwards} backwards", flush=True)
        seconds, cpu, saliency = timed_call(args.stopwatch, explainer, images[b:b + 1], targets[b:b + 1],
                                            indices[b:b + 1])
        assert (explainer.cost.forwards, explainer.cost.backwards) == exact_counts(explainer, explainer.last_trials,
                                                                                    explainer.last_iterations)
        single_seconds.append(seconds)
        single_cpu.append(cpu)
        single_forwards.append(explainer.cost.forwards)
        single_maps.append(saliency)
        single_trials.append(explainer.last_trials[0])
        print(f"  B=1  image {b}: {seconds:7.2f} s ({cpu:7.2f} s CPU), {explainer.cost.forwards} forwards, "
              f"{explainer.cost.backwards} backwards, mean trials {explainer.last_trials.double().mean():.2f}",
              flush=True)

    batch = len(images)

    # Speed.
    per_image_single = statistics.median(single_seconds)
    per_image_batch = statistics.median(batch_seconds) / batch
    per_forward_single = sum(single_seconds) / sum(single_forwards)
    per_forward_batch = statistics.median(batch_seconds) / cost.forwards
    print(f"{name}: seconds per image  B=1 {per_image_single:.2f} (median of {args.single})  "
          f"B={batch} {per_image_batch:.2f} (median of {args.repeats})  ->  "
          f"speedup {per_image_single / per_image_batch:.2f}x "
          f"(target >= 4x); per forward pass {per_forward_single * 1e3:.2f} ms vs {per_forward_batch * 1e3:.2f} ms "
          f"-> {per_forward_single / per_forward_batch:.2f}x")
    cpu_single, cpu_batch = statistics.median(single_cpu), statistics.median(batch_cpu) / batch
    print(f"{name}: CPU seconds per image  B=1 {cpu_single:.2f}  B={batch} {cpu_batch:.2f}  ->  "
          f"{cpu_single / cpu_batch:.2f}x; "
          f"per forward pass {sum(single_cpu) / sum(single_forwards) * 1e3:.2f} ms vs "
          f"{statistics.median(batch_cpu) / cost.forwards * 1e3:.2f} ms")

    # Batch independence: the batched maps of the first images equal their single-image maps.
    diff = max((single_maps[b][0] - together[b]).abs().max().item() for b in range(args.single))
    same_trials = all(torch.equal(single_trials[b], trials[b]) for b in range(args.single))
    print(f"{name}: B={batch} vs B=1 maps, max |diff| = {diff:.2e}; same line-search trials: {same_trials}")

    # Counts against the formulas.
    n, iterations = explainer.ig_steps, explainer.iterations
    terms = explainer.points_per_evaluation // n
    forwards, backwards = exact_counts(explainer, trials, ran)
    mean_trials = trials.double().mean().item()
    methods_forwards = terms * n * iterations * (2 + mean_trials)
    print(f"{name}: B={batch} counts per image: forwards {cost.forwards / batch:.1f} (exact formula "
          f"P(2T + sum t)/image = {forwards / batch:.1f}), backwards {cost.backwards / batch:.1f} (P T = "
          f"{backwards / batch:.0f}); docs/methods.md {terms}nT(2 + trials) = "
          f"{terms}*{n}*{iterations}*(2 + {mean_trials:.2f}) "
          f"= {methods_forwards:.1f} forwards, {terms}nT = {terms * n * iterations} backwards; "
          f"match: {(cost.forwards, cost.backwards) == (forwards, backwards)}")
    print(f"{name}: line-search trials per iteration: mean {mean_trials:.2f}, min {int(trials.min())}, "
          f"max {int(trials.max())} (cap {explainer.max_trials})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="igos_pp,igos")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--single", type=int, default=3, help="images explained alone (the first ones of the batch)")
    parser.add_argument("--repeats", type=int, default=1, help="calls of the whole batch")
    parser.add_argument("--iterations", type=int, default=None, help="override T (default: the method's, 15)")
    parser.add_argument("--max_forward_batch", type=int, default=256)
    parser.add_argument("--pass-limit", type=int, default=0, metavar="K",
                        help="only the per-image time / bare-pass ratio, on K images one at a time")
    parser.add_argument("--converge_tol", type=float, default=None)
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
    for name in args.methods.split(","):
        if args.pass_limit:
            pass_limit(name.strip(), model, data, targets, args)
        else:
            bench(name.strip(), model, data, targets, args)


if __name__ == "__main__":
    main()
