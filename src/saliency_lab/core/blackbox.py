"""The only door to a classifier: a frozen model that takes [0,1] images and owns its normalisation.

``BlackBox(model)`` where ``model`` is
  - ``"timm:NAME"`` — any timm CNN (``timm:resnet50``); features through timm's ``forward_intermediates``;
  - ``"torchvision:NAME"`` — ``googlenet``, ``vgg19`` (and ``vgg16``, ``resnet50``); features through
    ``torchvision.models.feature_extraction`` at the nodes listed in ``TORCHVISION_FEATURE_NODES``;
  - ``"ckpt:PATH"`` (or a path ending in ``.ckpt``/``.pt``) — a checkpoint written by this project (a
    ``Classifier`` Lightning checkpoint or an exported black box), read with ``weights_only=True``;
  - ``"embedded"`` — the embedded black box that ships with the package (``assets/embedded_blackbox.pt``).
Pretrained weights come from a local file (``weights=``, ``.pth``/``.pt`` state dict or ``.safetensors``);
nothing is ever downloaded. A relative ``weights`` path that does not exist under the working directory is looked
up in the folder named by the environment variable ``SALIENCY_LAB_WEIGHTS`` (:func:`resolve_weights`), so the
configs name a file (``resnet50-0676ba61.pth``) and the user names its folder once.

Cheaper passes (figures and the faithfulness check: ``benchmarks/fast_blackbox.py``,
:func:`probability_gap` here and ``explainers.faithfulness``):

- ``precision="bf16"``: every pass under ``torch.autocast(device, bfloat16)`` (weights stay float32; outputs
  are cast back to float32). ``"auto"``: bf16 only inside a :meth:`BlackBox.fast` block *and* when the device
  computes bf16 natively (CPU with AVX512-BF16/AMX through oneDNN, CUDA with bf16 support), float32 otherwise;
  the explainers and metrics whose faithfulness was measured enter that block (RISE, IASSA, the causal
  metrics; the gradient-based methods stay float32: their bf16 backward was not faster). ``"32"``: always
  float32. Default ``"auto"``.
- ``channels_last=True`` (default): weights and inputs in channels-last memory layout (oneDNN's fast CPU
  path); the values equal the contiguous ones up to summation order (~1e-7).
- ``compile=MODE``: the classifier wrapped in ``torch.compile(net, mode=MODE, dynamic=False)`` for ``logits``
  (``features`` stays eager: timm's ``forward_intermediates`` is a different graph). MODE is one of
  :data:`COMPILE_MODES`; each new input shape compiles anew, which can take minutes on a CPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from saliency_lab.core.checkpoints import remote_scheme, safe_load
from saliency_lab.core.resources import current_class_path, packaged, resolve_resource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPORT_FORMAT = "saliency-lab/blackbox/v1"
PRECISIONS = ("32", "bf16", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CLASS_PATH = "saliency_lab.core.blackbox.BlackBox"
EMBEDDED = "embedded"  # model spec of the embedded black box that ships with the package
EMBEDDED_RECORD = "assets/embedded_blackbox.pt"
MAX_CLASSES = 100_000  # a record claiming more classes is corrupt (ImageNet-21k has 21,841)
WEIGHTS_ENV = "SALIENCY_LAB_WEIGHTS"  # the folder where relative weights paths are looked up

# Graph nodes giving stride-2..32 feature maps of torchvision CNNs, and their channels.
TORCHVISION_FEATURE_NODES = {
    "vgg19": (["features.4", "features.9", "features.18", "features.27", "features.36"],
              [64, 128, 256, 512, 512], [2, 4, 8, 16, 32]),
    "vgg16": (["features.4", "features.9", "features.16", "features.23", "features.30"],
              [64, 128, 256, 512, 512], [2, 4, 8, 16, 32]),
    "googlenet": (["maxpool1", "conv3", "inception3b", "inception4e", "inception5b"],
                  [64, 192, 480, 832, 1024], [4, 4, 8, 16, 32]),
    "resnet50": (["relu", "layer1", "layer2", "layer3", "layer4"],
                 [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
}
TORCHVISION_LOGITS_NODE = {"vgg19": "classifier.6", "vgg16": "classifier.6", "googlenet": "fc", "resnet50": "fc"}


def create_network(model: str, num_classes: int | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """Build the bare (randomly initialised) network of a ``"timm:NAME"``, ``"torchvision:NAME"`` or
    ``"module:PACKAGE.CLASS"`` spec (a module class gets ``model_kwargs`` only: its class count is read from its
    output)."""
    kind, _, name = model.partition(":")
    kwargs = dict(model_kwargs or {})
    if kind == "module":
        return _import_module_class(name, model)(**kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    if kind == "torchvision":
        import torchvision

        if name not in TORCHVISION_FEATURE_NODES:
            raise ValueError(f"torchvision model {name!r} has no feature-node table; known: "
                             f"{sorted(TORCHVISION_FEATURE_NODES)}")
        if name == "googlenet":  # aux heads are training-only; normalisation is ours, not transform_input
            kwargs = {"aux_logits": False, "transform_input": False, "init_weights": True, **kwargs}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise ValueError(f"unknown black box {model!r}: expected 'timm:NAME', 'torchvision:NAME', 'module:PACKAGE.CLASS', "
                     "'ckpt:PATH' or 'embedded'")


def resolve_weights(weights: str | os.PathLike) -> str:
    """The file a ``weights`` argument names: the path itself when it exists (a packaged ``assets/...`` file
    too; a URL is returned as it is, for :func:`saliency_lab.core.checkpoints.safe_load` to refuse), else, for a
    relative path, the same relative path under the folder in ``$SALIENCY_LAB_WEIGHTS``.

    Raises:
        FileNotFoundError: neither exists; the message names the file, the variable and the command-line
            override of training and of evaluation.
    """
    text = os.fspath(weights)
    if remote_scheme(text) is not None:
        return text
    if os.path.exists(resolve_resource(text)):  # assets/... also falls back to the installed package's copy
        return resolve_resource(text)
    folder = os.environ.get(WEIGHTS_ENV, "")
    if folder and not os.path.isabs(text):
        candidate = os.path.join(folder, text)
        if os.path.exists(candidate):
            return candidate
    if os.path.isabs(text):
        where = "that absolute path does not exist"
    elif folder:
        where = f"neither under the working directory {os.getcwd()} nor under {WEIGHTS_ENV}={folder}"
    else:
        where = f"not under the working directory {os.getcwd()}, and {WEIGHTS_ENV} is not set"
    raise FileNotFoundError(
        f"no such file {text} (the black box's weights): {where}. Put the file in a folder and set "
        f"{WEIGHTS_ENV}=FOLDER (relative weights paths are looked up there), or give its path: "
        "--model.init_args.blackbox.init_args.weights=PATH for saliency-lab fit/validate/test, "
        "--blackbox.init_args.weights=PATH for saliency-lab evaluate and explain.")


def _import_module_class(qualified: str, spec: str) -> type:
    """The ``nn.Module`` subclass ``PACKAGE.MODULE.CLASS`` names (``module:`` specs of configs)."""
    import importlib

    module_name, _, class_name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"black box {spec!r}: cannot import {qualified!r} ({err}); give an importable "
                         "'module:PACKAGE.MODULE.CLASS'") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"black box {spec!r}: {qualified} is not an nn.Module class")
    return cls


def module_spec(module: nn.Module) -> str:
    """``"module:PACKAGE.MODULE.CLASS"``, the spec that names a module object's class."""
    cls = type(module)
    return f"module:{cls.__module__}.{cls.__qualname__}"


