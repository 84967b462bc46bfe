"""IASSA's speed at default settings (B = 1 vs B = 16) and the peak memory of its attention step.

    python -m benchmarks.iassa [--images-single 2] [--batch 16] [--skip-speed] [--skip-memory] [--threads 2]
                               [--device auto] [--clock wall|cpu]

1. Seconds and black-box forwards per image on the embedded black box and embedded test images (64 x 64) at
   the default settings (5 rounds, 45/8 px windows at 224 -> 12.9/2.3 px, row attention, max_forward_batch
   256): images explained one call each (B = 1) vs one call of B images. Target: B = 16 >= 3x faster per
   image. Also the "bare forward" floor: the same number of forwards pushed through the black box in full
   chunks of 256, with nothing else - no schedule of calls can beat it.
2. Peak memory of the attention step for a 56 x 56 grid (ResNet-50 at 224: 256/512/1024/2048 channels at
   56/28/14/7) at batch 8, each variant in a fresh process (peak RSS over the inputs, VmHWM reset): Phi' built
   from synthetic feature maps plus one A x S, chunked by the default 64 MiB budget, vs materialising the
   B x N x N attention (N = 3136). The largest temporary is also given analytically.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


from saliency_lab import explainers
import saliency_lab.explainers.iassa as iassa  # registers "iassa"
from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args

RESNET50_LEVELS = ((256, 56), (512, 28), (1024, 14), (2048, 7))  # (channels, side) at 224


def speed(single: int, batch: int, stopwatch: Stopwatch | None = None) -> dict:
    stopwatch = stopwatch or Stopwatch()
    model = BlackBox("embedded").to(stopwatch.device)
    data = embedded_batch(batch)
    images = data["image"].to(stopwatch.device)
    with torch.no_grad():
        targets = model.logits(images).argmax(1)
    explainer = explainers.build("iassa", model)  # defaults
    explainer(images[:1], targets[:1])  # warm-up

    def singles() -> int:
        forwards = 0
        for i in range(single):
            explainer(images[i:i + 1], targets[i:i + 1])
            forwards += explainer.cost.forwards
        return forwards

    forwards_single, seconds = stopwatch.time(singles)
    seconds_single = seconds / single
    seconds_batch = stopwatch.time(lambda: explainer(images, targets))[1] / batch
    forwards_batch = explainer.cost.forwards / batch
    # the floor: forwards_batch images per image, in full chunks of max_forward_batch, nothing else
    chunk = explainer.max_forward_batch
    stack = images.repeat(chunk // batch + 1, 1, 1, 1)[:chunk]

    def bare_forwards():
        for _ in range(8):
            model.logits(stack)

    with torch.no_grad():
        model.logits(stack)
        seconds = stopwatch.time(bare_forwards)[1]
    bare = seconds / (8 * chunk) * forwards_batch
    return {"image_size": int(images.shape[-1]), "hparams": {k: v for k, v in explainer.hparams.items()
                                                             if k != "feature_extractor"},
            "B=1": {"images": single, "seconds_per_image": round(seconds_single, 3),
                    "forwards_per_image": forwards_single / single},
            f"B={batch}": {"images": batch, "seconds_per_image": round(seconds_batch, 3),
                           "forwards_per_image": forwards_batch},
            "speedup": round(seconds_single / seconds_batch, 2),
            # the first images need fewer windows than the batch's average: compare per forward too
            "ms_per_forward": {"B=1": round(1e3 * seconds_single * single / forwards_single, 3),
                               f"B={batch}": round(1e3 * seconds_batch / forwards_batch, 3)},
            "speedup_per_forward": round((seconds_single * single / forwards_single)
                                         / (seconds_batch / forwards_batch), 2),
            "bare_forward_seconds_per_image": round(bare, 3),
            "rounds": explainer.trace["iterations"][0], "windows_per_round_image0": explainer.trace["masks"][0]}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that RSS in MB (Linux), so the
    peak measured afterwards belongs to the step alone; elsewhere fall back to ru_maxrss."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss() -> float:
    try:
        return _status_mb("VmHWM:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention_child(mode: str, batch: int, budget_mb: float, clock: str = "wall") -> dict:
    """One attention step in this (fresh) process, on the CPU: Phi' from synthetic ResNet-50-shaped maps, then
    A x S (the peak resident memory is the figure)."""
    stopwatch = Stopwatch(torch.device("cpu"), clock)
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(batch, c, s, s, generator=generator).sub_(0.5).clamp_(min=0) for c, s in RESNET50_LEVELS]
    saliency = torch.rand(batch, 1, 224, 224, generator=generator)
    before = _reset_peak_rss()
    (grid, phi, fn, rows, temporary), setup = stopwatch.time(lambda: _attention_setup(mode, maps, batch, budget_mb))
    adjusted, apply = stopwatch.time(lambda: iassa.adjust_map(saliency, grid, fn, 0.5))
    after = _peak_rss()
    assert torch.isfinite(adjusted).all()
    return {"mode": mode, "batch": batch, "grid": list(grid), "phi_columns": phi.shape[2],
            "phi_mb": round(phi.numel() * 4 / 2**20, 1), "rows_per_chunk": rows,
            "largest_temporary_mb": round(temporary / 2**20, 1),
            "peak_growth_mb": round(after - before, 1), "setup_seconds": round(setup, 2),
            "a_times_s_seconds": round(apply, 2)}


def _attention_setup(mode: str, maps: list, batch: int, budget_mb: float) -> tuple:
    """Phi' and the A x S function of ``mode``: (grid, phi, fn, rows per chunk, largest temporary in bytes)."""
    grid = iassa.attention_grid([m.shape[-2:] for m in maps], (224, 224))
    phi = iassa.lrpf_features(maps, grid)
    positions = phi.shape[1]
    if mode == "chunked":
        rows = iassa.attention_chunk_rows(batch, positions, int(budget_mb * 2**20))
        fn = lambda v: iassa.attend(phi, v, "row", 1.0, rows)  # noqa: E731
        temporary = 2 * batch * rows * positions * 4
    else:  # the whole B x N x N attention at once, as a cache would hold it
        rows = positions
        matrix = iassa.attention_matrix(phi, "row", 1.0, rows)
        fn = lambda v: torch.bmm(matrix, v[:, :, None]).squeeze(-1)  # noqa: E731
        temporary = 2 * batch * positions * positions * 4
    return grid, phi, fn, rows, temporary


