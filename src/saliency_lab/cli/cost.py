"""``saliency-lab cost``: what a training or an evaluation config costs, measured on this machine (CPU or GPU).

    saliency-lab cost --config CONFIG [--config CONFIG ...] [--out DIR] [--gpus A100,H100,L40S] [--utilisation 0.4]

For every config it prints a table and writes ``DIR/cost.json`` and ``DIR/cost.md`` (default DIR: outputs/cost).

A training config (``saliency-lab fit``): one real training step of the config's module on a synthetic batch
(random images at the data's ``image_size``, random labels; the data module is never built), run at
``--measure_batch`` images (default 4) and half of that:

- black-box passes per step: every image sent through a frozen black box (the clean pass, the masked
  pass(es), the game's deletion and insertion passes, ...) and every image whose black-box output a gradient
  reached, counted on that step (:class:`saliency_lab.core.cost.PassCounter`), times the config's batch size
  / the measured batch;
- FLOPs per step: ``FlopCounterMode`` on the step's forward and backward at ``--measure_batch`` images, scaled
  linearly to the config's batch size (the optimizer's element-wise update counts 0);
- peak memory per image: the slope of the step's peak allocation between the two batch sizes (CPU: the
  allocator's events as ``torch.profiler`` records them; on a GPU, ``--device auto`` where one is visible:
  ``torch.cuda.max_memory_allocated``), float32 passes;
- GPU-hours per ImageNet epoch (``--epoch_images``, 1,281,167 training images) and for the config's schedule
  (``max_epochs`` x ``limit_train_batches``), at ``--utilisation`` of each GPU's dense peak
  (:data:`saliency_lab.core.cost.GPUS`): bf16 for a ``bf16-mixed`` / ``16-mixed`` Trainer, TF32 otherwise.

An evaluation config (``saliency-lab evaluate``): per explained image, each method's black-box forwards and
backwards (the explainers' own ``cost`` counters, on one synthetic image) and FLOPs = forwards x F_fwd +
backwards x F_bwd of the real network (F_fwd: ``FlopCounterMode`` on one forward; F_bwd: on one forward
and backward to the input, less F_fwd), plus the explainer's own FLOPs outside the black box (what the
counter sees of them: products and convolutions, e.g. blurs and attention; never below 0). A method whose
passes would cost more than ``--real_limit_gflops`` per image on the real network (iGOS++, IASSA, RISE at
their paper settings: a ResNet-50 at 224 takes far too long on a CPU) is counted on a stand-in black box of
the same input geometry (:func:`saliency_lab.core.cost.stand_in_blackbox`: same image size, classes,
normalisation, feature strides and channels, a few MFLOPs a pass), because its pass count depends on the
image size and its hyper-parameters, not on the network; iGOS++'s line-search trials depend on the network's
loss surface, so their count there is one sample, with the bounds beside it. The metrics' passes
(``settings``: deletion / insertion, M_F, ROAD) are one more row, paid once per method and image. Peak memory
is estimated per process: the rows in flight (max_forward_batch, or fewer when the method makes fewer passes
per batch) x the real network's memory per row (slope between one and two images, forward only or forward
and backward). GPU-hours for the config's ``num_images`` (``method_num_images`` where set), with bf16 for
the passes made inside ``BlackBox.fast`` blocks of a ``precision="auto"`` black box and TF32 for the others.

Neither needs a weights file or a checkpoint: the CNNs are built without their pretrained weights unless
``--load_weights`` is given (FLOPs, pass counts and memory do not depend on the weights' values); a missing
feature-filter checkpoint is replaced by a randomly initialised filter of the right shape; a trained method
of an evaluation (``--predictors``, default ``predictor_ct``: the one-pass predictor the evaluation compares)
is built with random weights when its checkpoint is absent. The output says which of these happened.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace

from saliency_lab import explainers
from saliency_lab.cli.args import normalise_args
from saliency_lab.cli.checks import listed_specs, split_ckpt_entry
from saliency_lab.cli.utils import SaliencyCLI
from saliency_lab.core.blackbox import CLASS_PATH, WEIGHTS_ENV, BlackBox, resolve_weights
from saliency_lab.core.cost import (DEFAULT_GPUS, DEFAULT_UTILISATION, GPU, IMAGENET_TRAIN_IMAGES, PassCounter,
                                    count_flops, gpu_hours, parse_gpus, pass_flops, peak_memory, round_sig, slope,
                                    stand_in_blackbox)
from saliency_lab.core.files import atomic_write, atomic_write_json
from saliency_lab.core.machine import describe
from saliency_lab.core.timing import default_device
from saliency_lab.core.resources import config_folder, resolve_resource
from saliency_lab.explainers import build_explainer, explainer_keys, parse_spec
from saliency_lab.explainers.mask_predictor import RECIPES, VARIANTS
from saliency_lab.metrics import EvaluationSettings
from saliency_lab.metrics.suite import score_saliency
from saliency_lab.networks.mask_generator import MaskPredictorNet, generator_widths

MB = 2**20
GB = 2**30
SCORING = "metrics (per method)"  # the evaluation row of the metrics' passes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saliency-lab cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="a training (fit) or evaluation config; repeat for several")
    parser.add_argument("--out", default="outputs/cost", help="folder of cost.json and cost.md")
    parser.add_argument("--gpus", default=",".join(DEFAULT_GPUS),
                        help="comma-separated GPUs of saliency_lab.core.cost.GPUS")
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION,
                        help="fraction of each GPU's dense peak FLOP/s the job sustains")
    parser.add_argument("--load_weights", action="store_true",
                        help="load the black boxes' weights files (default: random initialisation, same cost)")
    parser.add_argument("--measure_batch", type=int, default=4,
                        help="training: images of the measured step (memory also at half of it)")
    parser.add_argument("--epoch_images", type=int, default=IMAGENET_TRAIN_IMAGES,
                        help="training: images of one epoch (ImageNet's training split)")
    parser.add_argument("--num_images", type=int, default=None, help="evaluation: images (default: the config's)")
    parser.add_argument("--methods", default=None, help="evaluation: only these method keys (comma-separated)")
    parser.add_argument("--predictors", default="predictor_ct",
                        help="evaluation: trained methods added beside the config's (comma-separated; '' for none)")
    parser.add_argument("--real_limit_gflops", type=float, default=100.0,
                        help="evaluation: count a method on the stand-in black box when its passes on the real one "
                             "would exceed this many GFLOPs per image (0: every untrained method on the stand-in)")
    parser.add_argument("--scoring", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="evaluation: also count the metrics' passes (true/false)")
    parser.add_argument("--image_size", type=int, default=None, help="override the data's image size")
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU where one is visible, else the CPU), cpu or cuda[:N]: where the step and the "
                             "methods run; memory is torch.cuda.max_memory_allocated there, the CPU allocator's "
                             "peak here")
    return parser


# -- the kind of a config ---------------------------------------------------------------------------------
def config_kind(path: str | Path) -> str:
    """``"fit"`` for a training config, ``"evaluate"`` for an evaluation config: by its folder (``configs/train/``,
    ``configs/evaluate/``), else by its keys (a ``model``; a ``blackbox`` or ``explainers``), following a
    ``config:`` include; anything else is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    folder = config_folder(path)
    if folder is not None:
        return "fit" if folder == "train" else "evaluate"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: not a YAML mapping")
    heads = {str(key).split(".")[0] for key in data}
    if heads & {"blackbox", "explainers"}:
        return "evaluate"
    if "model" in heads:
        return "fit"
    if isinstance(data.get("config"), str):
        return config_kind(path.parent / data["config"])
    raise ValueError(f"--config {path}: neither a training config (with model:) nor an evaluation config (with "
                     "blackbox: and explainers:)")


