"""The trained mask predictor as one self-contained file: TorchScript or ONNX (``export.py``).

:class:`PredictorGraph` is everything the predictor needs between pixels and mask in one ``nn.Module``:
the black box's input normalisation and feature extractor, the feature filter, the mask generator, the
distribution controller and the bilinear upsampling to the image size — the computation of
:class:`saliency_lab.explainers.mask_predictor.MaskPredictorExplainer` without post-hoc tuning.

Inputs and outputs of the exported file:

- ``images``  (B, 3, S, S) float32 RGB in [0, 1] (the black box normalises them itself); B is dynamic,
  S is fixed at export (the size the predictor was trained at; ``explain.py``'s resize rule gets any
  image there);
- ``classes`` (B,) int64, only when exported with ``class_input=True``: the class to explain per image.
  Without it the explained class is the black box's predicted class (the argmax of its logits, from the
  same forward pass that gives the features), as ``evaluate.py`` and ``explain.py`` explain by default;
- ``masks``   (B, 1, S, S) float32, higher = more important (CT / MGnet: in [0, 1]; BT: >= 0).

Input check, inside the graph (both formats): an image with any value outside [0, 1] or not finite (NaN,
+-inf) gets an all-NaN mask instead of a plausible-looking one (the other images of the batch are
unaffected). An exported graph cannot raise a readable error in ONNX Runtime, so the NaN mask is the
signal: check ``isnan(masks).any()`` where inputs may be wrong (0..255 pixels, a normalised tensor). The
class input is not checked: a class outside [0, K) is an indexing error in the runtime.

Deliberate deviation: post-hoc tuning is not exported (it ranks every pixel and runs the black box
``posthoc_points + 1`` more times per image); a checkpoint that records it exports the base predictor.

Formats: TorchScript by tracing (``torch.jit.trace``; shapes other than the batch are frozen at S), with a
JSON description in the file's extra files (``saliency_lab.json``); ONNX with the ``torch.export``-based
exporter at opset :data:`ONNX_OPSET`, a dynamic batch axis, the weights inside the one file (no external
data), and the same JSON in the model's metadata (key ``saliency_lab``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

ONNX_OPSET = 18
EXPORT_FORMAT = "saliency-lab/exported-predictor/v1"
METADATA_KEY = "saliency_lab"
FORMATS = ("onnx", "torchscript")


class PredictorGraph(nn.Module):
    """Black box (features + logits) -> filter -> generator -> controller -> upsampling, in eval mode.

    Args:
        blackbox: the ``BlackBox`` the predictor was trained on.
        net: the trained ``MaskPredictorNet``.
        class_input: take the explained classes as a second input (else: the black box's argmax).
        filter_bias: b of the feature filter at inference (None: the net's own).
    """

    def __init__(self, blackbox: nn.Module, net: nn.Module, class_input: bool = False,
                 filter_bias: float | None = None):
        super().__init__()
        self.blackbox, self.net, self.class_input = blackbox, net, bool(class_input)
        if filter_bias is not None:
            self.net.filter.bias = float(filter_bias)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor, classes: Tensor | None = None) -> Tensor:
        """images (B, 3, S, S) in [0, 1] [, classes (B,) int64] -> masks (B, 1, S, S); an image outside
        [0, 1] or not finite gets an all-NaN mask (the module docstring's input check)."""
        features, logits = self.blackbox.features_and_logits(images)
        if classes is None:
            classes = logits.argmax(dim=1)
        masks = self.net.mask(features, classes, images.shape[-2:])
        return torch.where(valid_images(images).view(-1, 1, 1, 1), masks, torch.full_like(masks, float("nan")))


def valid_images(images: Tensor) -> Tensor:
    """(B,) bool: True where every value of the image (B, 3, H, W) is finite and in [0, 1]."""
    inside = torch.isfinite(images) & (images >= 0) & (images <= 1)
    return inside.flatten(1).all(dim=1)


def load_graph(path: str | os.PathLike, blackbox: nn.Module | None = None, class_input: bool = False
               ) -> tuple[PredictorGraph, dict]:
    """(graph, description) of a predictor checkpoint (read with ``weights_only=True``); ``blackbox`` None
    builds the recorded one. The description is the JSON written into the exported file."""
    from saliency_lab import explainers
    from saliency_lab.core.checkpoints import safe_load

    checkpoint = safe_load(path)
    # post-hoc tuning is not exported: the graph is the plain predictor of the recorded controller
    name = explainers.recorded_name(path).removesuffix("_posthoc")
    explainer = explainers.build(name, blackbox, checkpoint=checkpoint)
    graph = PredictorGraph(explainer.blackbox, explainer.net.cpu(), class_input, explainer.filter_bias)
    record = checkpoint["explainer"]
    description = {"format": EXPORT_FORMAT, "explainer": explainer.name, "checkpoint": str(path),
                   "blackbox": explainer.blackbox.config()["init_args"]["model"], "num_classes": int(explainer.blackbox.num_classes),
                   "class_input": graph.class_input,
                   "posthoc_tuning_dropped": bool(record.get("inference", {}).get("posthoc", False))}
    return graph.cpu(), description


def example_inputs(graph: PredictorGraph, size: int, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """Random inputs of the graph: images (batch, 3, size, size) [, classes (batch,)] on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    if not graph.class_input:
        return (images,)
    classes = torch.randint(0, int(graph.blackbox.num_classes), (batch,), generator=generator)
    return images, classes


def input_names(graph: PredictorGraph) -> list[str]:
    return ["images", "classes"] if graph.class_input else ["images"]


def export_torchscript(graph: PredictorGraph, example: tuple[Tensor, ...], out: str | os.PathLike,
                       description: dict) -> None:
    """Trace ``graph`` on ``example`` and save it with ``description`` as ``saliency_lab.json``."""
    with warnings.catch_warnings(), torch.no_grad():
        # jit is deprecated upstream but TorchScript is one of the two export formats; the tracer's shape warnings
        # are the documented fixed image size
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": json.dumps(description)})


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict]:
    """(module, description) of an exported TorchScript file."""
    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[f"{METADATA_KEY}.json"])


def export_onnx(graph: PredictorGraph, example: tuple[Tensor, ...], out: str | os.PathLike,
                description: dict) -> None:
    """Export ``graph`` to one ONNX file at opset :data:`ONNX_OPSET` with a dynamic batch axis."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    names = input_names(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on decompositions
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=ONNX_OPSET, input_names=names,
                                    output_names=["masks"], dynamic_shapes={n: {0: batch} for n in
                                                                            ("images", "classes")[:len(names)]},
                                    external_data=False, verbose=False)
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**description, "opset": ONNX_OPSET})
    onnx.checker.check_model(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session of an exported file (``threads``: intra-op threads, default ORT's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_description(path: str | os.PathLike) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])


def export(graph: PredictorGraph, description: dict, size: int, fmt: str, out: str | os.PathLike) -> dict:
    """Write ``graph`` as ``fmt`` ("onnx" or "torchscript") to ``out``; returns the description written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    description = {**description, "image_size": int(size), "inputs": {
        "images": f"(B, 3, {size}, {size}) float32 RGB in [0, 1] (an image outside [0, 1] or not finite gets "
                  "an all-NaN mask)",
        **({"classes": "(B,) int64, the class to explain"} if graph.class_input else {})},
        "outputs": {"masks": f"(B, 1, {size}, {size}) float32, higher = more important"}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    example = example_inputs(graph, size)
    (export_onnx if fmt == "onnx" else export_torchscript)(graph, example, out, description)
    return description


def run_exported(path: str | os.PathLike, fmt: str, inputs: tuple[Tensor, ...]) -> Tensor:
    """Masks of an exported file on ``inputs`` (CPU tensors): the way a user runs it."""
    if fmt == "torchscript":
        module, _ = load_torchscript(path)
        with torch.no_grad():
            return module(*inputs)
    session = onnx_session(path)
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(["masks"], feeds)[0])