def blackbox_record(model: str, net: nn.Module, num_classes: int, model_kwargs: dict | None,
                    mean: Sequence[float], std: Sequence[float]) -> dict:
    """A ``weights_only``-loadable record from which ``BlackBox('ckpt:PATH')`` rebuilds a classifier."""
    return {"format": EXPORT_FORMAT, "model": model, "num_classes": int(num_classes),
            "model_kwargs": dict(model_kwargs or {}), "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def checkpoint_of(model: str) -> str | None:
    """The file a model spec names: PATH of ``"ckpt:PATH"``, a bare path ending in ``.ckpt``/``.pt``, or the packaged
    record for ``"embedded"``; None for ``"timm:NAME"`` / ``"torchvision:NAME"``."""
    if model == EMBEDDED:
        return str(packaged(EMBEDDED_RECORD))
    kind, _, name = model.partition(":")
    if kind == "ckpt":
        return name
    if not name and model.endswith((".ckpt", ".pt")):
        return model
    return None


def read_blackbox_record(path: str | os.PathLike) -> dict:
    """The :func:`blackbox_record` of a classifier checkpoint or of a bare record file (``weights_only``),
    validated (:func:`check_blackbox_record`)."""
    obj = safe_load(path)
    record = obj.get("blackbox", obj) if isinstance(obj, dict) else None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a black-box checkpoint of this project (no '{EXPORT_FORMAT}' "
                         "record); for plain weights use model='timm:NAME', weights=PATH")
    check_blackbox_record(record, path)
    return record


def check_normalisation(mean, std, where: str) -> None:
    """Three finite per-channel means and three finite, positive stds (a std of 0 or NaN gives NaN logits)."""
    for name, values in (("mean", mean), ("std", std)):
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} must be 3 numbers, got {values!r}") from None
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{where}: {name} must be 3 finite numbers (one per RGB channel), got {values!r}")
        if name == "std" and not all(v > 0 for v in numbers):
            raise ValueError(f"{where}: std must be positive (the input is divided by it), got {values!r}")