# -- training configs -------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingSetup:
    """A training config's module and what its cost depends on.

    Attributes:
        model: the LightningModule (on the CPU, in train mode).
        batch_size, image_size: of the config's data (per process).
        trainer_precision: the Trainer's ``precision``; bf16_fraction 1 for a 16-bit one, else 0.
        max_epochs, limit_train_batches: the Trainer's schedule (None: not set).
        notes: what was built differently from a real run (weights, filter), for the output.
    """

    model: pl.LightningModule
    batch_size: int
    image_size: int
    trainer_precision: str
    bf16_fraction: float
    max_epochs: int | None
    limit_train_batches: int | float | None
    notes: list[str]

    def schedule_images(self, epoch_images: int) -> float | None:
        """Images the schedule trains on: max_epochs x (epoch_images x a fractional limit_train_batches, or an
        integer limit_train_batches x batch_size); None without max_epochs."""
        if not self.max_epochs or self.max_epochs < 0:
            return None
        limit = self.limit_train_batches
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return float(self.max_epochs * limit * self.batch_size)
        fraction = limit if isinstance(limit, float) and 0 < limit <= 1 else 1.0
        return float(self.max_epochs * fraction * epoch_images)


def _blackbox_args(node) -> list[Namespace]:
    """The ``init_args`` of every BlackBox in a (nested) config namespace."""
    found = []
    if isinstance(node, Namespace):
        if str(node.get("class_path", "")).endswith("BlackBox") and isinstance(node.get("init_args"), Namespace):
            found.append(node.init_args)
        for value in vars(node).values():
            found += _blackbox_args(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            found += _blackbox_args(item)
    return found


def _prepare_weights(init_args: Namespace, load_weights: bool, where: str, notes: list[str]) -> None:
    weights = init_args.get("weights")
    if weights in (None, "None", "null"):
        return
    if load_weights:
        try:
            resolved = resolve_weights(str(weights))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--config {where}, --load_weights: {err}") from None
        notes.append(f"black box {init_args.get('model')}: weights loaded from {resolved}")
        return
    init_args.weights = None
    notes.append(f"black box {init_args.get('model')}: built without its weights file ({weights}), randomly "
                 "initialised (FLOPs, passes and memory do not depend on the weights; --load_weights loads the file, "
                 f"a relative name from ${WEIGHTS_ENV})")


def prepare_training_config(config: Namespace, load_weights: bool, where: str, notes: list[str]) -> None:
    """Replace in ``config`` (parsed, before instantiation) what a cost measurement needs no file for: the black
    boxes' weights (unless ``load_weights``), an absent feature-filter checkpoint (a random filter of the right
    shape) and an absent initial-weights file of the module; each change is noted in ``notes``."""
    model = config.model
    for init_args in _blackbox_args(model):
        _prepare_weights(init_args, load_weights, where, notes)
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    if init_args is None:
        return
    for key, what in (("filter_checkpoint", "feature filter"), ("weights", "initial weights")):
        path = init_args.get(key)
        if path and not Path(resolve_resource(str(path))).is_file():
            init_args[key] = None
            notes.append(f"{what}: {path} is absent, so a randomly initialised one of the right shape is used")
        elif path and key == "filter_checkpoint":
            notes.append(f"feature filter: loaded from {path}")


class _ModelOnlyCLI(SaliencyCLI):
    """The training command's parser and config handling (``--config`` includes, dotted keys, class paths),
    instantiating only the model: no data module, Trainer, logger, callbacks or run folder."""

    def __init__(self, *args, prepare: Callable[[Namespace], None], **kwargs):
        self._prepare = prepare
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        self._prepare(self.config)

    def instantiate_classes(self) -> None:
        parser = ArgumentParser()
        parser.add_subclass_arguments(pl.LightningModule, "model", fail_untyped=False, required=True)
        self.model = parser.instantiate(Namespace(model=self.config.model)).model


def _precision_bf16(precision) -> bool:
    return "16" in str(precision) and "32" not in str(precision) and "64" not in str(precision)


def load_training(path: str, load_weights: bool, image_size: int | None = None) -> TrainingSetup:
    """The module of training config ``path`` (built as ``saliency-lab fit`` builds it, without the data module,
    the Trainer or any file it does not need: :func:`prepare_training_config`)."""
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI's note on sys.argv; the untrained-filter warning (noted)
        cli = _ModelOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False,
                            args=normalise_args(["--config", path]),
                            prepare=lambda config: prepare_training_config(config, load_weights, path, notes))
    config = cli.config
    data = config.get("data")
    data_args = data.get("init_args") if isinstance(data, Namespace) else None
    batch = data_args.get("batch_size") if data_args is not None else None
    size = image_size or (data_args.get("image_size") if data_args is not None else None)
    if not batch or not size:
        raise ValueError(f"--config {path}: the data's batch_size and image_size are needed (data.init_args), got "
                         f"{batch} and {size}; --image_size sets the size")
    trainer = config.get("trainer") or Namespace()
    precision = trainer.get("precision")
    model = cli.model.cpu().train()
    return TrainingSetup(model, int(batch), int(size), str(precision), 1.0 if _precision_bf16(precision) else 0.0,
                         trainer.get("max_epochs"), trainer.get("limit_train_batches"), notes)