def memory(batch: int, budget_mb: float, threads: int = 2, clock: str = "wall") -> list[dict]:
    results = []
    for mode in ("chunked", "dense"):
        out = subprocess.run([sys.executable, __file__, "--attention-child", mode, "--batch", str(batch),
                              "--budget-mb", str(budget_mb), "--threads", str(threads), "--clock", clock,
                              "--device", "cpu"], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-single", type=int, default=2, help="images explained one call each (B = 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget-mb", type=float, default=64.0, help="attention_memory_mb of the chunked variant")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--attention-child", choices=("chunked", "dense"), help=argparse.SUPPRESS)
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    if args.attention_child:
        print(json.dumps(attention_child(args.attention_child, args.batch, args.budget_mb, args.clock)))
        return
    print(stopwatch.header(), flush=True)
    if not args.skip_speed:
        result = speed(args.images_single, args.batch, stopwatch)
        print(json.dumps(result, indent=1))
        single, batched = result["B=1"], result[f"B={args.batch}"]
        print(f"IASSA at defaults, {result['image_size']} px: B=1 {single['seconds_per_image']} s/image "
              f"({single['forwards_per_image']:.0f} forwards), B={args.batch} {batched['seconds_per_image']} s/image "
              f"({batched['forwards_per_image']:.0f} forwards) -> {result['speedup']}x (target >= 3x); bare forwards "
              f"alone {result['bare_forward_seconds_per_image']} s/image; per forward {result['ms_per_forward']} ms -> "
              f"{result['speedup_per_forward']}x")
    if not args.skip_memory:
        for row in memory(8, args.budget_mb, args.threads, args.clock):
            print(json.dumps(row))
            print(f"attention step, {row['mode']}: grid {row['grid']}, batch {row['batch']}, Phi' {row['phi_mb']} MB "
                  f"({row['phi_columns']} columns), rows/chunk {row['rows_per_chunk']}, largest temporary "
                  f"{row['largest_temporary_mb']} MB, measured peak growth {row['peak_growth_mb']} MB, "
                  f"A x S {row['a_times_s_seconds']} s")


if __name__ == "__main__":
    main()
