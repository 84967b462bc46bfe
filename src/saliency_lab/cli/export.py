"""Export a trained mask predictor as one self-contained file (TorchScript or ONNX).

    saliency-lab export --ckpt_path PATH --format onnx|torchscript --out FILE [--image_size S] [--class_input]

The file holds the black box (normalisation + features), the feature filter, the generator and the
controller: it takes ``images`` (B, 3, S, S) float32 in [0, 1] and returns ``masks`` (B, 1, S, S), for the
black box's predicted class, or for ``classes`` (B,) int64, a second input, with ``--class_input``.
B is dynamic; S is fixed (default: the training data's size recorded in the checkpoint). ONNX: opset 18
(``saliency_lab.lightning_modules.exported_predictor.ONNX_OPSET``), weights inside the file. The description (classes,
size, inputs) is stored in the file: ONNX metadata / TorchScript extra file, key ``saliency_lab``.
Details: ``lightning_modules/exported_predictor.py``. After writing, the file is run once on random images
against eager PyTorch and the largest difference is printed.

    import onnxruntime as ort                       # e.g. a map for a 64 x 64 image in [0, 1]
    masks = ort.InferenceSession("predictor.onnx").run(["masks"], {"images": images})[0]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from saliency_lab.datamodules.image_files import recorded_input_size
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.checkpoints import safe_load
from saliency_lab.core.resources import resolve_resource
from saliency_lab.lightning_modules.exported_predictor import FORMATS, example_inputs, export, load_graph, run_exported


def refuse_overwriting(out: str, inputs: dict[str, str]) -> None:
    """A ValueError when the file ``out`` is one of the ``inputs`` (what names it -> path): the same path once
    resolved (symbolic links, ``..``, a packaged ``assets/`` file) or the same file under another name (a hard
    link). Writing it would destroy the checkpoint being exported; checked before anything is read or written."""
    target = Path(out)
    for option, path in inputs.items():
        source = Path(resolve_resource(path))
        same = target.resolve() == source.resolve() or (
            target.exists() and source.exists() and os.path.samefile(target, source))
        if same:
            raise ValueError(f"--out {out} is the file {option} {path} reads: the export would overwrite it; "
                             "write the export to another file")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", "--ckpt", required=True, help="a trained predictor checkpoint (train.py, embedded_predictor_*)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the file to write (e.g. predictor.onnx, predictor.pt)")
    parser.add_argument("--image_size", type=int, default=None, help="S (default: recorded in the checkpoint)")
    parser.add_argument("--class_input", action="store_true",
                        help="a second input 'classes' (B,) int64 chooses the explained class (default: the "
                             "black box's predicted class)")
    parser.add_argument("--blackbox", default=None, help="black-box spec, as --blackbox SPEC of explain and evaluate "
                        "(default: the one the checkpoint records)")
    parser.add_argument("--check_images", type=int, default=8, help="random images of the parity check (0: none)")
    args = parser.parse_args(argv)
    refuse_overwriting(args.out, {"--ckpt_path": args.ckpt_path})

    blackbox = BlackBox(args.blackbox) if args.blackbox else None
    graph, description = load_graph(args.ckpt_path, blackbox, args.class_input)
    spec = args.blackbox or description["blackbox"]
    if spec.startswith("ckpt:"):
        refuse_overwriting(args.out, {"the black box": spec.removeprefix("ckpt:")})
    checkpoints = [safe_load(args.ckpt_path)]
    if spec.startswith("ckpt:"):
        checkpoints.append(safe_load(spec.removeprefix("ckpt:")))
    size = args.image_size or recorded_input_size(checkpoints, spec)
    if size is None:
        raise ValueError(f"{args.ckpt_path} records no input size (no training data in the checkpoint): pass --image_size")
    written = export(graph, description, size, args.format, args.out)
    print(f"wrote {args.out} ({args.format}): {written['explainer']} on {spec}, inputs {written['inputs']}, outputs "
          f"{written['outputs']}" + (" (post-hoc tuning is not exported)" if written["posthoc_tuning_dropped"] else ""))
    if args.check_images:
        inputs = example_inputs(graph, size, args.check_images, seed=1)
        with torch.no_grad():
            eager = graph(*inputs)
        difference = (run_exported(args.out, args.format, inputs) - eager).abs().max().item()
        written["max_abs_difference"] = difference
        print(f"parity: max |exported - eager PyTorch| = {difference:.2e} on {args.check_images} random images")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