def synthetic_batch(batch: int, image_size: int, num_classes: int, seed: int = 0) -> dict:
    """A batch as the data modules make it: ``image`` (B, 3, S, S) uniform in [0, 1], ``label`` (B,) in
    [0, num_classes), ``mask`` (B, 1, S, S) all False, ``boxes`` B empty (0, 4) tensors, ``index`` (B,) = 0..B-1."""
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(batch, 3, image_size, image_size, generator=generator),
            "label": torch.randint(0, num_classes, (batch,), generator=generator),
            "mask": torch.zeros(batch, 1, image_size, image_size, dtype=torch.bool),
            "boxes": [torch.zeros(0, 4) for _ in range(batch)], "index": torch.arange(batch)}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v] if isinstance(v, list) else v
            for k, v in batch.items()}


def training_step(model: pl.LightningModule, batch: dict) -> None:
    """One training step's forward and backward (outside a Trainer: ``self.log`` does nothing)."""
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()


def _num_classes(model: torch.nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, BlackBox):
            return int(module.num_classes)
    return int(getattr(model, "num_classes", 1000))


def measure_training(setup: TrainingSetup, measure_batch: int, device: torch.device) -> dict:
    """Passes, FLOPs and memory of one training step (module docstring), per image and per step of the config's
    batch size."""
    if measure_batch < 2:
        raise ValueError(f"--measure_batch must be >= 2 (memory is a slope between it and half of it), got "
                         f"{measure_batch}")
    model = setup.model.to(device).train()
    blackboxes = [m for m in model.modules() if isinstance(m, BlackBox)]
    classes = _num_classes(model)
    small, large = measure_batch // 2, measure_batch
    batches = {b: _to(synthetic_batch(b, setup.image_size, classes), device) for b in (small, large)}
    torch.manual_seed(0)
    with PassCounter(blackboxes) as counter:
        _, flops = count_flops(lambda: training_step(model, batches[large]))
    peaks = {b: peak_memory(lambda b=b: training_step(model, batches[b]), device)[1] for b in (small, large)}
    per_image_memory = slope((small, peaks[small]), (large, peaks[large]))
    scale = setup.batch_size / large
    result = {"measured_batch": large, "batch_size": setup.batch_size, "image_size": setup.image_size,
              "forwards_per_image": counter.forwards / large, "backwards_per_image": counter.backwards / large,
              "forwards_per_step": counter.forwards * scale, "backwards_per_step": counter.backwards * scale,
              "flops_per_image": flops / large, "flops_per_step": flops * scale,
              "peak_bytes": {str(small): peaks[small], str(large): peaks[large]},
              "memory_per_image_bytes": per_image_memory,
              "memory_at_batch_bytes": peaks[large] + (setup.batch_size - large) * per_image_memory,
              "bf16_fraction": setup.bf16_fraction, "trainer_precision": setup.trainer_precision}
    frozen = [bb for bb in blackboxes if not any(p.requires_grad for p in bb.parameters())]
    if frozen:
        f_fwd = pass_flops(frozen[0], setup.image_size)
        f_bwd = pass_flops(frozen[0], setup.image_size, backward=True) - f_fwd
        result.update(blackbox=frozen[0].spec, blackbox_forward_flops=f_fwd, blackbox_backward_flops=f_bwd,
                      blackbox_flops_share=(counter.forwards * f_fwd + counter.backwards * f_bwd) / max(flops, 1))
    elif blackboxes:
        result["blackbox"] = blackboxes[0].spec
    return result