def check_finite_weights(state_dict: dict, where: str) -> None:
    """Every floating-point tensor of a state dict is finite (NaN weights give NaN logits everywhere)."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where}: weights {key!r} contain NaN or Inf")


def check_blackbox_record(record: dict, where) -> None:
    """Raise ValueError naming ``where`` and the field when a black-box record is not sane: the model spec,
    a class count in [2, MAX_CLASSES], finite mean and positive finite std, finite weights."""
    model = record.get("model")
    if not isinstance(model, str) or model.partition(":")[0] not in ("timm", "torchvision"):
        raise ValueError(f"{where}: black-box record has model {model!r}, expected 'timm:NAME' or 'torchvision:NAME'")
    classes = record.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"{where}: black-box record has num_classes {classes!r}, expected an int in "
                         f"[2, {MAX_CLASSES}]")
    if not isinstance(record.get("model_kwargs") or {}, dict):
        raise ValueError(f"{where}: black-box record's model_kwargs must be a dict")
    check_normalisation(record.get("mean"), record.get("std"), str(where))
    if not isinstance(record.get("state_dict"), dict):
        raise ValueError(f"{where}: black-box record has no state_dict")
    check_finite_weights(record["state_dict"], str(where))


def _state_dict_from(obj: dict, path) -> dict:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path} holds no state dict (looked for 'state_dict', 'model', or a flat tensor dict)")


class BlackBox(nn.Module):
    """A frozen classifier on [0,1] images with multi-level features.

    Args:
        model: ``"timm:NAME"``, ``"torchvision:NAME"``, ``"module:PACKAGE.CLASS"``, ``"ckpt:PATH"``, ``"embedded"``
            (see module docstring), or an ``nn.Module`` object (your own classifier; :meth:`from_module`).
        num_classes: output classes (default: the architecture's default, 1000 for ImageNet models; read from
            the output for a module).
        weights: local file with weights for a timm/torchvision/module model (state dict or ``.safetensors``);
            a relative path missing under the working directory is looked up under ``$SALIENCY_LAB_WEIGHTS``
            (:func:`resolve_weights`). :meth:`config` records it as given, so a checkpoint names the file,
            not this machine's folder.
        model_kwargs: extra keyword arguments of the model constructor (e.g. timm ``channels``; a
            ``module:`` class's init args).
        mean, std: input normalisation (default: the model's pretrained config or ImageNet's; for a module, no
            normalisation: mean 0 and std 1, the module receives [0,1] images).
        feature_levels: how many of the deepest feature levels ``features()`` returns (timm/torchvision: ≥ 4
            exist; a module: at most ``len(feature_layers)``, default all of them).
        feature_layers: for a module, the names (``dict(net.named_modules())`` keys) of the layers whose outputs
            are the feature levels, shallow to deep; None: no feature levels (methods that need them say so).
        input_size: for a module, the side of the probe image (zeros) that reads the class count and each
            level's channels and stride at construction.
        precision: ``"auto"`` (default), ``"32"`` or ``"bf16"`` (module docstring: ``"auto"`` is bf16 inside
            :meth:`fast` blocks on hardware with native bf16, float32 elsewhere).
        channels_last: keep weights and inputs in channels-last layout (default True: same values up to
            summation order, faster oneDNN kernels).
        compile: None, or a ``torch.compile`` mode for ``logits`` (module docstring).

    Shapes: ``logits(x)``: x (B,3,H,W) in [0,1] -> (B,K). ``features(x)`` -> list of (B,C_l,H/s_l,W/s_l),
    shallow to deep, with ``feature_channels[l] = C_l``, ``feature_strides[l] = s_l`` and
    ``feature_modules[l]`` the name, within ``net``, of the module whose output level l is.

    The black box is frozen (``requires_grad=False``) and always in eval mode: ``train()`` is a no-op, so a
    LightningModule that owns it cannot switch its batch norms to training statistics.
    """

    def __init__(
        self,
        model: str = "timm:resnet50",
        num_classes: int | None = None,
        weights: str | None = None,
        model_kwargs: dict | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_levels: int | None = None,
        feature_layers: Sequence[str] | None = None,
        input_size: int = 224,
        precision: str = "auto",
        channels_last: bool = True,
        compile: str | None = None,
    ):
        super().__init__()
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ValueError(f"BlackBox precision must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"BlackBox channels_last must be a bool, got {channels_last!r}")
        compile = None if compile in ("None", "null") else compile
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"BlackBox compile must be None or a torch.compile mode {COMPILE_MODES}, got {compile!r}")
        # jsonargparse turns a command-line `...blackbox.init_args.weights=null` into the string "None" for a
        # nested class argument: read it as the null it was
        weights = None if weights in ("None", "null") else weights
        in_memory = isinstance(model, nn.Module)
        spec = module_spec(model) if in_memory else str(model)
        feature_layers = None if feature_layers is None else [str(name) for name in feature_layers]
        # the arguments as given: config() records them so that a checkpoint can rebuild this black box
        self._init_args = {"model": spec, "num_classes": num_classes, "weights": weights,
                           "model_kwargs": None if model_kwargs is None else dict(model_kwargs),
                           "mean": None if mean is None else [float(v) for v in mean],
                           "std": None if std is None else [float(v) for v in std],
                           "feature_levels": None if feature_levels is None else int(feature_levels),
                           "feature_layers": feature_layers, "input_size": int(input_size),
                           "precision": precision, "channels_last": channels_last, "compile": compile}
        self._in_memory = in_memory
        if feature_levels is not None and feature_levels < 1:
            raise ValueError(f"feature_levels must be >= 1, got {feature_levels}")
        kind, _, name = spec.partition(":")
        path = None if in_memory else checkpoint_of(spec)
        model_kwargs = dict(model_kwargs or {})
        if path is not None:
            record = read_blackbox_record(path)
            kind, _, name = record["model"].partition(":")
            num_classes = record["num_classes"]
            model_kwargs = dict(record.get("model_kwargs") or {})
            mean = mean or record.get("mean")
            std = std or record.get("std")
            state_dict = record["state_dict"]
        elif weights is not None:
            found = resolve_weights(weights)
            state_dict = _state_dict_from(safe_load(found), found)
            check_finite_weights(state_dict, found)
        else:
            state_dict = None
        if feature_layers is not None and kind != "module":
            raise ValueError(f"feature_layers is for a module black box; {spec} has its own feature levels")

        self.net = model if in_memory else create_network(f"{kind}:{name}", num_classes, model_kwargs)
        if state_dict is not None:
            missing, unexpected = self.net.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise ValueError(f"weights for {spec} do not fit: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")
        self.net.eval()
        self.spec = f"{kind}:{name}"
        self.model_kwargs = model_kwargs
        self._feature_layers = feature_layers or []
        if kind == "module":
            num_classes = self._probe_module(int(input_size), num_classes)
        else:
            self._describe_levels(kind, name)
        self.num_classes = int(self.net.num_classes if kind == "timm" else num_classes or 1000)
        default_levels = len(self._all_levels[0]) if kind == "module" else 4
        self._select_levels(default_levels if feature_levels is None else int(feature_levels))
        mean = tuple(mean or self._default_norm[0])
        std = tuple(std or self._default_norm[1])
        check_normalisation(mean, std, f"black box {spec}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        self.precision = precision
        self.channels_last = channels_last
        self.compile_mode = compile
        self._fast_depth = 0
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # not a submodule attribute (it would register the same weights twice in the state dict)
        self.__dict__["_compiled"] = (torch.compile(self.net, mode=compile, dynamic=False)
                                      if compile is not None else None)

    @classmethod
    def from_module(cls, module: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    num_classes: int | None = None, feature_layers: Sequence[str] | None = None,
                    input_size: int = 224, **kwargs) -> "BlackBox":
        """Your own classifier as a black box: ``module`` maps normalised images (B,3,H,W) to logits (B,K).

        ``mean``/``std`` are the normalisation it expects on top of [0,1] pixels (default: none); ``feature_layers``
        names the layers (``dict(module.named_modules())`` keys, shallow to deep) whose outputs are the feature
        levels that Grad-CAM, IASSA's attention, FInv and the mask predictors read; without them those methods
        refuse the black box and say why. The class count is read from the output of one probe pass at
        ``input_size`` when not given. The module is frozen and put in eval mode (in place); ``kwargs`` are the
        other :class:`BlackBox` options (``precision``, ``channels_last``, ``compile``)."""
        return cls(module, num_classes=num_classes, mean=mean, std=std, feature_layers=feature_layers,
                   input_size=input_size, **kwargs)

    def _probe_module(self, input_size: int, num_classes: int | None) -> int:
        """One pass of zeros through a module black box: the class count, and each feature layer's channels and
        stride (input side / output side)."""
        named = dict(self.net.named_modules())
        unknown = [layer for layer in self._feature_layers if layer not in named]
        if unknown:
            raise ValueError(f"black box {self.spec}: feature_layers {unknown} are not modules of the network; "
                             f"its top-level modules: {[n for n, _ in self.net.named_children()]}")
        probe = torch.zeros(1, 3, input_size, input_size)
        with torch.no_grad():
            features, logits = self._hooked_pass(probe)
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
            raise ValueError(f"black box {self.spec}: the module must return logits (B, K), returned "
                             f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
        if num_classes is not None and int(num_classes) != logits.shape[1]:
            raise ValueError(f"black box {self.spec}: num_classes {num_classes}, but the module returns "
                             f"{logits.shape[1]} logits")
        for layer, feature in zip(self._feature_layers, features):
            if not (isinstance(feature, torch.Tensor) and feature.dim() == 4):
                raise ValueError(f"black box {self.spec}: feature layer {layer!r} outputs "
                                 f"{type(feature).__name__} {tuple(getattr(feature, 'shape', ()))}, not a (B,C,H,W) map")
        self._all_levels = (list(range(len(features))), [int(f.shape[1]) for f in features],
                            [max(1, round(input_size / f.shape[-1])) for f in features], list(self._feature_layers))
        self._default_norm = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self._backend = "module"
        return int(logits.shape[1])

    def _hooked_pass(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``net(x)`` with forward hooks on the feature layers (registered for this pass only)."""
        outputs: dict[str, torch.Tensor] = {}
        handles = [self.net.get_submodule(layer).register_forward_hook(
            lambda _module, _inputs, output, layer=layer: outputs.__setitem__(layer, output))
            for layer in self._feature_layers]
        try:
            logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        return [outputs[layer] for layer in self._feature_layers], logits

    # -- construction -------------------------------------------------------------------------------
    def _describe_levels(self, kind: str, name: str) -> None:
        """Record every feature level (index, channels, stride), the default normalisation and the backend."""
        if kind == "timm":
            info = self.net.feature_info
            self._all_levels = ([i for i in range(len(info))], [f["num_chs"] for f in info],
                                [f["reduction"] for f in info], [f["module"] for f in info])
            cfg = getattr(self.net, "pretrained_cfg", {}) or {}
            self._default_norm = (cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            nodes, channels, strides = TORCHVISION_FEATURE_NODES[name]
            self._extractor = create_feature_extractor(
                self.net.eval(), return_nodes={**{n: n for n in nodes}, TORCHVISION_LOGITS_NODE[name]: "logits"})
            self._node_names = nodes
            self._all_levels = (list(range(len(nodes))), list(channels), list(strides), list(nodes))
            self._default_norm = (IMAGENET_MEAN, IMAGENET_STD)
        self._backend = kind

    def _select_levels(self, count: int) -> None:
        indices, channels, strides, modules = self._all_levels
        if count > len(indices):
            raise ValueError(f"{self.__class__.__name__} has {len(indices)} feature levels, asked for {count}")
        self.feature_indices = indices[-count:]
        self.feature_channels = channels[-count:]
        self.feature_strides = strides[-count:]
        self.feature_modules = modules[-count:]

    # -- state --------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "BlackBox":
        """Always stays in eval mode (frozen batch norms and dropout)."""
        return super().train(False)

    def config(self) -> dict:
        """``{"class_path": "saliency_lab.core.blackbox.BlackBox", "init_args": {...}}``: the constructor arguments as given,
        plain data (the form of the YAML configs), from which :meth:`from_config` rebuilds this black box.
        LightningModules record it in their checkpoints instead of the (frozen, never trained) weights."""
        config = {"class_path": CLASS_PATH, "init_args": dict(self._init_args)}
        if self._in_memory:  # its weights are in no file: from_config refuses it instead of building random weights
            config["in_memory"] = True
        return config

    @classmethod
    def from_config(cls, config: Mapping) -> "BlackBox":
        """A black box from :meth:`config` (or from its bare ``init_args``)."""
        config = dict(config)
        if config.pop("in_memory", False):
            raise ValueError(f"the black box {config.get('init_args', {}).get('model')} was built from a module object "
                             "in memory, and its weights are in no file: pass that black box itself (e.g. "
                             "explainers.build(name, blackbox, checkpoint=PATH)), or give it as 'module:CLASS' with "
                             "weights=PATH")
        class_path = current_class_path(config.pop("class_path", CLASS_PATH))
        if class_path not in (CLASS_PATH, cls.__name__):
            raise ValueError(f"not a black-box config: class_path {class_path!r}, expected {CLASS_PATH!r}")
        return cls(**config.get("init_args", config))

    def export_record(self) -> dict:
        """A ``weights_only``-loadable record that ``BlackBox('ckpt:PATH')`` rebuilds this model from."""
        return blackbox_record(self.spec, self.net, self.num_classes, self.model_kwargs,
                               self.mean.flatten().tolist(), self.std.flatten().tolist())

    def content_hash(self) -> str:
        """Hex SHA-256 of what decides this black box's outputs: the architecture (spec, ``model_kwargs``,
        classes, selected feature levels), the normalisation and every weight and buffer of ``net`` (name,
        dtype, shape, bytes). Not the file path: a classifier retrained into the same path hashes differently,
        and a copy of the same weights elsewhere hashes the same. Evaluation rows are keyed by it."""
        digest = hashlib.sha256()
        described = {"spec": self.spec, "model_kwargs": self.model_kwargs, "num_classes": self.num_classes,
                     "feature_modules": list(self.feature_modules), "mean": self.mean.flatten().tolist(),
                     "std": self.std.flatten().tolist()}
        digest.update(json.dumps(described, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.net.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy())
        return digest.hexdigest()

    # -- pass settings ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def fast(self, enabled: bool = True) -> Iterator["BlackBox"]:
        """Within the block, ``precision="auto"`` means bf16 (where the device computes it natively). Entered
        by the explainers and metrics whose faithfulness to float32 was measured (``fast_passes``); nests."""
        self._fast_depth += int(enabled)
        try:
            yield self
        finally:
            self._fast_depth -= int(enabled)

    def pass_dtype(self, device: torch.device | str) -> torch.dtype:
        """The autocast dtype a pass on ``device`` uses now: bfloat16 or float32 (see ``precision``)."""
        if self.precision == "bf16" or (self.precision == "auto" and self._fast_depth > 0
                                        and native_bf16(torch.device(device))):
            return torch.bfloat16
        return torch.float32

    def _run(self, fn, x: torch.Tensor):
        """fn(normalised x) under the pass settings; floating outputs back in x's dtype."""
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.pass_dtype(x.device)
        if dtype == torch.float32:
            return fn(x)
        with torch.autocast(x.device.type, dtype=dtype):
            out = fn(x)
        return _cast_floats(out, x.dtype)

    # -- computation --------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"BlackBox expects images of shape (B,3,H,W), got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W) in [0,1] -> logits (B,K) (float32 for float32 x, whatever the pass precision)."""
        return self._run(self.net if self._compiled is None else self._compiled, x)

    forward = logits

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W) in [0,1] -> softmax probabilities (B,K)."""
        return self.logits(x).softmax(dim=1)

    def features_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One pass giving the selected feature maps (shallow to deep) and the logits."""
        return self._run(self._features_and_logits, x)

    def _features_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._backend == "module":
            self.require_features()
            features, logits = self._hooked_pass(x)
            selected = set(self.feature_modules)
            return [f for layer, f in zip(self._feature_layers, features) if layer in selected], logits
        if self._backend == "timm":
            final, feats = self.net.forward_intermediates(x, indices=self.feature_indices)
            return list(feats), self.net.forward_head(final)
        out = self._extractor(x)
        return [out[self._node_names[i]] for i in self.feature_indices], out["logits"]

    def require_features(self, method: str | None = None) -> None:
        """Raise a ValueError that says how to give this black box feature levels when it has none (a module black
        box built without ``feature_layers``); ``method`` names who needs them."""
        if not self.feature_channels:
            who = f"{method} needs" if method else "this needs"
            raise ValueError(f"{who} the black box's feature levels, and black box {self.spec} has none: build it "
                             "with feature_layers=[names of layers, shallow to deep] (BlackBox.from_module), e.g. "
                             f"from its modules {[n for n, _ in self.net.named_children()][:8]}")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B,3,H,W) in [0,1] -> list of (B,C_l,H_l,W_l) feature maps, shallow to deep."""
        if self._backend == "timm":
            return self._run(lambda x_n: list(self.net.forward_intermediates(
                x_n, indices=self.feature_indices, intermediates_only=True)), x)
        return self.features_and_logits(x)[0]

    def extra_repr(self) -> str:
        return (f"{self.spec}, num_classes={self.num_classes}, feature_channels={self.feature_channels}, "
                f"feature_strides={self.feature_strides}, precision={self.precision}, "
                f"channels_last={self.channels_last}, compile={self.compile_mode}")


def require_feature_levels(model, method: str) -> None:
    """Raise, naming ``method`` and the fix, when ``model`` has no feature levels: a :class:`BlackBox` built from a
    module without ``feature_layers`` (ValueError), or a plain callable without ``features`` (TypeError)."""
    check = getattr(model, "require_features", None)
    if callable(check):
        check(method)
    elif not hasattr(model, "features"):
        raise TypeError(f"{method} needs the black box's feature levels: pass a BlackBox (with feature_layers for "
                        "your own module) instead of a plain callable")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (where bf16 autocast is a speed-up, not an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def fast_passes(model, enabled: bool = True):
    """``model.fast(enabled)`` for a :class:`BlackBox` (any object with ``fast``), a no-op block for any other
    callable: how explainers and metrics opt in to ``precision="auto"``."""
    fast = getattr(model, "fast", None)
    return fast(enabled) if callable(fast) else contextlib.nullcontext(model)


def _cast_floats(out, dtype: torch.dtype):
    """``out`` (a tensor, or a list/tuple of them, nested) with every floating tensor cast to ``dtype``."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_cast_floats(o, dtype) for o in out)
    return out


def probability_gap(blackbox: "BlackBox", reference: "BlackBox", images: torch.Tensor,
                    max_forward_batch: int = 256) -> torch.Tensor:
    """Per-image faithfulness of a fast black box: max_k |p_k(x) - p_k^ref(x)| (B,) for images (B,3,H,W) in
    [0,1], both black boxes inside :meth:`BlackBox.fast` (so ``precision="auto"`` counts as bf16 where native).
    ``reference`` is the float32 black box (same weights, ``precision="32"``, no compile)."""
    gaps = []
    with torch.no_grad(), blackbox.fast(), reference.fast():
        for chunk in images.split(max_forward_batch):
            gaps.append((blackbox.probs(chunk) - reference.probs(chunk)).abs().amax(dim=1))
    return torch.cat(gaps)


def export_blackbox(checkpoint: str | os.PathLike, out: str | os.PathLike, half: bool = False) -> dict:
    """Write the black-box record of a classifier checkpoint to ``out`` (no optimizer state, no Lightning).

    ``half`` stores the weights as float16 (half the size; they are cast back to float32 on load), which is
    how the embedded black box committed under ``assets/`` stays below the 5 MB a committed asset may weigh (docs/embedded.md).
    """
    record = dict(read_blackbox_record(checkpoint))
    if half:
        record["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, out)
    return record
