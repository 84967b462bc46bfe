"""Causal metrics: deletion / insertion curves and areas, and the M_F faithfulness score.

Definitions are those of docs docs/protocols.md ("Causal curves", "M_F"); every knob lives in
:class:`CausalProtocol` so it can be written next to each reported number.

Notation: I image (B, 3, H, W) in [0, 1], S saliency (B, 1, H, W), c the explained class, p_c(x) the
model's softmax probability of c, U the number of ranking units, n the number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.blackbox import IMAGENET_MEAN, fast_passes
from saliency_lab.core.inputs import check_explained_batch, check_images, check_saliency, check_targets, num_classes_of
from saliency_lab.core.perturbation import gaussian_blur, make_substrate, scaled_blur

Model = Callable[[Tensor], Tensor]
# Whether the curve loop runs its passes in a BlackBox.fast() block (bf16 for precision="auto" black boxes on bf16
# hardware): per-image AUCs within 1e-3 of float32 (benchmarks/fast_blackbox.py, tests/test_fast_blackbox.py)
FAST_PASSES = True
_CURVE_SUBSTRATES = ("mean", "zero", "blur", "noise")
_UPSAMPLE_MODES = ("nearest", "bilinear")
# The rules that choose the explained class (the one list the whole project validates against).
TARGET_RULES = ("predicted", "label")
# M_F's blur (no value given in docs/protocols.md): the strong blur of the igos protocol (kernel 51, sigma 50
# at 224), scaled with the image size like every other blur. M_F divides by q_O - q_F, so the blurred
# image must lose the class: the training blur (variance 10 at 224) leaves small images classifiable
# (measured on the embedded black box: q_F ~ q_O, M_F in the thousands of percent, many images excluded).
MF_BLUR_KERNEL_224 = 51
MF_BLUR_SIGMA_224 = 50.0
# docs/protocols.md, "Normalised causal scores": curves whose end points differ by at most this are excluded.
NORM_EPS = 0.05


@dataclasses.dataclass(frozen=True)
class CausalProtocol:
    """Every knob of the deletion / insertion metrics (docs/protocols.md, "Causal curves").

    Attributes:
        units: "pixel", or an int r: rank the cells of an r x r grid (S average-pooled to r x r).
        steps: n; step k = 0..n removes / reveals the top ceil(k * U / n) units.
        deletion_substrate, insertion_substrate: "mean" | "zero" | "blur" | a tensor (3, H, W) or
            (B, 3, H, W) in [0, 1]. ("random" is not offered: a metric should not be stochastic.)
        blur_kernel, blur_sigma: the gaussian of the "blur" substrate, in pixels (odd kernel).
        upsample: how a grid cell's keep-mask becomes pixels: "nearest" or "bilinear". Ignored for pixels.
        target: the rule that chose the explained class, "predicted" (argmax on the clean image) or
            "label". Recorded with the results; :func:`explained_class` applies it.
        max_forward_batch: the most perturbed images sent through the model at once (memory knob; not
            part of the metric's definition, results do not depend on it).
        mean: the per-channel colour of the "mean" substrate (the dataset's mean colour).
        norm_eps: the normalised scores (:func:`normalised_area`) exclude an image whose curve end points
            differ by at most this (|v_0 - v_n| <= eps).
    The defaults equal :meth:`rise` at 224 x 224.
    """

    units: int | str = "pixel"
    steps: int = 224
    deletion_substrate: str | Tensor = "mean"
    insertion_substrate: str | Tensor = "blur"
    blur_kernel: int = 11
    blur_sigma: float = 5.0
    upsample: str = "nearest"
    target: str = "predicted"
    max_forward_batch: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    norm_eps: float = NORM_EPS

    def __post_init__(self) -> None:
        unit_ok = self.units == "pixel" or (
            isinstance(self.units, int) and not isinstance(self.units, bool) and self.units >= 1
        )
        if not unit_ok:
            raise ValueError(f'units must be "pixel" or a grid size r >= 1, got {self.units!r}')
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        for name in ("deletion_substrate", "insertion_substrate"):
            _check_substrate_spec(name, getattr(self, name))
        if not isinstance(self.blur_kernel, int) or self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd int, got {self.blur_kernel!r}")
        if not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma!r}")
        if self.upsample not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {_UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {self.target!r}")
        if not isinstance(self.max_forward_batch, int) or self.max_forward_batch < 1:
            raise ValueError(f"max_forward_batch must be an int >= 1, got {self.max_forward_batch!r}")
        mean = tuple(float(v) for v in self.mean)
        if len(mean) != 3 or not all(0.0 <= v <= 1.0 for v in mean):
            raise ValueError(f"mean must be 3 values in [0, 1], got {self.mean!r}")
        object.__setattr__(self, "mean", mean)  # frozen: normalise a list / tensor to a tuple
        if not 0 <= self.norm_eps < 1:
            raise ValueError(f"norm_eps must be in [0, 1), got {self.norm_eps!r}")

    @classmethod
    def rise(cls, image_size: int, **overrides: Any) -> CausalProtocol:
        """RISE's protocol: pixel units, n = image_size, deletion -> mean colour, insertion -> blur.

        The blur (kernel 11, sigma 5 at 224) is scaled to ``image_size`` by
        :func:`core.perturbation.scaled_blur` (3 / 1.43 at 64). Any field can be overridden.
        """
        kernel, sigma = scaled_blur(11, 5.0, image_size)
        fields = dict(units="pixel", steps=image_size, deletion_substrate="mean",
                      insertion_substrate="blur", blur_kernel=kernel, blur_sigma=sigma)
        return cls(**{**fields, **overrides})

    @classmethod
    def igos(cls, image_size: int, **overrides: Any) -> CausalProtocol:
        """iGOS++'s protocol: 28 x 28 grid at 224, 50 steps, both substrates blur (kernel 51, sigma 50).

        The grid keeps its 8-pixel cells at other sizes: r = max(2, round(28 * image_size / 224)) (8 at 64);
        the blur is scaled like :meth:`rise`'s (15 / 14.3 at 64). Cells are upsampled bilinearly, as
        iGOS++ upsamples its masks (docs/methods.md §2). Any field can be overridden.
        """
        kernel, sigma = scaled_blur(51, 50.0, image_size)
        grid = max(2, round(28 * image_size / 224))
        fields = dict(units=grid, steps=50, deletion_substrate="blur", insertion_substrate="blur",
                      blur_kernel=kernel, blur_sigma=sigma, upsample="bilinear")
        return cls(**{**fields, **overrides})

    # The held-out perturbation families (docs/heldout.md): scored, never trained or tuned on.
    @classmethod
    def noise(cls, image_size: int, **overrides: Any) -> CausalProtocol:
        """Held out: :meth:`rise`'s pixels and steps with a fixed uniform-noise image (``core.perturbation.fixed_noise``)
        as the deletion and the insertion substrate."""
        return cls.rise(image_size, **{"deletion_substrate": "noise", "insertion_substrate": "noise", **overrides})

    @classmethod
    def blur_wide(cls, image_size: int, **overrides: Any) -> CausalProtocol:
        """Held out: :meth:`rise`'s pixels and steps, both substrates a blur of sigma 12 px at 224 scaled to the image
        (3.43 at 64), kernel the odd size 2 ceil(2 sigma) + 1 (49 at 224, 15 at 64): wider than :meth:`rise`'s,
        narrower than :meth:`igos`'s."""
        sigma = 12.0 * image_size / 224
        kernel = 2 * math.ceil(2 * sigma) + 1
        fields = {"deletion_substrate": "blur", "insertion_substrate": "blur", "blur_kernel": kernel,
                  "blur_sigma": sigma}
        return cls.rise(image_size, **{**fields, **overrides})

    @classmethod
    def grid16(cls, image_size: int, **overrides: Any) -> CausalProtocol:
        """Held out: :meth:`igos`'s blur, steps and bilinear cells on a finer grid, 16 x 16 at 64 px (4-pixel
        cells; 56 x 56 at 224): r = max(2, round(16 * image_size / 64))."""
        return cls.igos(image_size, **{"units": max(2, round(16 * image_size / 64)), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record of every knob; a tensor substrate is recorded as "tensor"."""
        record = dataclasses.asdict(self)
        for name in ("deletion_substrate", "insertion_substrate"):
            if isinstance(record[name], Tensor):
                record[name] = "tensor"
        record["mean"] = list(self.mean)
        return record


PROTOCOL_PRESETS: dict[str, Callable[..., CausalProtocol]] = {
    "rise": CausalProtocol.rise, "igos": CausalProtocol.igos,
    "noise": CausalProtocol.noise, "blur_wide": CausalProtocol.blur_wide, "grid16": CausalProtocol.grid16}
# The presets of the held-out families; the fourth held-out family, ROAD, is a metric of its own (metrics.road).
HELDOUT_PRESETS = ("noise", "blur_wide", "grid16")
ProtocolSpec = Union[CausalProtocol, str, Mapping[str, Any]]


def make_protocol(spec: ProtocolSpec, image_size: int, *, target: str | None = None,
                  max_forward_batch: int | None = None) -> CausalProtocol:
    """The deletion / insertion protocol at ``image_size``: the one factory of every caller.

    ``spec`` is a preset name (:data:`PROTOCOL_PRESETS`: "rise", "igos", scaled to ``image_size``), a dict
    of :class:`CausalProtocol` fields (with an optional ``"preset"`` entry naming the preset they override;
    without it the fields override the class defaults, which are RISE at 224), or a ready
    :class:`CausalProtocol`. ``target`` (the explained-class rule) and ``max_forward_batch``, when given,
    are the caller's and replace the spec's; a dict that names another target is refused.
    """
    given = {k: v for k, v in (("target", target), ("max_forward_batch", max_forward_batch)) if v is not None}
    if isinstance(spec, CausalProtocol):
        return dataclasses.replace(spec, **given)
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"a protocol is a preset name, a dict of CausalProtocol fields or a CausalProtocol, got "
                        f"{type(spec).__name__}")
    fields = dict(spec)
    preset = fields.pop("preset", None)
    if target is not None and fields.get("target", target) != target:
        raise ValueError(f"protocol target {fields['target']!r} contradicts the explained-class rule {target!r}")
    fields.update(given)
    if preset is None:
        return CausalProtocol(**fields)
    if preset not in PROTOCOL_PRESETS:
        raise ValueError(f"unknown protocol preset {preset!r}; known: {sorted(PROTOCOL_PRESETS)}")
    return PROTOCOL_PRESETS[preset](image_size, **fields)


def _check_substrate_spec(name: str, spec: str | Tensor) -> None:
    """Protocol-time check of a substrate; the shape against the images is checked at call time."""
    if isinstance(spec, Tensor):
        if spec.ndim not in (3, 4) or spec.shape[-3] != 3:
            raise ValueError(f"{name} tensor must be (3, H, W) or (B, 3, H, W), got {tuple(spec.shape)}")
        if spec.min() < 0 or spec.max() > 1:
            raise ValueError(f"{name} tensor values must lie in [0, 1]")
    elif spec not in _CURVE_SUBSTRATES:
        raise ValueError(f"{name} must be one of {_CURVE_SUBSTRATES} or a tensor, got {spec!r}")


class CausalResult(NamedTuple):
    """Output of :func:`causal_curves`.

    deletion, insertion: (B,) trapezoid areas in [0, 1] (lower deletion / higher insertion = better).
    deletion_curve, insertion_curve: (B, n + 1) p_c at steps k = 0..n, or None if not requested.
    fractions: (n + 1,) the x axis k / n (the nominal fraction of units changed; the exact fraction at
        step k is ceil(k U / n) / U).
    forwards: model forward passes used, 2 * (n + 1) * B.
    deletion_norm, insertion_norm: (B,) the normalised areas of :func:`normalised_area` (NaN where the
        curve's end points are too close); None when not computed.
    """

    deletion: Tensor
    insertion: Tensor
    deletion_curve: Tensor | None
    insertion_curve: Tensor | None
    fractions: Tensor
    forwards: int
    deletion_norm: Tensor | None = None
    insertion_norm: Tensor | None = None


class FaithfulnessResult(NamedTuple):
    """Output of :func:`faithfulness_mf`, all (B,).

    mf: raw M_F in percent, NaN where not ``valid``; valid: q_O - q_F > eps;
    q_original: p_c(I); q_blurred: p_c(fully blurred I).
    """

    mf: Tensor
    valid: Tensor
    q_original: Tensor
    q_blurred: Tensor


class MinMaxResult(NamedTuple):
    """Output of :func:`minmax_across_methods`: per-method (N,) values in [0, 1] and the excluded count."""

    normalised: dict[str, Tensor]
    excluded: int


# ----------------------------------------------------------------------------------------------------
# Ranking units


def unit_scores(saliency: Tensor, units: str | int) -> Tensor:
    """(B, U) score per ranking unit: the pixels of (B, 1, H, W) saliency, or its r x r average pool."""
    if units == "pixel":
        return saliency.flatten(1)
    if units > min(saliency.shape[-2:]):
        raise ValueError(f"grid size {units} exceeds the saliency map {tuple(saliency.shape[-2:])}")
    return F.adaptive_avg_pool2d(saliency, units).flatten(1)


def rank_units(scores: Tensor, tie_break: Tensor | None = None) -> Tensor:
    """(B, U) int64 rank of each unit, 0 = most salient: sort by ``scores`` descending.

    Ties are broken by ``tie_break`` descending if given, then by the lower flat (row-major) index;
    two stable sorts give exactly this lexicographic order, on the device and for all images at once.
    """
    order = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    if tie_break is not None:
        order = torch.sort(tie_break, dim=1, descending=True, stable=True).indices
    primary = torch.sort(scores.gather(1, order), dim=1, descending=True, stable=True).indices
    order = order.gather(1, primary)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def step_counts(num_units: int, steps: int, device: torch.device | None = None) -> Tensor:
    """(n + 1,) int64 number of units changed at step k = 0..n: ceil(k * U / n), in exact integers."""
    k = torch.arange(steps + 1, device=device, dtype=torch.int64)
    return (k * num_units + steps - 1) // steps


def trapezoid_area(curve: Tensor) -> Tensor:
    """(B,) area under (B, n + 1) curves on [0, 1] by the trapezoid rule: (sum_k v_k - v_0/2 - v_n/2) / n."""
    steps = curve.shape[-1] - 1
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


def normalised_area(curve: Tensor, start_at_zero: bool, eps: float = NORM_EPS) -> Tensor:
    """(B,) area of (B, n + 1) curves rescaled by their own end points (docs/protocols.md, "Normalised causal
    scores"), so a curve's start and end (what the substrates leave of the class) do not count, only how fast
    the ranking moves it from one to the other.

    With A the trapezoid area, v_0 and v_n the end points:
    deletion (``start_at_zero`` False): (A - v_n) / (v_0 - v_n): 0 when the class vanishes at the first step
    (ideal), 1 when it survives until the last (lower is better);
    insertion (``start_at_zero`` True): (A - v_0) / (v_n - v_0): 1 when the class appears at the first step
    (ideal), 0 when only at the last (higher is better).
    NaN where |v_0 - v_n| <= eps: such a curve says nothing about the ranking (count these as excluded).
    """
    area, first, last = trapezoid_area(curve), curve[..., 0], curve[..., -1]
    start, end = (first, last) if start_at_zero else (last, first)
    span = end - start
    valid = span.abs() > eps
    return torch.where(valid, (area - start) / torch.where(valid, span, torch.ones_like(span)), torch.nan)


# ----------------------------------------------------------------------------------------------------
# The one curve loop


def _probability_curves(
    model: Model,
    images: Tensor,
    rank: Tensor,
    unit_shape: tuple[int, int],
    counts: Tensor,
    curves: Sequence[tuple[Tensor, bool]],
    targets: Tensor,
    upsample: str,
    max_forward_batch: int,
) -> Tensor:
    """p_c along several curves: (C, B, n + 1) for C = len(curves).

    Curve j = (substrate (B, 3, H, W), is_deletion). At step k a unit u of image b is "changed" when
    rank[b, u] < counts[k]; deletion keeps the image where it is not changed, insertion where it is.

    The C * B * (n + 1) perturbed images are never materialised together: they are enumerated as
    (curve, image, step) triples, built chunk by chunk straight from the rank tensor and pushed through
    the model ``max_forward_batch`` at a time, so memory is bounded by that knob whatever B and n are.
    """
    num_curves, batch, num_points = len(curves), images.shape[0], counts.numel()
    total = num_curves * batch * num_points
    # Unit u is changed at step k iff rank[u] < counts[k], i.e. iff k >= first_step[u]: one small integer
    # per unit, compared against a range of k, instead of gathering a rank row per perturbed image.
    first_step = torch.searchsorted(counts, rank, right=True).to(torch.int16).view(batch, 1, *unit_shape)
    steps = torch.arange(num_points, device=images.device, dtype=torch.int16).view(-1, 1, 1, 1)
    out = torch.empty(total, device=images.device)
    buffer = images.new_empty((min(max_forward_batch, total), *images.shape[1:]))
    # fast_passes: bf16 where the black box is precision="auto" and the device has it (the metrics' faithfulness
    # to float32 is measured by benchmarks/fast_blackbox.py and tested in tests/test_fast_blackbox.py)
    with torch.no_grad(), fast_passes(model, FAST_PASSES):
        for start in range(0, total, max_forward_batch):
            stop = min(start + max_forward_batch, total)
            # Triples (curve, image, step) with the step varying fastest: a chunk is a few runs of one
            # (curve, image) over consecutive steps, each built with broadcast views, without gathers.
            row = start
            while row < stop:
                curve, b, k0 = row // (batch * num_points), row // num_points % batch, row % num_points
                k1 = min(num_points, k0 + stop - row)
                changed = first_step[b] <= steps[k0:k1]
                keep = (changed if not curves[curve][1] else ~changed).to(images.dtype)
                if keep.shape[-2:] != images.shape[-2:]:
                    keep = F.interpolate(keep, size=images.shape[-2:], mode=upsample,
                                         align_corners=False if upsample == "bilinear" else None)
                # lerp(A, I, M) = A + M (I - A): exact at M in {0, 1} (see core.perturbation.perturb)
                torch.lerp(curves[curve][0][b].expand(k1 - k0, -1, -1, -1), images[b].expand(k1 - k0, -1, -1, -1),
                           keep, out=buffer[row - start:row - start + k1 - k0])
                row += k1 - k0
            x = buffer[:stop - start]
            idx = torch.arange(start, stop, device=images.device) // num_points % batch
            probs = torch.softmax(model(x).float(), dim=-1)  # float: AMP logits may be half
            if start == 0:  # a model that does not declare num_classes: check the targets against its output
                check_targets(targets, batch, probs.shape[-1])
            out[start:stop] = probs.gather(1, targets[idx].unsqueeze(1)).squeeze(1)
    return out.view(num_curves, batch, num_points)


def _check_inputs(model: Model, images: Tensor, saliency: Tensor, targets: Tensor,
                  image_dtype: str | torch.dtype) -> None:
    """The shared input check (``core.inputs``: images, targets against the model's classes, saliency)."""
    batch = check_explained_batch(images, targets, num_classes_of(model), image_dtype=image_dtype)
    check_saliency(saliency, batch)


def _substrate(spec: str | Tensor, images: Tensor, protocol: CausalProtocol) -> Tensor:
    return make_substrate(spec, images, blur_kernel=protocol.blur_kernel, blur_sigma=protocol.blur_sigma,
                          mean=protocol.mean)


def causal_curves(
    model: Model,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    protocol: CausalProtocol,
    return_curves: bool = True,
    *,
    image_dtype: str | torch.dtype = torch.float32,
) -> CausalResult:
    """Deletion and insertion curves and their areas (docs/protocols.md, "Causal curves").

    Units are ranked by saliency descending (ties: lower row-major index first). With U units and n steps,
    step k changes the top ceil(k U / n) units, k = 0..n:
    deletion  x_k = phi(I, keep = not changed, A_del), starting from I;
    insertion x_k = phi(I, keep = changed, A_ins), starting from A_ins;
    curves d_k = p_c(x_k), i_k = p_c(x_k); areas by the trapezoid rule (sum_k v_k - v_0/2 - v_n/2) / n,
    and the normalised areas of :func:`normalised_area` (``deletion_norm``, ``insertion_norm``).
    Grid units: S is average-pooled to r x r (adaptive_avg_pool2d) and each cell's 0/1 keep value is
    upsampled to pixels with ``protocol.upsample``. (For H not divisible by r, the pooling windows and the
    nearest-upsampled cells may differ by a pixel at cell borders; r dividing H avoids it.)

    Args:
        model: maps (N, 3, H, W) images in [0, 1] to (N, K) logits; used as is (put it in eval mode).
        images: (B, 3, H, W) in [0, 1].
        saliency: (B, 1, H, W) for pixel units; any (B, 1, h, w) with h, w >= r for grid units.
        targets: (B,) int64 explained classes, chosen by the caller with the rule ``protocol.target``
            (see :func:`explained_class`), the same classes the explainer explained.
        protocol: the knobs.
        return_curves: keep the (B, n + 1) curves in the result (else None).
        image_dtype: the images' dtype; anything but float32 only on purpose (``core.inputs``).

    Inputs are checked first (``core.inputs``): NaN, out-of-[0, 1] (e.g. 0..255) or non-float32 images,
    targets outside the model's classes and non-finite saliency are refused with a ValueError.
    Runs under ``torch.no_grad`` (works inside Lightning's inference mode) with exactly 2 (n + 1) B
    forwards, in chunks of ``protocol.max_forward_batch`` mixing images and steps.
    """
    _check_inputs(model, images, saliency, targets, image_dtype)
    unit_shape = images.shape[-2:] if protocol.units == "pixel" else (protocol.units,) * 2
    if protocol.units == "pixel" and saliency.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"pixel units need saliency at the image size {tuple(images.shape[-2:])}, "
                         f"got {tuple(saliency.shape[-2:])}")
    rank = rank_units(unit_scores(saliency, protocol.units))
    counts = step_counts(rank.shape[1], protocol.steps, images.device)
    deletion_substrate = _substrate(protocol.deletion_substrate, images, protocol)
    # igos uses one blur for both curves: compute it once (a 51 x 51 kernel is not free).
    spec = protocol.insertion_substrate
    same = isinstance(spec, str) and spec == protocol.deletion_substrate
    insertion_substrate = deletion_substrate if same else _substrate(spec, images, protocol)
    deletion_curve, insertion_curve = _probability_curves(
        model, images, rank, tuple(unit_shape), counts,
        [(deletion_substrate, True), (insertion_substrate, False)],
        targets.long(), protocol.upsample, protocol.max_forward_batch,
    )
    return CausalResult(
        deletion=trapezoid_area(deletion_curve),
        insertion=trapezoid_area(insertion_curve),
        deletion_curve=deletion_curve if return_curves else None,
        insertion_curve=insertion_curve if return_curves else None,
        fractions=torch.arange(protocol.steps + 1, device=images.device) / protocol.steps,
        forwards=2 * counts.numel() * images.shape[0],
        deletion_norm=normalised_area(deletion_curve, start_at_zero=False, eps=protocol.norm_eps),
        insertion_norm=normalised_area(insertion_curve, start_at_zero=True, eps=protocol.norm_eps),
    )


def explained_class(
    model: Model, images: Tensor, labels: Tensor | None = None, rule: str = "predicted",
    max_forward_batch: int = 256, *, image_dtype: str | torch.dtype = torch.float32,
) -> Tensor:
    """(B,) int64 explained class: the model's argmax on the clean images ("predicted") or ``labels``.

    Call it once per batch and pass the result to the explainers and to every metric, so all of them
    explain and score the same class. "predicted" costs B forwards (in chunks, under no_grad). Images and
    labels are checked first (``core.inputs``); labels are class indices in the model's range.
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"rule must be one of {TARGET_RULES}, got {rule!r}")
    batch = check_images(images, image_dtype=image_dtype)
    if rule == "label":
        if labels is None:
            raise ValueError('rule "label" needs labels')
        check_targets(labels, batch, num_classes_of(model), name="labels", device=images.device)
        return labels
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(-1) for chunk in images.split(max_forward_batch)])


# ----------------------------------------------------------------------------------------------------
# M_F


def faithfulness_mf(
    model: Model,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    steps: int = 32,
    blur_kernel: int | None = None,
    blur_sigma: float | None = None,
    eps: float = 1e-3,
    max_forward_batch: int = 256,
    *,
    image_dtype: str | torch.dtype = torch.float32,
) -> FaithfulnessResult:
    """Raw M_F in percent per image (docs/protocols.md, "M_F"; the distribution-guided paper's Eq. 9).

    Preserving curve q_k = p_c(phi(I, M_k, blur(I))), M_k = the top ceil(k U / n) pixels, k = 0..n, n =
    ``steps`` (the insertion curve with the blur substrate, pixel units); q_F = q_0 = p_c(blur(I)),
    q_O = q_n = p_c(I), and with Delta = 1/n

        M_F = sum_{k=1..n} q_k / (q_O - q_F) * Delta * 100.

    Choices (docs/protocols.md writes sum_k without bounds): k runs over 1..n, a right Riemann sum with n
    intervals of width Delta over [0, 1], so a map whose first step already restores q_O scores
    q_O / (q_O - q_F) * 100. Equal saliencies (in practice the zero pixels of sparse maps) are ordered
    by a gaussian-smoothed copy of the map (same blur as the substrate), then row-major: the exact
    lexicographic order, i.e. the limit of "adding the smoothed map with a tiny weight" without a weight
    that could reorder distinct values. Images with q_O - q_F <= eps get M_F = NaN and valid = False;
    count and report them. Costs (n + 1) B forwards.

    Args:
        model, images, targets, max_forward_batch: as in :func:`causal_curves`.
        saliency: (B, 1, H, W) at the image size.
        blur_kernel, blur_sigma: the blur; default kernel 51, sigma 50 at 224 (the igos protocol's, strong
            enough that q_F is near chance), scaled with the image width W by ``scaled_blur``.
        image_dtype: as in :func:`causal_curves` (inputs are checked the same way).
    """
    _check_inputs(model, images, saliency, targets, image_dtype)
    if saliency.shape[-2:] != images.shape[-2:]:
        raise ValueError("faithfulness_mf needs saliency at the image size")
    default_kernel, default_sigma = scaled_blur(MF_BLUR_KERNEL_224, MF_BLUR_SIGMA_224, images.shape[-1])
    kernel = default_kernel if blur_kernel is None else blur_kernel
    sigma = default_sigma if blur_sigma is None else blur_sigma
    smoothed = gaussian_blur(saliency, kernel, sigma)
    rank = rank_units(unit_scores(saliency, "pixel"), tie_break=unit_scores(smoothed, "pixel"))
    counts = step_counts(rank.shape[1], steps, images.device)
    (curve,) = _probability_curves(
        model, images, rank, tuple(images.shape[-2:]), counts,
        [(gaussian_blur(images, kernel, sigma), False)], targets.long(), "nearest", max_forward_batch,
    )
    q_blurred, q_original = curve[:, 0], curve[:, -1]
    gap = q_original - q_blurred
    valid = gap > eps
    mf = curve[:, 1:].sum(1) / steps / gap * 100
    return FaithfulnessResult(torch.where(valid, mf, torch.nan), valid, q_original, q_blurred)


def minmax_across_methods(mf_by_method: Mapping[str, Tensor], eps: float = 1e-6) -> MinMaxResult:
    """Per image, min-max normalise a score over the compared methods (docs/protocols.md, M_F across methods).

    For image i: v'_m,i = (v_m,i - min_m v_m,i) / (max_m v_m,i - min_m v_m,i), in [0, 1].
    Image i is excluded (NaN for every method) when any method's value is NaN (e.g. the q_O - q_F guard)
    or when the methods are indistinguishable, max - min <= eps. Average the non-NaN values over images.

    Args:
        mf_by_method: method name -> (N,) values, the same N images in the same order for every method.
    Returns:
        MinMaxResult(normalised = {name: (N,)}, excluded = number of excluded images).
    """
    if not mf_by_method:
        raise ValueError("need at least one method")
    names = list(mf_by_method)
    values = torch.stack([torch.as_tensor(mf_by_method[name]).float() for name in names])  # (M, N)
    low, high = values.amin(0), values.amax(0)  # NaN propagates through amin / amax
    excluded = ~(high - low > eps)  # also True where NaN
    normalised = torch.where(excluded, torch.nan, (values - low) / (high - low))
    return MinMaxResult(dict(zip(names, normalised)), int(excluded.sum()))