def training_hours(result: dict, schedule_images: float | None, gpus: Sequence[GPU], utilisation: float,
                   epoch_images: int) -> dict:
    """Per GPU: hours for an epoch of ``epoch_images`` and for the schedule's ``schedule_images`` (None: none)."""
    hours = {}
    for gpu in gpus:
        def hours_for(images):
            return gpu_hours(result["flops_per_image"] * images, gpu, result["bf16_fraction"], utilisation)

        hours[gpu.name] = {"epoch": hours_for(epoch_images),
                           "schedule": None if schedule_images is None else hours_for(schedule_images)}
    return hours


# -- evaluation configs -----------------------------------------------------------------------------------
@dataclasses.dataclass
class EvaluationSetup:
    """An evaluation config's black box, methods and what their cost depends on."""

    blackbox: BlackBox
    specs: dict[str, Any]  # method key -> explainer spec
    trained_random: set[str]  # keys of trained methods built with random weights
    image_size: int
    batch_size: int
    max_forward_batch: int
    num_images: dict[str, int]  # method key -> images it explains
    settings: EvaluationSettings
    seed: int
    notes: list[str]


def _evaluation_specs(cfg, methods: str | None, predictors: str, notes: list[str]) -> tuple[dict, set]:
    """Method key -> spec (the config's explainers with ``method_hparams``, its ``ckpt_path`` entries and
    ``--predictors``), and the keys of trained methods to build with random weights."""
    specs = listed_specs(cfg.explainers)
    random_weights: set[str] = set()
    for entry in cfg.ckpt_path or []:
        name, path = split_ckpt_entry(entry)
        if Path(path).is_file():
            specs.append({"name": name or explainers.recorded_name(path), "checkpoint": path})
        elif name:
            specs.append(name)
            notes.append(f"{name}: checkpoint {path} is absent, built with random weights (same passes and FLOPs)")
        else:
            raise FileNotFoundError(f"--ckpt_path {path} in the config: no such file, and no NAME= to build the method "
                                    "with random weights instead")
    keys = explainer_keys(specs)
    for name in [p.strip() for p in (predictors or "").split(",") if p.strip()]:
        if name not in keys:
            specs.append(name)
            keys.append(name)
    by_key = dict(zip(explainer_keys(specs), specs))
    for key, spec in by_key.items():
        overrides = (cfg.method_hparams or {}).get(key)
        if overrides:
            by_key[key] = {"name": spec, **overrides} if isinstance(spec, str) else {**spec, **overrides}
    if methods:
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(by_key))
        if unknown:
            raise ValueError(f"--methods {unknown}: not methods of the config; it has {sorted(by_key)}")
        by_key = {k: v for k, v in by_key.items() if k in wanted}
    for key, spec in by_key.items():
        parsed = parse_spec(spec)
        if parsed.name and explainers.is_trained(parsed.name) and not parsed.checkpoint:
            random_weights.add(key)
    if random_weights:
        notes.append(f"{', '.join(sorted(random_weights))}: trained method(s) built with random weights and the "
                     "generator of the black box's preset (a trained checkpoint has the same passes and FLOPs)")
    return by_key, random_weights


