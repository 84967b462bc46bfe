"""Images per second of the exported predictor: eager PyTorch vs TorchScript vs onnxruntime, on the CPU.

    python -m benchmarks.exported_predictor_speed [--ckpt_path outputs/demo/predictor_ct/checkpoints/last.ckpt] [--batches 1 32]
                                [--repeats 15] [--threads 2] [--clock wall|cpu]

The predictor (black-box features + filter + generator + controller + upsampling, the class predicted by
the black box: ``saliency_lab.lightning_modules.exported_predictor.PredictorGraph``) is exported to both formats in a
temporary folder and the three runtimes are timed side by side in this one process: per batch size, each
repeat times one call of each runtime in turn (after warm-up calls), so machine noise hits all three
alike; the table reports medians. The same number of intra-op threads for torch and onnxruntime. The
load average is printed with the figures: on a shared machine torch's intra-op threads lose most
when other processes hold the cores (README, "Your own images..."). Embedded test images (64 x 64).
Without a trained checkpoint, a predictor with random weights on the embedded black box (speed does not
depend on the weights). Each runtime's output is checked against eager first. The runtimes run on the CPU
whatever ``--device`` says (onnxruntime's CPU session is the point of the comparison).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch


from saliency_lab.core.machine import load_average
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from saliency_lab.datamodules import embedded_batch
from saliency_lab.lightning_modules.exported_predictor import (export, load_graph, load_torchscript,
                                                  onnx_session)

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "outputs/demo/predictor_ct/checkpoints/last.ckpt"
IMAGE_SIZE = 64


def random_predictor(folder: Path) -> Path:
    """A CT predictor checkpoint with random weights on the embedded black box."""
    from saliency_lab.core.blackbox import BlackBox
    from saliency_lab.lightning_modules.mask_predictor import MaskPredictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained filter
        model = MaskPredictor(blackbox=BlackBox("embedded"), filter_checkpoint=None, mode="ct")
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    path = folder / "random_predictor.ckpt"
    torch.save(checkpoint, path)
    return path


def runtimes(ckpt: Path, folder: Path, threads: int) -> dict:
    """name -> callable(images (B,3,S,S) float32 CPU) -> masks, for eager, TorchScript and onnxruntime."""
    graph, description = load_graph(ckpt)
    export(graph, description, IMAGE_SIZE, "torchscript", folder / "predictor.pt")
    export(graph, description, IMAGE_SIZE, "onnx", folder / "predictor.onnx")
    scripted, _ = load_torchscript(folder / "predictor.pt")
    session = onnx_session(folder / "predictor.onnx", threads)

    def eager(x):
        with torch.inference_mode():
            return graph(x)

    def torchscript(x):
        with torch.inference_mode():
            return scripted(x)

    def onnxruntime(x):
        return torch.from_numpy(session.run(["masks"], {"images": x.numpy()})[0])

    return {"eager": eager, "torchscript": torchscript, "onnxruntime": onnxruntime}


def side_by_side(functions: dict, images: torch.Tensor, repeats: int, warmup: int = 2,
                 stopwatch: Stopwatch | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn within every repeat (by ``stopwatch``: by default
    the wall clock on the CPU)."""
    stopwatch = stopwatch or Stopwatch()
    for fn in functions.values():
        for _ in range(warmup):
            fn(images)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            times[name].append(stopwatch.time(lambda: fn(images))[1])
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=Path, default=DEFAULT_CKPT, help="a trained predictor checkpoint")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=15)
    add_timing_arguments(parser, threads=2, clock="wall")  # --threads: intra-op threads of torch and onnxruntime
    args = parser.parse_args(argv)
    stopwatch = stopwatch_from_args(args)
    if stopwatch.device.type != "cpu":  # the runtimes compared here are CPU ones
        print(f"--device {args.device}: this benchmark runs on the CPU; timing on the CPU")
        stopwatch = Stopwatch(torch.device("cpu"), args.clock)
    print(stopwatch.header(), flush=True)
    load_before = load_average()
    images = embedded_batch(max(args.batches), image_size=IMAGE_SIZE)["image"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt_path if args.ckpt_path.is_file() else random_predictor(Path(tmp))
        functions = runtimes(ckpt, Path(tmp), args.threads)
        reference = functions["eager"](images)
        for name, fn in functions.items():
            difference = (fn(images) - reference).abs().max().item()
            if difference > 1e-4:
                raise RuntimeError(f"{name} differs from eager PyTorch by {difference:.2e}")
        rows = []
        for batch in args.batches:
            seconds = side_by_side(functions, images[:batch], args.repeats, stopwatch=stopwatch)
            rows.append({"batch": batch, **{name: batch / s for name, s in seconds.items()}})
    print(f"predictor: {ckpt if args.ckpt_path.is_file() else 'random weights (no trained checkpoint)'}; "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} embedded test images; CPU, {args.threads} threads; median of "
          f"{args.repeats} side-by-side repeats ({args.clock} clock); torch {torch.__version__}; {load_before} "
          f"before, {load_average()} after (other processes share the CPU)")
    print(f"{'batch':>5} | {'eager img/s':>12} | {'TorchScript img/s':>17} | {'onnxruntime img/s':>17} | "
          f"{'TS / eager':>10} | {'ORT / eager':>11}")
    for row in rows:
        print(f"{row['batch']:>5} | {row['eager']:>12.1f} | {row['torchscript']:>17.1f} | {row['onnxruntime']:>17.1f} | "
              f"{row['torchscript'] / row['eager']:>10.2f} | {row['onnxruntime'] / row['eager']:>11.2f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
