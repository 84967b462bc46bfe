"""Fast black-box options against float32, side by side in one run: speed ratios and faithfulness.

    python -m benchmarks.fast_blackbox [--rounds 7] [--images 256] [--map-images 4]
        [--methods rise,iassa,igos_pp,gradient,integrated_gradients,smoothgrad] [--compile default]
        [--skip-maps] [--skip-metrics] [--threads 2] [--clock wall|cpu]

On the committed embedded black box (assets/embedded_blackbox.pt) and embedded test scenes (64 x 64):

1. Speed of each option against float32: a forward pass of 256 images (no grad) and a forward + backward to
   the input of 80 images (one iGOS++ image's IG points), every option timed once per round, options
   interleaved within a round so machine load hits them alike; medians over ``--rounds``; ratio = fp32 median /
   option median (> 1 = faster). Options: channels-last, bf16 autocast, bf16 + channels-last, and with
   ``--compile MODE`` the compiled fp32 and bf16 + channels-last black boxes (compiling takes minutes on 2 CPU
   cores, so it is opt-in; its compile time is printed).
2. Probabilities: per image max_k |p_k - p_k^fp32| over ``--images`` scenes, for each option (max, 99th pct),
   against the tolerance saliency_lab.explainers.faithfulness.PROBABILITY_TOLERANCE.
3. Maps: for each method, Spearman per image between its maps on bf16 + channels-last and on fp32 (same seeds)
   over ``--map-images`` scenes (min, median), the bar (0.99 gradient-free, 0.95 gradient-based) and the
   explainer's time fp32 vs fast (one call each; the ratio is that method's end-to-end speed-up), and on the
   fp32 channels-last black box (the default for the methods that stay float32, e.g. iGOS++).
   Budgets are the defaults except --igos-iterations (default 5 of 15, to keep the run short).
4. Metrics: deletion/insertion AUC (RISE protocol) per image on fp32 vs bf16 + channels-last for RISE maps:
   max |difference| and the ratio of the whole metric's time.

The machine may be shared: the load average is printed with the figures; only ratios from one run count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


from saliency_lab import explainers
from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox, probability_gap
from saliency_lab.explainers.faithfulness import PROBABILITY_TOLERANCE, map_spearman

OPTIONS = {  # name -> BlackBox keyword arguments, every one explicit: the defaults are now channels-last and
    # precision "auto" (bf16 inside fast() blocks), which would turn the float32 reference into a bf16 one
    "fp32": {"precision": "32", "channels_last": False},
    "channels_last": {"precision": "32", "channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
}
FAST = "bf16+channels_last"


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def make(**options) -> BlackBox:
    return BlackBox("embedded", **options)


def speed(boxes: dict, images: torch.Tensor, rounds: int, clock=time.perf_counter) -> None:
    forward_batch = images.repeat(256 // len(images) + 1, 1, 1, 1)[:256]
    backward_batch = forward_batch[:80]

    def forward(box):
        with torch.no_grad():
            box.logits(forward_batch)

    def forward_backward(box):
        x = backward_batch.clone().requires_grad_(True)
        box.logits(x)[:, 0].sum().backward()

    for name, fn in (("forward x256", forward), ("forward+backward x80", forward_backward)):
        for box in boxes.values():  # warm-up (oneDNN primitives, compilation)
            fn(box)
        times = {option: [] for option in boxes}
        for _ in range(rounds):
            for option, box in boxes.items():
                start = clock()
                fn(box)
                times[option].append(clock() - start)
        base = statistics.median(times["fp32"])
        cells = "  ".join(f"{option} {statistics.median(t) * 1e3:.0f} ms ({base / statistics.median(t):.2f}x)"
                          for option, t in times.items())
        print(f"speed {name} (median of {rounds}): {cells}  [{load()}]", flush=True)


def probabilities(boxes: dict, count: int) -> None:
    images = embedded_batch(count)["image"]
    for option, box in boxes.items():
        if option == "fp32":
            continue
        gap = probability_gap(box, boxes["fp32"], images)
        print(f"probabilities {option}: max |p - p_fp32| per image over {count} images: max {gap.max():.4f}, "
              f"99th pct {gap.quantile(0.99):.4f}, median {gap.median():.5f} (tolerance {PROBABILITY_TOLERANCE}: "
              f"{'holds' if gap.max() <= PROBABILITY_TOLERANCE else 'FAILS'})", flush=True)


def maps(fast: BlackBox, reference: BlackBox, methods: list[str], count: int, igos_iterations: int,
         clock=time.perf_counter, channels_last: BlackBox | None = None) -> None:
    """Per method: Spearman of its maps on ``fast`` (bf16 + channels-last) against ``reference`` (fp32,
    contiguous) and the end-to-end time of both; with ``channels_last`` (fp32, channels-last: what a method that
    does not opt in to bf16 runs on by default), also that box's time, called right after the other two."""
    data = embedded_batch(count)
    images, indices = data["image"], data["index"]
    with torch.no_grad():
        targets = reference.logits(images).argmax(1)
    for name in methods:
        hparams = {"iterations": igos_iterations} if name in ("igos_pp", "igos") else {}
        result = map_spearman(name, fast, reference, images, targets, indices, clock=clock, **hparams)
        layout = ""
        if channels_last is not None:
            start = clock()
            explainers.build(name, channels_last, **hparams)(images, targets, indices)
            seconds = clock() - start
            layout = f", fp32 channels-last {seconds:.2f} s -> {result.seconds_reference / seconds:.2f}x"
        print(f"maps {name}{hparams or ''}: Spearman {FAST} vs fp32 over {count} images: min "
              f"{result.spearman.min():.4f}, median {result.spearman.median():.4f} (bar {result.bar}: "
              f"{'holds' if result.holds else 'FAILS'}); time fp32 {result.seconds_reference:.2f} s, fast "
              f"{result.seconds_fast:.2f} s -> {result.seconds_reference / result.seconds_fast:.2f}x{layout}  "
              f"[{load()}]", flush=True)