def load_evaluation(path: str, args) -> EvaluationSetup:
    """The black box, methods and settings of evaluation config ``path`` (parsed as ``saliency-lab evaluate``
    parses it; the data module is not built)."""
    from saliency_lab.cli.evaluate import build_parser as evaluate_parser

    notes: list[str] = []
    cfg = evaluate_parser().parse_args(normalise_args(["--config", path]))
    data = cfg.get("data")
    size = args.image_size or (data.init_args.get("image_size") if isinstance(data, Namespace) and
                               isinstance(data.get("init_args"), Namespace) else None)
    if not size:
        raise ValueError(f"--config {path}: no data.init_args.image_size; give --image_size")
    if not str(cfg.blackbox.class_path).endswith("BlackBox"):
        raise ValueError(f"--config {path}: blackbox.class_path {cfg.blackbox.class_path} is not {CLASS_PATH}")
    init_args = cfg.blackbox.init_args
    _prepare_weights(init_args, args.load_weights, path, notes)
    blackbox = BlackBox(**init_args.as_dict())
    specs, random_weights = _evaluation_specs(cfg, args.methods, args.predictors, notes)
    total = args.num_images or cfg.num_images
    if not total:
        raise ValueError(f"--config {path}: no num_images; give --num_images")
    limits = cfg.method_num_images or {}
    num_images = {key: min(int(total), int(limits.get(key, total))) for key in specs}
    settings = EvaluationSettings(**cfg.settings.as_dict()).resolve(int(size), target=cfg.target,
                                                                    max_forward_batch=cfg.max_forward_batch)
    return EvaluationSetup(blackbox, specs, random_weights, int(size), int(cfg.batch_size), int(cfg.max_forward_batch),
                           num_images, settings, int(cfg.seed), notes)


def random_predictor(name: str, blackbox: BlackBox, hparams: dict, common: dict):
    """The trained method ``name`` (a recipe's, ``predictor_ct``, ``mgnet``, ..., or an inference variant,
    ``predictor_ct_posthoc``, ``mgnet_ct_posthoc``) with a randomly initialised network of the black box's
    generator preset."""
    cls = RECIPES.get(name) or VARIANTS.get(name)
    if cls is None:
        raise ValueError(f"{name}: only the mask predictors can be built without their checkpoint")
    channels = list(blackbox.feature_channels)
    net = MaskPredictorNet(channels, blackbox.num_classes, generator_widths(blackbox.spec, channels), cls.controller)
    return cls(blackbox, net.eval(), **{**common, **hparams})


def _run_explainer(explainer, images: torch.Tensor, targets: torch.Tensor, blackbox: BlackBox) -> dict:
    """One call on ``images``: the explainer's cost per image, the bf16 share of its passes and its FLOPs per
    image (FlopCounterMode)."""
    with PassCounter(blackbox) as counter:
        _, flops = count_flops(lambda: explainer(images, targets))
    count = images.shape[0]
    out = {"forwards": explainer.cost.forwards / count, "backwards": explainer.cost.backwards / count,
           "flops": flops / count, "bf16_fraction": counter.bf16_fraction}
    trials, most = getattr(explainer, "last_trials", None), getattr(explainer, "max_trials", None)
    iterations = getattr(explainer, "last_iterations", None)
    if trials is not None and most is not None and iterations is not None and out["backwards"]:
        # line search: forwards = P (2 T + sum_i t_i), backwards = P T, 1 <= t_i <= max_trials
        steps = float(iterations.float().mean())
        rows = out["backwards"] / steps
        out["forwards_bounds"] = [rows * 3 * steps, rows * (2 + int(most)) * steps]
        out["mean_trials"] = float(trials[trials > 0].float().mean())
    return out


