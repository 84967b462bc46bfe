"""Fast black-box options against float32, side by side in one run: speed ratios and faithfulness.

    python -m benchmarks.fast_blackbox [--rounds 7] [--images 256] [--map-images 4]
        [--methods rise,iassa,igos_pp,gradient,integrated_gradients,smoothgrad] [--compile default]
        [--skip-maps] [--skip-metrics] [--threads 2] [--clock wall|cpu] [--device auto]

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
import statistics

import torch


from saliency_lab import explainers
from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox, probability_gap
from saliency_lab.core.machine import load_average
from saliency_lab.core.timing import CLOCKS, Stopwatch, add_timing_arguments, stopwatch_from_args, synchronize
from saliency_lab.explainers.faithfulness import PROBABILITY_TOLERANCE, map_spearman

OPTIONS = {  # name -> BlackBox keyword arguments, every one explicit: the defaults are now channels-last and
    # precision "auto" (bf16 inside fast() blocks), which would turn the float32 reference into a bf16 one
    "fp32": {"precision": "32", "channels_last": False},
    "channels_last": {"precision": "32", "channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
}
FAST = "bf16+channels_last"


def make(device: torch.device | str = "cpu", **options) -> BlackBox:
    return BlackBox("embedded", **options).to(device)


def synchronised_clock(stopwatch: Stopwatch):
    """The stopwatch's clock, read after the device finished its queued work (for ``map_spearman``)."""
    def clock() -> float:
        synchronize(stopwatch.device)
        return CLOCKS[stopwatch.clock]()
    return clock


def speed(boxes: dict, images: torch.Tensor, rounds: int, stopwatch: Stopwatch) -> None:
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
                times[option].append(stopwatch.time(lambda: fn(box))[1])
        base = statistics.median(times["fp32"])
        cells = "  ".join(f"{option} {statistics.median(t) * 1e3:.0f} ms ({base / statistics.median(t):.2f}x)"
                          for option, t in times.items())
        print(f"speed {name} (median of {rounds}): {cells}  [{load_average()}]", flush=True)


def probabilities(boxes: dict, count: int, device: torch.device | str = "cpu") -> None:
    images = embedded_batch(count)["image"].to(device)
    for option, box in boxes.items():
        if option == "fp32":
            continue
        gap = probability_gap(box, boxes["fp32"], images)
        print(f"probabilities {option}: max |p - p_fp32| per image over {count} images: max {gap.max():.4f}, "
              f"99th pct {gap.quantile(0.99):.4f}, median {gap.median():.5f} (tolerance {PROBABILITY_TOLERANCE}: "
              f"{'holds' if gap.max() <= PROBABILITY_TOLERANCE else 'FAILS'})", flush=True)


def maps(fast: BlackBox, reference: BlackBox, methods: list[str], count: int, igos_iterations: int,
         stopwatch: Stopwatch, channels_last: BlackBox | None = None) -> None:
    """Per method: Spearman of its maps on ``fast`` (bf16 + channels-last) against ``reference`` (fp32,
    contiguous) and the end-to-end time of both; with ``channels_last`` (fp32, channels-last: what a method that
    does not opt in to bf16 runs on by default), also that box's time, called right after the other two."""
    data = embedded_batch(count)
    images, indices = data["image"].to(stopwatch.device), data["index"]
    with torch.no_grad():
        targets = reference.logits(images).argmax(1)
    clock = synchronised_clock(stopwatch)
    for name in methods:
        hparams = {"iterations": igos_iterations} if name in ("igos_pp", "igos") else {}
        result = map_spearman(name, fast, reference, images, targets, indices, clock=clock, **hparams)
        layout = ""
        if channels_last is not None:
            seconds = stopwatch.time(lambda: explainers.build(name, channels_last, **hparams)(images, targets,
                                                                                             indices))[1]
            layout = f", fp32 channels-last {seconds:.2f} s -> {result.seconds_reference / seconds:.2f}x"
        print(f"maps {name}{hparams or ''}: Spearman {FAST} vs fp32 over {count} images: min "
              f"{result.spearman.min():.4f}, median {result.spearman.median():.4f} (bar {result.bar}: "
              f"{'holds' if result.holds else 'FAILS'}); time fp32 {result.seconds_reference:.2f} s, fast "
              f"{result.seconds_fast:.2f} s -> {result.seconds_reference / result.seconds_fast:.2f}x{layout}  "
              f"[{load_average()}]", flush=True)


def metrics(fast: BlackBox, reference: BlackBox, count: int, stopwatch: Stopwatch) -> None:
    import saliency_lab.metrics.causal as causal
    from saliency_lab.metrics import CausalProtocol, causal_curves

    data = embedded_batch(count)
    images, indices = data["image"].to(stopwatch.device), data["index"]
    with torch.no_grad():
        targets = reference.logits(images).argmax(1)
    saliency = explainers.build("rise", reference, n_masks=1000)(images, targets, indices)
    protocol = CausalProtocol.rise(64)
    results, seconds = {}, {}
    previous = causal.FAST_PASSES
    try:
        for option, box in (("fp32", reference), (FAST, fast), ("fp32 again", reference), (FAST + " again", fast)):
            causal.FAST_PASSES = True
            results[option], seconds[option] = stopwatch.time(
                lambda: causal_curves(box, images, saliency, targets, protocol))
    finally:
        causal.FAST_PASSES = previous
    for key in ("deletion", "insertion"):
        ref, out = getattr(results["fp32"], key), getattr(results[FAST], key)
        print(f"metrics {key} AUC per image, {FAST} vs fp32 over {count} images: max |diff| "
              f"{(out - ref).abs().max():.4f}, mean diff {(out - ref).mean():+.5f}", flush=True)
    base = min(seconds["fp32"], seconds["fp32 again"])
    quick = min(seconds[FAST], seconds[FAST + " again"])
    print(f"metrics time (best of 2): fp32 {base:.2f} s, {FAST} {quick:.2f} s -> {base / quick:.2f}x  "
          f"[{load_average()}]", flush=True)


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
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    device = stopwatch.device
    print(stopwatch.header(), flush=True)
    print(f"embedded black box embedded_blackbox.pt, {args.threads} threads, torch {torch.__version__}  "
          f"[{load_average()}]", flush=True)
    boxes = {option: make(device, **kwargs) for option, kwargs in OPTIONS.items()}
    if args.compile:
        wall = Stopwatch(device, "wall")  # compile time: seconds that pass, whatever --clock says
        for option in ("fp32", FAST):
            def first_forward():
                box = make(device, **OPTIONS[option], compile=args.compile)
                with torch.no_grad():  # the first call compiles (forward); the backward compiles on its first call
                    box.logits(embedded_batch(2)["image"].to(device).repeat(128, 1, 1, 1))
                return box
            box, seconds = wall.time(first_forward)
            print(f"compile {option} mode={args.compile}: first forward {seconds:.0f} s", flush=True)
            boxes[f"compiled {option}"] = box
    speed(boxes, embedded_batch(16)["image"].to(device), args.rounds, stopwatch)
    probabilities(boxes, args.images, device)
    if not args.skip_maps:
        maps(boxes[FAST], boxes["fp32"], [m.strip() for m in args.methods.split(",") if m.strip()],
             args.map_images, args.igos_iterations, stopwatch, boxes["channels_last"])
    if not args.skip_metrics:
        metrics(boxes[FAST], boxes["fp32"], args.metric_images, stopwatch)


if __name__ == "__main__":
    main()