def metrics(fast: BlackBox, reference: BlackBox, count: int, clock=time.perf_counter) -> None:
    import saliency_lab.metrics.causal as causal
    from saliency_lab.metrics import CausalProtocol, causal_curves

    data = embedded_batch(count)
    images, indices = data["image"], data["index"]
    with torch.no_grad():
        targets = reference.logits(images).argmax(1)
    saliency = explainers.build("rise", reference, n_masks=1000)(images, targets, indices)
    protocol = CausalProtocol.rise(64)
    results, seconds = {}, {}
    previous = causal.FAST_PASSES
    try:
        for option, box in (("fp32", reference), (FAST, fast), ("fp32 again", reference), (FAST + " again", fast)):
            causal.FAST_PASSES = True
            start = clock()
            results[option] = causal_curves(box, images, saliency, targets, protocol)
            seconds[option] = clock() - start
    finally:
        causal.FAST_PASSES = previous
    for key in ("deletion", "insertion"):
        ref, out = getattr(results["fp32"], key), getattr(results[FAST], key)
        print(f"metrics {key} AUC per image, {FAST} vs fp32 over {count} images: max |diff| "
              f"{(out - ref).abs().max():.4f}, mean diff {(out - ref).mean():+.5f}", flush=True)
    base = min(seconds["fp32"], seconds["fp32 again"])
    quick = min(seconds[FAST], seconds[FAST + " again"])
    print(f"metrics time (best of 2): fp32 {base:.2f} s, {FAST} {quick:.2f} s -> {base / quick:.2f}x  [{load()}]",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=256, help="scenes for the probability check")
    parser.add_argument("--map-images", type=int, default=4)
    parser.add_argument("--methods", default="rise,iassa,igos_pp,gradient,integrated_gradients,smoothgrad")
    parser.add_argument("--igos-iterations", type=int, default=5)
    parser.add_argument("--metric-images", type=int, default=16)
    parser.add_argument("--compile", default=None, help="also time torch.compile(mode=COMPILE) black boxes")
    parser.add_argument("--skip-maps", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time with the wall clock or this process's CPU time (a shared machine: use cpu with "
                             "--threads 1, waiting for the cores is then not counted)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"embedded black box embedded_blackbox.pt, {args.threads} threads, torch {torch.__version__}  [{load()}]",
          flush=True)
    boxes = {option: make(**kwargs) for option, kwargs in OPTIONS.items()}
    if args.compile:
        for option in ("fp32", FAST):
            start = time.perf_counter()
            box = make(**OPTIONS[option], compile=args.compile)
            with torch.no_grad():  # the first call compiles (forward); the backward compiles on its first call
                box.logits(embedded_batch(2)["image"].repeat(128, 1, 1, 1))
            print(f"compile {option} mode={args.compile}: first forward {time.perf_counter() - start:.0f} s",
                  flush=True)
            boxes[f"compiled {option}"] = box
    speed(boxes, embedded_batch(16)["image"], args.rounds, clock)
    probabilities(boxes, args.images)
    if not args.skip_maps:
        maps(boxes[FAST], boxes["fp32"], [m.strip() for m in args.methods.split(",") if m.strip()],
             args.map_images, args.igos_iterations, clock, boxes["channels_last"])
    if not args.skip_metrics:
        metrics(boxes[FAST], boxes["fp32"], args.metric_images, clock)


if __name__ == "__main__":
    main()