def measure_evaluation(setup: EvaluationSetup, real_limit_gflops: float, scoring: bool, device: torch.device) -> dict:
    """Per method and image: passes, FLOPs on the real network, bf16 share, estimated peak memory (module
    docstring); plus the metrics' row."""
    real = setup.blackbox.to(device)
    size = setup.image_size
    stand_in = stand_in_blackbox(real, size)
    flops = {}
    for name, model in (("real", real), ("stand_in", stand_in)):
        forward = pass_flops(model, size)
        flops[name] = (forward, pass_flops(model, size, backward=True) - forward)
    rows_memory = {kind: _row_memory(real, size, backward, device) for kind, backward in (("forward", False),
                                                                                         ("backward", True))}
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, real.num_classes, (1,), generator=generator).to(device)
    common = {"seed": setup.seed, "max_forward_batch": setup.max_forward_batch}
    methods = {}
    for key, spec in setup.specs.items():
        methods[key] = _method_cost(key, spec, setup, real, stand_in, flops, images, targets, common,
                                    real_limit_gflops)
        print(f"  {key}: {methods[key]['forwards']:g} forwards, {methods[key]['backwards']:g} backwards per image "
              f"(counted on the {methods[key]['counted_on']})", flush=True)
    if scoring:
        methods[SCORING] = _scoring_cost(setup, stand_in, flops, images, targets)
    for record in methods.values():
        record["memory_bytes"] = _memory_estimate(record, setup, rows_memory)
    return {"image_size": size, "batch_size": setup.batch_size, "max_forward_batch": setup.max_forward_batch,
            "blackbox": real.spec, "blackbox_precision": real.precision,
            "forward_flops": flops["real"][0], "backward_flops": flops["real"][1],
            "stand_in_forward_flops": flops["stand_in"][0], "stand_in_backward_flops": flops["stand_in"][1],
            "row_memory_bytes": rows_memory, "methods": methods, "num_images": setup.num_images}


def _row_memory(blackbox: BlackBox, size: int, backward: bool, device: torch.device) -> float:
    """Bytes per image of a black-box pass (the slope of the peak between one and two images)."""
    peaks = []
    for batch in (1, 2):
        x = torch.rand(batch, 3, size, size, device=device)

        def run(x=x):
            if not backward:
                with torch.no_grad():
                    return blackbox.logits(x)
            with torch.enable_grad():
                blackbox.logits(x.clone().requires_grad_(True)).float().sum().backward()

        peaks.append((batch, peak_memory(run, device)[1]))
    return slope(*peaks)


def _method_cost(key, spec, setup, real, stand_in, flops, images, targets, common, limit_gflops) -> dict:
    """One method's row: trained methods on the real black box; the others on the stand-in first, then on the
    real black box when their passes there would cost at most ``limit_gflops`` per image. ``flops``: name ->
    (F_fwd, F_bwd) per image of "real" and "stand_in"."""
    parsed = parse_spec(spec)
    if key in setup.trained_random:
        measured = _run_explainer(random_predictor(parsed.name, real, parsed.hparams, common), images, targets, real)
        counted_on = "black box"
    elif parsed.name and explainers.is_trained(parsed.name):
        measured = _run_explainer(build_explainer(spec, real, **common), images, targets, real)
        counted_on = "black box"
    else:
        measured = _run_explainer(build_explainer(spec, stand_in, **common), images, targets, stand_in)
        counted_on = "stand-in"
        estimate = measured["forwards"] * flops["real"][0] + measured["backwards"] * flops["real"][1]
        if estimate <= limit_gflops * 1e9:
            on_stand_in = measured
            measured = _run_explainer(build_explainer(spec, real, **common), images, targets, real)
            counted_on = "black box"
            if (on_stand_in["forwards"], on_stand_in["backwards"]) != (measured["forwards"], measured["backwards"]):
                measured["stand_in_counts"] = [on_stand_in["forwards"], on_stand_in["backwards"]]
    used = flops["real"] if counted_on == "black box" else flops["stand_in"]
    total = measured.pop("flops")
    overhead = max(0.0, total - measured["forwards"] * used[0] - measured["backwards"] * used[1])
    passes = measured["forwards"] * flops["real"][0] + measured["backwards"] * flops["real"][1]
    return {**measured, "name": parsed.name, "counted_on": counted_on, "overhead_flops": overhead,
            "flops_per_image": passes + overhead, "measured_flops": total,
            "random_weights": key in setup.trained_random}


