"""Per-image time of each explainer (and of the causal metrics) against its bare black-box passes, in one run.

    python -m benchmarks.pass_overhead [--methods rise,iassa,igos_pp,igos,metrics] [--images 3] [--threads 1]
        [--clock cpu|wall] [--hparams '{"igos_pp": {"iterations": 5}}']

On the embedded black box (precision "auto": bf16 for the methods that opt in, as in any evaluation) and the
first ``--images`` embedded test scenes, explained one at a time. Target: <= 1.15x (figures: docs/results/speed.md).

*Bare passes* of an image: every call the method made to the black box, recorded by :class:`RecordingBlackBox`
(rows, which entry point, whether a gradient flowed back to its input, whether it ran inside the fast (bf16)
block), then replayed on the black box alone right after the image's explanation: every call once, in order,
the same row counts, channels-first inputs like the methods' rows, the same precision, a backward where the
method had one; bare = the summed time of the replayed calls.
ratio = explanation time / bare time, median over the images. ``metrics`` is deletion + insertion under the RISE
preset (``metrics.causal_curves``) of a random map, timed the same way.

*Plain replay*: the same calls replayed on a float32, channels-first copy of the black box (``precision="32"``,
``channels_last=False``, no fast block): what the passes would cost without the project's pass settings.
``vs plain`` = explanation time / plain replay time; above 1.0 the method is slower than a plain float32 run of
its own passes on this CPU, i.e. the pass settings chosen for this device cost time instead of saving it. The
first line names the CPU (model, capability, native bf16), which decides both.

``--clock cpu`` (default) times with this process's CPU time: on a machine shared with other jobs a low-priority
process waits for the cores, which is no property of the method (use ``--threads 1``: with 2 threads an
operation also waits for its slower thread, and spin-waiting counts as CPU time). ``--clock wall`` on an idle
machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
import torch.nn as nn


from saliency_lab import explainers
from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.machine import load_average
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args

ENTRY_POINTS = ("logits", "features", "features_and_logits")


class RecordingBlackBox(nn.Module):
    """A black box that records every call: ``calls`` is a list of ``[entry point, rows, fast, backward]`` (fast:
    inside a :meth:`BlackBox.fast` block; backward: a gradient reached the call's input). Anything else is the
    wrapped black box's (attributes, ``fast``, ``num_classes``, ``std`` ...)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[list] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def _record(self, entry: str, x: torch.Tensor):
        call = [entry, int(x.shape[0]), bool(getattr(self.inner, "_fast_depth", 0) > 0), False]
        self.calls.append(call)
        if x.requires_grad and torch.is_grad_enabled():
            def mark(grad):
                call[3] = True
            x.register_hook(mark)
        return getattr(self.inner, entry)(x)

    def logits(self, x):
        return self._record("logits", x)

    forward = logits

    def features(self, x):
        return self._record("features", x)

    def features_and_logits(self, x):
        return self._record("features_and_logits", x)


def _scalar(out) -> torch.Tensor:
    """A scalar depending on every output of a call (logits, or a list of feature maps, or both)."""
    if isinstance(out, torch.Tensor):
        return out.float().mean()
    return sum(_scalar(o) for o in out)


def bare_seconds(model, calls: list[list], image: torch.Tensor, stopwatch: Stopwatch, plain: bool = False) -> float:
    """Replay ``calls`` (:class:`RecordingBlackBox`) on ``model`` alone, once each and in their order, on
    ``image`` repeated to each call's rows (channels-first, built before the clock starts): the summed time of
    the calls, each timed by ``stopwatch`` (synchronised on its device). A full replay lasts as long as the
    method's own passes, so a change of machine load during the explanation hits the replay alike (timing a few
    repeats of each call shape instead swung the ratio by +-15% on the shared machine)."""
    inputs: dict[int, torch.Tensor] = {}
    total = 0.0
    for entry, rows, fast, backward in calls:
        if rows not in inputs:
            inputs[rows] = image[:1].expand(rows, -1, -1, -1).contiguous()
        leaf = inputs[rows].clone().requires_grad_(backward)

        def call(entry=entry, fast=fast, backward=backward, leaf=leaf):
            with model.fast(fast and not plain), torch.set_grad_enabled(backward):
                out = getattr(model, entry)(leaf)
                if backward:
                    _scalar(out).backward()
        total += stopwatch.time(call)[1]
    return total


def plain_copy(model: BlackBox) -> BlackBox:
    """The same network and weights as a float32, channels-first black box (the plain replay's)."""
    return BlackBox.from_module(copy.deepcopy(model.net).to(memory_format=torch.contiguous_format),
                                mean=model.mean.flatten().tolist(), std=model.std.flatten().tolist(),
                                num_classes=model.num_classes, feature_layers=list(model.feature_modules),
                                precision="32", channels_last=False)


def measure(name: str, model, data: dict, targets: torch.Tensor, args) -> dict:
    """Explanation (or metric) time and bare time per image; the median ratio."""
    from saliency_lab.metrics import CausalProtocol, causal_curves

    proxy = RecordingBlackBox(model)
    size = int(data["image"].shape[-1])
    if name == "metrics":
        protocol = CausalProtocol.rise(size)
        saliency = torch.rand(len(targets), 1, size, size, generator=torch.Generator().manual_seed(0))

        def run(b):
            causal_curves(proxy, data["image"][b:b + 1], saliency[b:b + 1], targets[b:b + 1], protocol)
    else:
        explainer = explainers.build(name, proxy, **args.hparams.get(name, {}))

        def run(b):
            explainer(data["image"][b:b + 1], targets[b:b + 1], data["index"][b:b + 1])
    run(0)  # warm-up: oneDNN builds its kernels per input shape
    stopwatch = args.stopwatch
    bare_seconds(model, proxy.calls, data["image"][:1], stopwatch)
    plain = plain_copy(model).to(stopwatch.device)
    bare_seconds(plain, proxy.calls, data["image"][:1], stopwatch, plain=True)
    ratios, seconds, bares, passes, plains = [], [], [], [], []
    for b in range(args.images):
        proxy.calls = []
        spent = stopwatch.time(lambda: run(b))[1]
        bare = bare_seconds(model, proxy.calls, data["image"][b:b + 1], stopwatch)
        plains.append(spent / bare_seconds(plain, proxy.calls, data["image"][b:b + 1], stopwatch, plain=True))
        ratios.append(spent / bare)
        seconds.append(spent)
        bares.append(bare)
        passes.append(sum(rows * (2 if backward else 1) for _, rows, _, backward in proxy.calls))
        print(f"  {name} image {b}: {spent:7.3f} s, bare passes {bare:7.3f} s -> {spent / bare:.3f}x "
              f"({sum(c[1] for c in proxy.calls)} rows forward, {sum(c[1] for c in proxy.calls if c[3])} backward, "
              f"{len(proxy.calls)} calls, fast {any(c[2] for c in proxy.calls)}); vs plain float32 replay "
              f"{plains[-1]:.3f}x  [{load_average()}]", flush=True)
    result = {"method": name, "hparams": args.hparams.get(name, {}), "images": args.images,
              "seconds": statistics.median(seconds), "bare_seconds": statistics.median(bares),
              "ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
              "vs_plain": statistics.median(plains)}
    print(f"{name}: per-image {args.clock} time / bare passes, median of {args.images}: {result['ratio']:.3f}x "
          f"(images {result['min_ratio']:.3f}-{result['max_ratio']:.3f}x; target <= 1.15); median "
          f"{result['seconds']:.3f} s vs {result['bare_seconds']:.3f} s  [{load_average()}]", flush=True)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="rise,iassa,igos_pp,igos,metrics",
                        help="registered explainers, and 'metrics' for deletion + insertion")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--hparams", type=json.loads, default={}, help="JSON {method: {hparam: value}}")
    add_timing_arguments(parser, threads=1, clock="cpu")
    args = parser.parse_args(argv)
    args.stopwatch = stopwatch_from_args(args)
    model = BlackBox("embedded").to(args.stopwatch.device)
    data = embedded_batch(args.images)
    data["image"] = data["image"].to(args.stopwatch.device)
    with torch.no_grad():
        targets = model.logits(data["image"]).argmax(1)
    print(args.stopwatch.header())
    print(f"embedded black box (precision {model.precision}, channels_last {model.channels_last}), {args.images} test images "
          f"{tuple(data['image'].shape[-2:])}, {args.threads} threads, {args.clock} clock  [{load_average()}]",
          flush=True)
    results = [measure(name.strip(), model, data, targets, args) for name in args.methods.split(",") if name.strip()]
    print("\n| method | settings | per-image s | bare passes s | ratio (median) | range over images | vs plain float32 replay |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['hparams'] or 'defaults'} | {r['seconds']:.3f} | {r['bare_seconds']:.3f} | "
              f"{r['ratio']:.3f}x | {r['min_ratio']:.3f}-{r['max_ratio']:.3f}x | {r['vs_plain']:.3f}x |")
    return results


if __name__ == "__main__":
    main()