def _scoring_cost(setup: EvaluationSetup, stand_in: BlackBox, flops, images, targets) -> dict:
    """The metrics of ``settings`` on one image's random map, counted on the stand-in."""
    saliency = torch.rand(images.shape[0], 1, *images.shape[-2:], generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    device = images.device
    with PassCounter(stand_in) as counter:
        _, measured = count_flops(lambda: score_saliency(stand_in, images, saliency.to(device), targets,
                                                         masks.to(device), setup.settings))
    count = images.shape[0]
    forwards, backwards = counter.forwards / count, counter.backwards / count
    overhead = max(0.0, measured / count - forwards * flops["stand_in"][0] - backwards * flops["stand_in"][1])
    return {"name": "metrics", "counted_on": "stand-in", "forwards": forwards, "backwards": backwards,
            "bf16_fraction": counter.bf16_fraction, "overhead_flops": overhead, "measured_flops": measured / count,
            "flops_per_image": forwards * flops["real"][0] + backwards * flops["real"][1] + overhead,
            "random_weights": False}


def _memory_estimate(record: dict, setup: EvaluationSetup, rows_memory: dict) -> float:
    """Peak bytes per process: rows in flight (at most max_forward_batch; a batch's passes when fewer) x the
    real network's bytes per row (forward, or forward and backward for a method that back-propagates)."""
    rows = min(setup.max_forward_batch, math.ceil(record["forwards"] * setup.batch_size))
    return rows * rows_memory["backward" if record["backwards"] else "forward"]


def evaluation_hours(result: dict, gpus: Sequence[GPU], utilisation: float) -> dict:
    """Per method (and the metrics' row, paid once per method and image): GPU-hours for its images, per GPU."""
    hours = {}
    images = result["num_images"]
    for key, record in result["methods"].items():
        count = images.get(key, 0) if key != SCORING else sum(images.values())
        record["images"] = count
        hours[key] = {gpu.name: gpu_hours(record["flops_per_image"] * count, gpu, record["bf16_fraction"], utilisation)
                      for gpu in gpus}
    hours["total"] = {gpu.name: sum(h[gpu.name] for h in hours.values()) for gpu in gpus}
    return hours


# -- reports ----------------------------------------------------------------------------------------------
def _g(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    rounded = round_sig(float(value), digits)
    return f"{rounded:,.0f}" if abs(rounded) >= 100 else f"{rounded:g}"


def training_table(results: list[dict], gpus: Sequence[GPU]) -> list[str]:
    names = [g.name for g in gpus]
    lines = ["| config | black box | batch | forwards / step | backwards / step | GFLOPs / step | black-box share "
             "| MB / image | GB at batch | " + " | ".join(f"{n} h / epoch" for n in names) + " | "
             + " | ".join(f"{n} h / schedule" for n in names) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(names))]
    for r in results:
        m, hours = r["measured"], r["gpu_hours"]
        share = m.get("blackbox_flops_share")
        lines.append(
            f"| {Path(r['config']).name} | {m.get('blackbox', '–')} | {m['batch_size']} "
            f"| {_g(m['forwards_per_step'])} "
            f"| {_g(m['backwards_per_step'])} | {_g(m['flops_per_step'] / 1e9)} "
            f"| {'–' if share is None else f'{share:.0%}'} | {_g(m['memory_per_image_bytes'] / MB)} "
            f"| {_g(m['memory_at_batch_bytes'] / GB)} | "
            + " | ".join(_g(hours[n]["epoch"]) for n in names) + " | "
            + " | ".join(_g(hours[n]["schedule"]) for n in names) + " |")
    return lines


def _dtype(fraction: float) -> str:
    if fraction >= 0.999:
        return "bf16"
    if fraction <= 0.001:
        return "fp32 (TF32)"
    return f"{fraction:.0%} bf16"


def evaluation_table(result: dict, gpus: Sequence[GPU]) -> list[str]:
    names = [g.name for g in gpus]
    m, hours = result["measured"], result["gpu_hours"]
    lines = ["| method | counted on | forwards / image | backwards / image | GFLOPs / image | passes on GPU "
             f"| GB at batch {m['batch_size']} | images | " + " | ".join(f"{n} h" for n in names) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for key, r in m["methods"].items():
        forwards = _g(r["forwards"], 4)
        if r.get("forwards_bounds"):
            low, high = r["forwards_bounds"]
            forwards += f" ({_g(low, 4)}–{_g(high, 4)})"
        label = key + (" (random weights)" if r.get("random_weights") else "")
        lines.append(f"| {label} | {r['counted_on']} | {forwards} | {_g(r['backwards'], 4)} "
                     f"| {_g(r['flops_per_image'] / 1e9)} | {_dtype(r['bf16_fraction'])} "
                     f"| {_g(r['memory_bytes'] / GB)} | {r['images']:,} | "
                     + " | ".join(_g(hours[key][n]) for n in names) + " |")
    lines.append("| **total** | | | | | | | | " + " | ".join(f"**{_g(hours['total'][n])}**" for n in names) + " |")
    return lines


def short_commit() -> str:
    from saliency_lab.cli.evaluate import git_commit

    full = git_commit()
    if not full:
        return "unknown"
    head, _, dirty = full.partition("+")
    return head[:7] + ("+dirty" if dirty else "")


def markdown(report: dict) -> str:
    gpus = [parse_gpus([name])[0] for name in report["gpus"]]
    machine = report["machine"]
    lines = ["# Cost", "",
             f"Measured {report['date']}, commit `{report['commit']}`, machine: {machine['cpu']} "
             f"({machine['logical_cores']} logical cores, {machine['torch_threads']} torch threads, torch "
             f"{machine['torch']}, device {machine['device']}). Command: `{report['command']}`.",
             f"GPU-hours at {report['utilisation']:.0%} of each GPU's dense peak: "
             + "; ".join(f"{g.name} bf16 {g.bf16:g} / TF32 {g.tf32:g} TFLOP/s ({g.source})" for g in gpus) + ".", ""]
    fits = [r for r in report["configs"] if r["kind"] == "fit"]
    if fits:
        batch = fits[0]["measured"]["measured_batch"]
        lines += ["## Training", "",
                  f"One training step per config (training_step's forward and backward; no data module, Trainer or "
                  f"optimizer update) on a synthetic batch of {batch} images: passes and FLOPs scaled linearly to the "
                  f"config's batch; MB / image = slope of the step's peak allocation between {batch // 2} and {batch} "
                  "images (float32); GB at batch = the peak extrapolated to the config's batch. Black-box share: the "
                  "step's FLOPs in black-box passes. Epoch = "
                  f"{report['epoch_images']:,} images; schedule = max_epochs x limit_train_batches; bf16 peak for "
                  "a 16-bit Trainer precision, TF32 for 32-true.", ""]
        lines += training_table(fits, gpus)
        lines += [""] + [f"- {note}" for note in dict.fromkeys(note for r in fits for note in r["notes"])]
    for r in (r for r in report["configs"] if r["kind"] == "evaluate"):
        m = r["measured"]
        lines += ["", f"## Evaluation: {Path(r['config']).name}", "",
                  f"Black box {m['blackbox']} at {m['image_size']} px: {_g(m['forward_flops'] / 1e9)} GFLOPs a "
                  "forward, "
                  f"{_g(m['backward_flops'] / 1e9)} a backward to the input; memory per row "
                  f"{_g(m['row_memory_bytes']['forward'] / MB)} MB (forward) / "
                  f"{_g(m['row_memory_bytes']['backward'] / MB)} MB (forward + backward). Per explained image, on "
                  "one synthetic image; a method whose passes would exceed "
                  f"{_g(report['real_limit_gflops'])} GFLOPs on the black box is counted on the stand-in (same image "
                  "size, classes, feature strides and channels), its FLOPs = its passes x the black box's + what it "
                  "computes outside them. Forwards in brackets: the line search's bounds. GB at batch: rows in "
                  "flight x memory per row. The metrics' row is paid by every method on each of its images.", ""]
        lines += evaluation_table(r, gpus)
        lines += [""] + [f"- {note}" for note in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    gpus = parse_gpus(args.gpus)
    if not 0 < args.utilisation <= 1:
        raise SystemExit(f"--utilisation must be in (0, 1], got {args.utilisation}")
    device = torch.device(default_device() if args.device == "auto" else args.device)
    configs = []
    for path in args.config:
        path = resolve_resource(path)
        kind = config_kind(path)
        print(f"{path}: {kind} config", flush=True)
        if kind == "fit":
            setup = load_training(path, args.load_weights, args.image_size)
            measured = measure_training(setup, args.measure_batch, device)
            measured["schedule_images"] = setup.schedule_images(args.epoch_images)
            hours = training_hours(measured, measured["schedule_images"], gpus, args.utilisation, args.epoch_images)
            notes = setup.notes
        else:
            setup = load_evaluation(path, args)
            measured = measure_evaluation(setup, args.real_limit_gflops, args.scoring, device)
            hours = evaluation_hours(measured, gpus, args.utilisation)
            notes = setup.notes
        configs.append({"config": str(path), "kind": kind, "measured": measured, "gpu_hours": hours, "notes": notes})
    report = {"date": datetime.date.today().isoformat(), "commit": short_commit(), "machine": describe(device),
              "command": "saliency-lab cost " + " ".join(argv),
              "gpus": [g.name for g in gpus], "gpu_peaks": {g.name: dataclasses.asdict(g) for g in gpus},
              "utilisation": args.utilisation, "epoch_images": args.epoch_images,
              "real_limit_gflops": args.real_limit_gflops, "configs": configs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "cost.json", report, default=str)
    text = markdown(report)
    atomic_write(out / "cost.md", text)
    print(text)
    print(f"written: {out / 'cost.json'}, {out / 'cost.md'}")
    return report


if __name__ == "__main__":
    main()
