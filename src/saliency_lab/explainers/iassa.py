"""IASSA: Iterative and Adaptive Sampling with Spatial Attention (Vasu & Long, WACV 2020; docs/methods.md §3).

Iteration 0 occludes the image with a deterministic grid of sliding windows (mask M_i = 1 except a W x W
window set to the substrate) and estimates the saliency of class c by the paper's Eq. 5

    S(u) = sum_i p_c(phi(I, M_i, A)) * M_i(u) / sum_i M_i(u),

i.e. the mean class probability over the masks that *keep* pixel u (the per-pixel normaliser is E[M]·N).
LRPF-SA, the long-range parameter-free spatial attention (Eqs. 9-10), then moves saliency towards pixels
with correlated features: Phi' (N x C) = the black box's multi-level features resized to one grid (the
largest level, at most 56 x 56 at 224), L2-normalised per position and level, concatenated;
A = row-softmax(Phi' Phi'^T / tau); S' = beta * S + (1 - beta) * up(A x down(S)). The high-activation
region HAR = {S' > min + T (max - min)} picks the next iteration's windows - smaller windows, finer
stride, only those whose occluded area intersects HAR - and their Monte-Carlo sums are added to the
previous ones, so every iteration refines one running estimate. It stops after ``iterations`` rounds or
when ||S_k - S_{k-1}|| / ||S_{k-1}|| < tol, and returns the last iterate. Nothing here sees a ground truth.

Where we differ from the authors' released code (IASSA-Saliency), and why:
  - its attention applies softmax twice, over columns then rows; the row-softmax of column-softmaxed
    entries (each about 1/N) is almost uniform, so A x S is almost exactly mean(S) and the attention adds a
    constant: S' then ranks pixels exactly as S does. We use one row-softmax; ``attention="double"``
    reproduces theirs (applied as A x S, where their code multiplies S^T A).
  - it keeps, over its iterations, the map with the best IoU against the ground truth (an oracle); we
    return the last iterate.
  - it estimates each iteration's map from that iteration's masks only and divides by N, not by the
    per-pixel coverage of Eq. 5; we use Eq. 5 and accumulate across iterations (the paper's intent).
  - its features are raw, resized to 112 x 112 with nearest neighbour; ours are normalised per position
    (the paper's Eq. 9) on a grid capped at 56 x 56 at 224.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.blackbox import require_feature_levels
from saliency_lab.core.perturbation import make_substrate, perturb, scaled_blur
from saliency_lab.explainers.base import Explainer, rebatch
from saliency_lab.explainers.registry import register

REFERENCE_SIZE = 224  # the image side at which window, stride, their decays and the grid cap are given
ATTENTION_MODES = ("row", "double", "none")
OUTPUTS = ("adjusted", "estimate")
IASSA_SUBSTRATES = ("mean", "zero", "blur")
_FLOAT_BYTES = 4


# -- sampling windows -----------------------------------------------------------------------------------
def window_schedule(size: int, iteration: int, window: float = 45.0, stride: float = 8.0,
                    window_decay: float = 1.5, stride_decay: float = 0.2,
                    reference_size: int = REFERENCE_SIZE) -> tuple[float, float]:
    """(window, stride) in pixels at ``iteration`` for an image side ``size``.

    At ``reference_size`` the window is ``window - window_decay * iteration`` and the stride
    ``stride - stride_decay * iteration`` (45 - 1.5 k and 8 - 0.2 k at 224: the paper's schedule); both
    scale by size / reference_size, so the windows cover the same fraction of the image at any size
    (12.9 / 2.29 px at 64).
    """
    scale = size / reference_size
    return (window - window_decay * iteration) * scale, (stride - stride_decay * iteration) * scale


def axis_windows(length: int, window: float, stride: float) -> list[tuple[int, int]]:
    """[start, end) intervals of the sliding window along one axis of ``length`` pixels, clipped to it.

    The window is round(window) >= 1 px; starts are round(s) - w + round(k * s) for k = 0, 1, ... while
    inside the axis (s = max(stride, 1)): the first window overlaps the axis by about one stride, as in the
    released code (np.arange(stride - window, size, stride)), so border pixels are occluded as often as any.
    Intervals that clipping makes identical are kept once.
    """
    width = max(1, int(math.floor(window + 0.5)))
    step = max(1.0, float(stride))
    first = int(math.floor(step + 0.5)) - width
    intervals: list[tuple[int, int]] = []
    k = 0
    while (start := first + int(math.floor(k * step + 0.5))) < length:
        interval = (max(start, 0), min(start + width, length))
        if interval[1] > interval[0] and (not intervals or intervals[-1] != interval):
            intervals.append(interval)
        k += 1
    return intervals


def sliding_windows(height: int, width: int, window: float, stride: float,
                    device: torch.device | str = "cpu") -> Tensor:
    """Every window position on an H x W image as boxes (n, 4) long [y1, y2, x1, x2] (ends exclusive),
    clipped at the border, in row-major order of their positions."""
    rows = torch.tensor(axis_windows(height, window, stride), dtype=torch.long, device=device)
    cols = torch.tensor(axis_windows(width, window, stride), dtype=torch.long, device=device)
    return torch.cat([rows.repeat_interleave(len(cols), 0), cols.repeat(len(rows), 1)], dim=1)


def window_masks(boxes: Tensor, height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Occlusion masks (n, 1, H, W): 0 inside box i (``boxes`` (n, 4) [y1, y2, x1, x2]), 1 elsewhere."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= boxes[:, 0, None]) & (rows < boxes[:, 1, None])  # (n, H)
    in_cols = (cols >= boxes[:, 2, None]) & (cols < boxes[:, 3, None])  # (n, W)
    return (~(in_rows[:, :, None] & in_cols[:, None, :])).to(dtype).unsqueeze(1)


def windows_hitting(region: Tensor, boxes: Tensor) -> Tensor:
    """(n,) bool: does box i (``boxes`` (n, 4) [y1, y2, x1, x2]) contain a pixel of ``region`` (H, W) bool?

    A summed-area table answers every box in O(1), so no (n, H, W) tensor is built.
    """
    table = F.pad(region.to(torch.int64).cumsum(0).cumsum(1), (1, 0, 1, 0))  # (H + 1, W + 1)
    y1, y2, x1, x2 = boxes.unbind(1)
    return (table[y2, x2] - table[y1, x2] - table[y2, x1] + table[y1, x1]) > 0


def high_activation_region(adjusted: Tensor, threshold: float) -> Tensor:
    """HAR (B, H, W) bool = S' > min + T (max - min), per image.

    A map whose range is at rounding level (max - min <= 1e-6 max(|max|, |min|)) carries no information
    about where to look: its HAR is the whole image, instead of whichever pixels float noise put on top.
    """
    flat = adjusted.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    cut = (low + threshold * (high - low)).view(-1, 1, 1)
    region = adjusted[:, 0] > cut
    flat_map = (high - low) <= 1e-6 * torch.maximum(high.abs(), low.abs())
    if flat_map.any():
        region[flat_map] = True
    return region


# -- LRPF-SA attention ----------------------------------------------------------------------------------
def attention_grid(shapes: Sequence[tuple[int, int]], image_size: tuple[int, int], grid_cap: int = 56,
                   reference_size: int = REFERENCE_SIZE) -> tuple[int, int]:
    """The attention grid (h, w): the largest feature level's size, at most grid_cap * side / reference
    per axis (56 x 56 at 224, 16 x 16 at 64)."""
    height, width = max(shapes, key=lambda s: s[0] * s[1])
    caps = [max(1, int(math.floor(grid_cap * side / reference_size + 0.5))) for side in image_size]
    return min(height, caps[0]), min(width, caps[1])


def compact_level(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C', h, w) with C' = min(C, h*w) and the same position-by-position dot products.

    A level with more channels than positions (ResNet-50 at 224: 2048 channels on 7 x 7) has rank <= h*w;
    QR of its (C x hw) matrix F = QR gives F^T F = R^T R, so the columns of R (hw values each) are exact
    stand-ins for the feature vectors. Resizing is linear and per channel, so dot products, norms and hence
    the attention stay exact after resizing too, while Phi' shrinks 3.8x for ResNet-50 (3840 -> 1013
    columns).
    """
    batch, channels, height, width = features.shape
    positions = height * width
    if channels <= positions:
        return features
    r = torch.linalg.qr(features.reshape(batch, channels, positions).double(), mode="r").R  # (B, hw, hw)
    return r.reshape(batch, positions, height, width).to(features.dtype)


def lrpf_features(maps: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
    """Phi' (B, N = h*w, C): every level resized to ``grid`` (bilinear up, area average down), L2-normalised
    over channels at each position, concatenated along channels. float32.

    Written level by level into one preallocated tensor, so the peak is Phi' plus one resized level.
    """
    levels = [compact_level(level.float()) for level in maps]
    batch = levels[0].shape[0]
    phi = levels[0].new_empty(batch, grid[0] * grid[1], sum(level.shape[1] for level in levels))
    offset = 0
    for level in levels:
        if tuple(level.shape[-2:]) != tuple(grid):
            if level.shape[-2] >= grid[0] and level.shape[-1] >= grid[1]:
                level = F.adaptive_avg_pool2d(level, grid)
            else:
                level = F.interpolate(level, size=grid, mode="bilinear", align_corners=False)
        level = level.flatten(2).transpose(1, 2)  # (B, N, C_l), a view
        channels = level.shape[2]
        target = phi[:, :, offset:offset + channels]
        target.copy_(level)
        target.div_(torch.linalg.vector_norm(target, dim=2, keepdim=True).clamp_min_(1e-12))
        offset += channels
        del level
    return phi


def attention_chunk_rows(batch: int, positions: int, memory_bytes: int) -> int:
    """Rows of the affinity computed at once so that two (B, rows, N) float32 temporaries fit the budget."""
    return max(1, min(positions, memory_bytes // (2 * _FLOAT_BYTES * batch * positions)))


def attention_rows(phi: Tensor, mode: str = "row", temperature: float = 1.0,
                   rows: int | None = None) -> Iterator[tuple[slice, Tensor]]:
    """Yield (row slice R, A[:, R] (B, |R|, N)) of the attention matrix, ``rows`` rows at a time.

    mode "row": A = softmax over j of Phi' Phi'^T / tau - rows are independent, so row chunks are exact.
    mode "double" (the released code): softmax over i (columns) first, then over j (rows). The column
    softmax needs every row of a column, so a first chunked pass accumulates each column's logsumexp.
    Peak memory: about two (B, rows, N) float32 tensors; never B x N x N unless rows = N.
    """
    batch, positions, _ = phi.shape
    rows = positions if rows is None else max(1, int(rows))
    phi_t = phi.transpose(1, 2)
    chunks = [slice(start, min(start + rows, positions)) for start in range(0, positions, rows)]
    if mode == "double":
        column_lse = phi.new_full((batch, positions), -math.inf)
        for part in chunks:
            logits = torch.bmm(phi[:, part], phi_t).div_(temperature)
            column_lse = torch.logaddexp(column_lse, logits.logsumexp(dim=1))
            del logits
    for part in chunks:
        logits = torch.bmm(phi[:, part], phi_t).div_(temperature)
        if mode == "row":
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        elif mode == "double":
            # column softmax, then exp for the row softmax: the entries lie in [0, 1], so no max shift needed
            logits.sub_(column_lse[:, None, :]).exp_().exp_()
        else:
            raise ValueError(f"attention mode must be 'row' or 'double', got {mode!r}")
        yield part, logits.div_(logits.sum(dim=-1, keepdim=True))


def attention_matrix(phi: Tensor, mode: str = "row", temperature: float = 1.0, rows: int | None = None) -> Tensor:
    """The full attention A (B, N, N) (for small grids, where it is cached for every iteration)."""
    out = phi.new_empty(phi.shape[0], phi.shape[1], phi.shape[1])
    for part, block in attention_rows(phi, mode, temperature, rows):
        out[:, part] = block
    return out


def attend(phi: Tensor, values: Tensor, mode: str = "row", temperature: float = 1.0,
           rows: int | None = None) -> Tensor:
    """A x S: ``values`` (B, N) -> (B, N), with A computed ``rows`` rows at a time and never stored."""
    out = values.new_empty(values.shape)
    for part, block in attention_rows(phi, mode, temperature, rows):
        out[:, part] = torch.bmm(block, values[:, :, None].to(block.dtype)).squeeze(-1).to(out.dtype)
    return out


def adjust_map(saliency: Tensor, grid: tuple[int, int], attention: Callable[[Tensor], Tensor] | None,
               beta: float = 0.5) -> Tensor:
    """S' = beta S + (1 - beta) up(A x down(S)) for S (B, 1, H, W); ``attention`` maps (B, N) -> (B, N).

    down = area average to ``grid``, up = bilinear back to H x W. ``attention=None``: S' = S.
    """
    if attention is None:
        return saliency
    small = F.adaptive_avg_pool2d(saliency.float(), grid)
    attended = attention(small.flatten(1)).view_as(small)
    up = F.interpolate(attended, size=saliency.shape[-2:], mode="bilinear", align_corners=False)
    return beta * saliency + (1 - beta) * up.to(saliency.dtype)


# -- the explainer --------------------------------------------------------------------------------------
@register("iassa")
class IASSA(Explainer):
    """IASSA (module docstring): sliding-window occlusion refined by attention-guided adaptive sampling.

    Args:
        iterations: sampling rounds k, including the initial one (default 5, the released code's; the
            paper's 25 fits the default schedule: round 25 uses 9 px windows with a 3.2 px stride at 224).
        tol: stop an image early when ||S_k - S_{k-1}||_2 / ||S_{k-1}||_2 < tol. Default 0 (off: exactly
            ``iterations`` rounds, as the released code). S is a mean class probability, so its norm is
            dominated by its level, not its shape: on the embedded black box the relative change per round
            is 1e-6..1e-4 while the maps still move; a useful tol is ~1e-5 there.
        window, stride: the initial window side and stride in pixels at ``reference_size`` (45 / 8 at 224),
            scaled to the image by side / reference_size (min side); window >= 1 px, stride >= 1 px.
        window_decay, stride_decay: per-iteration shrinkage at ``reference_size`` (1.5 / 0.2 px),
            scaled likewise. window - (iterations - 1) * window_decay must stay > 0, as must the stride.
        reference_size: the image side the pixel values above are given at (224).
        threshold: T of HAR = S' > min + T (max - min) (0.3).
        beta: weight of S in S' = beta S + (1 - beta) A x S (0.5).
        attention: "row" (one row-softmax, default), "double" (the released code's column-then-row
            softmax, which makes A x S ~ constant) or "none" (S' = S, plain iterative occlusion).
        temperature: tau of the affinity Phi' Phi'^T / tau (1).
        grid_cap: the largest attention grid side at ``reference_size`` (56 at 224 -> 16 at 64).
        feature_extractor: None (the black box's own ``features()``, one counted forward per image) or any
            callable images (B, 3, H, W) in [0, 1] -> list of (B, C_l, H_l, W_l) maps (not counted).
        substrate: what an occluded window shows: "mean" (``mean_colour``, default), "zero" or "blur".
        mean_colour: per-channel colour in [0, 1] of "mean" (default ImageNet's mean).
        blur_kernel, blur_sigma: the "blur" substrate at 224 px, scaled to the image.
        output: "adjusted" (default: S' of the last iteration, the map the method refines and thresholds)
            or "estimate" (the last Monte-Carlo estimate S of Eq. 5).
        attention_memory_mb: memory budget of the attention step's temporaries. The full A (B x N x N) is
            cached for all iterations when it fits; otherwise A x S is computed row chunk by row chunk each
            iteration (exact: the softmax is per row), with two (B, rows, N) temporaries.
        seed, max_forward_batch: see :class:`saliency_lab.explainers.base.Explainer` (IASSA is deterministic: the seed
            is unused).

    Cost: forwards per image = 1 (feature pass; 0 with attention "none" or a separate extractor) + the
    number of windows of every round (1089 in round 0 at the default geometry, at any image size); no
    backward. After a call, ``trace`` holds per image the rounds run, windows per round and relative
    changes. Output (B, 1, H, W): probabilities in [0, 1] (with "adjusted", mixed with their attention
    average). All masks of all images go through the black box together, max_forward_batch at a time.
    """

    # bf16 passes on a precision="auto" black box: maps faithful to fp32 (explainers/faithfulness.py)
    fast_passes = True

    def __init__(self, blackbox, *, iterations: int = 5, tol: float = 0.0, window: float = 45.0,
                 stride: float = 8.0, window_decay: float = 1.5, stride_decay: float = 0.2,
                 reference_size: int = REFERENCE_SIZE, threshold: float = 0.3, beta: float = 0.5,
                 attention: str = "row", temperature: float = 1.0, grid_cap: int = 56,
                 feature_extractor: Callable[[Tensor], Sequence[Tensor]] | None = None,
                 substrate: str = "mean", mean_colour: tuple[float, float, float] | None = None,
                 blur_kernel: int = 11, blur_sigma: float = 5.0, output: str = "adjusted",
                 attention_memory_mb: float = 64.0, **common):
        super().__init__(blackbox, **common)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        last = iterations - 1
        if window - window_decay * last <= 0 or stride - stride_decay * last <= 0 or window <= 0 or stride <= 0:
            raise ValueError(f"window {window} - {last} * {window_decay} and stride {stride} - {last} * "
                             f"{stride_decay} must stay > 0 over {iterations} iterations")
        if reference_size < 1 or grid_cap < 1:
            raise ValueError(f"reference_size and grid_cap must be >= 1, got {reference_size}, {grid_cap}")
        if not 0 <= threshold < 1 or not 0 <= beta <= 1:
            raise ValueError(f"threshold must be in [0, 1) and beta in [0, 1], got {threshold}, {beta}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if temperature <= 0 or attention_memory_mb <= 0:
            raise ValueError(f"temperature and attention_memory_mb must be > 0, got {temperature}, "
                             f"{attention_memory_mb}")
        if feature_extractor is not None and not callable(feature_extractor):
            raise TypeError(f"feature_extractor must be callable or None, got {type(feature_extractor).__name__}")
        if attention != "none" and feature_extractor is None:
            require_feature_levels(blackbox, "IASSA's attention (or attention='none', or a feature_extractor)")
        if substrate not in IASSA_SUBSTRATES:
            raise ValueError(f"substrate must be one of {IASSA_SUBSTRATES}, got {substrate!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.iterations = int(iterations)
        self.tol = float(tol)
        self.window = float(window)
        self.stride = float(stride)
        self.window_decay = float(window_decay)
        self.stride_decay = float(stride_decay)
        self.reference_size = int(reference_size)
        self.threshold = float(threshold)
        self.beta = float(beta)
        self.attention = attention
        self.temperature = float(temperature)
        self.grid_cap = int(grid_cap)
        self.feature_extractor = feature_extractor
        self.substrate = substrate
        self.mean_colour = mean_colour
        self.blur_kernel = int(blur_kernel)
        self.blur_sigma = float(blur_sigma)
        self.output = output
        self.attention_memory_mb = float(attention_memory_mb)
        self.trace: dict = {}
        self.snapshots: tuple[int, ...] = ()  # set only inside explain_with_snapshots
        self.snapshot_maps: dict[int, Tensor] = {}
        self.snapshot_cost: dict[int, dict[str, float]] = {}

    def explain_with_snapshots(self, images: Tensor, targets: Tensor, snapshots: Sequence[int],
                               indices: Tensor | None = None) -> tuple[dict[int, Tensor], dict[int, dict[str, float]]]:
        """The maps after k rounds for every k in ``snapshots`` (each in [1, ``iterations``]), from one call.

        Returns ({k: saliency (B, 1, H, W)}, {k: cost}). ``saliency[k]`` equals, bit for bit, what this explainer
        returns with ``iterations=k`` (round k's windows and Monte-Carlo sums depend only on the rounds before
        it, never on the total count, and early stopping by ``tol`` stops both alike); ``saliency[iterations]``
        is the ordinary output. ``cost[k]`` is what that k-round call costs: ``forwards`` and ``backwards`` of
        the batch (as ``cost``), and ``seconds`` / ``cpu_seconds``, the batch's wall and process time from the
        start of the explanation to the end of round k. So one run with ``iterations=25`` and snapshots
        (1, 2, 3, 5, 10, 15, 25) is a performance-vs-iterations study for the price of its longest point.
        The hyper-parameters, hence evaluate.py's keys of this explainer, are unchanged.
        """
        wanted = tuple(sorted({int(k) for k in snapshots}))
        if not wanted or any(not 1 <= k <= self.iterations for k in wanted):
            raise ValueError(f"snapshots must lie in [1, iterations = {self.iterations}], got {list(snapshots)}")
        self.snapshots, self.snapshot_maps, self.snapshot_cost = wanted, {}, {}
        try:
            self(images, targets, indices)
        finally:
            self.snapshots = ()
        maps = {k: m.detach().to(device=images.device, dtype=images.dtype) for k, m in self.snapshot_maps.items()}
        cost = dict(self.snapshot_cost)
        self.snapshot_maps, self.snapshot_cost = {}, {}
        return maps, cost

    # -- the method ---------------------------------------------------------------------------------
    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        batch, _, height, width = images.shape
        substrate = self._substrate(images)
        attention, grid = self._attention(images)
        numerator = images.new_zeros(batch, 1, height, width)
        denominator = images.new_zeros(batch, 1, height, width)
        score_sum, score_count = images.new_zeros(batch), images.new_zeros(batch)
        estimate = adjusted = None
        active = list(range(batch))
        trace = {"iterations": [0] * batch, "masks": [[] for _ in range(batch)], "change": [[] for _ in range(batch)]}
        clock = (time.perf_counter(), time.process_time())
        for step in range(self.iterations):
            boxes = sliding_windows(height, width, *self._geometry(min(height, width), step), device=images.device)
            if step == 0:
                chosen = {b: boxes for b in active}
            else:
                region = high_activation_region(adjusted[active], self.threshold)
                chosen = {b: boxes[windows_hitting(region[k], boxes)] for k, b in enumerate(active)}
            for b in active:
                trace["masks"][b].append(int(chosen[b].shape[0]))
                trace["iterations"][b] = step + 1
            self._sample(images, targets, substrate, chosen, numerator, denominator, score_sum, score_count)
            index = torch.tensor(active, device=images.device)
            fresh = self._estimate(numerator[index], denominator[index], score_sum[index], score_count[index])
            if estimate is None:
                estimate, adjusted = fresh, adjust_map(fresh, grid, self._bind(attention, index), self.beta)
                self._snapshot(step + 1, adjusted, estimate, clock)
                continue
            previous = estimate[index]
            change = ((fresh - previous).flatten(1).norm(dim=1) /
                      previous.flatten(1).norm(dim=1).clamp_min(torch.finfo(previous.dtype).tiny))
            estimate[index] = fresh
            adjusted[index] = adjust_map(fresh, grid, self._bind(attention, index), self.beta)
            for b, value in zip(active, change.tolist()):
                trace["change"][b].append(value)
            active = [b for b, value in zip(active, change.tolist()) if not value < self.tol]
            self._snapshot(step + 1, adjusted, estimate, clock)
            if not active:
                break
        for k in self.snapshots:  # every image stopped early (tol): a call with k rounds stops there too
            if k not in self.snapshot_maps:
                self._snapshot(k, adjusted, estimate, clock, exact_round=False)
        self.trace = trace
        return adjusted if self.output == "adjusted" else estimate

    def _snapshot(self, rounds: int, adjusted: Tensor, estimate: Tensor, clock: tuple[float, float],
                  exact_round: bool = True) -> None:
        """Keep the output after ``rounds`` rounds (a copy) and the cost so far, when ``rounds`` is a snapshot."""
        if rounds not in self.snapshots or (exact_round and rounds in self.snapshot_maps):
            return
        self.snapshot_maps[rounds] = (adjusted if self.output == "adjusted" else estimate).clone()
        self.snapshot_cost[rounds] = {"forwards": self.cost.forwards, "backwards": self.cost.backwards,
                                      "seconds": time.perf_counter() - clock[0],
                                      "cpu_seconds": time.process_time() - clock[1]}

    def _geometry(self, size: int, step: int) -> tuple[float, float]:
        return window_schedule(size, step, self.window, self.stride, self.window_decay, self.stride_decay,
                               self.reference_size)

    def _substrate(self, images: Tensor) -> Tensor:
        kernel, sigma = scaled_blur(self.blur_kernel, self.blur_sigma, min(images.shape[-2:]))
        return make_substrate(self.substrate, images, blur_kernel=kernel, blur_sigma=sigma, mean=self.mean_colour)

    def _sample(self, images, targets, substrate, chosen: dict[int, Tensor], numerator, denominator,
                score_sum, score_count) -> None:
        """Add sum_i p_i M_i and sum_i M_i of every chosen window of every image to the running sums.

        (image, window) pairs of all images are regrouped into forward batches of max_forward_batch; masks
        are rendered per batch, so memory does not grow with the number of windows.
        """
        height, width = images.shape[-2:]
        parts = ((torch.full((len(boxes),), b, dtype=torch.long, device=images.device), boxes)
                 for b, boxes in chosen.items() if len(boxes))
        for owner, boxes in rebatch(parts, self.max_forward_batch):
            masks = window_masks(boxes, height, width, images.dtype)
            scores = self._class_probs(perturb(images[owner], masks, substrate[owner]), targets[owner])
            runs, counts = torch.unique_consecutive(owner, return_counts=True)
            counts = counts.tolist()
            for b, run_scores, run_masks in zip(runs.tolist(), scores.split(counts), masks.split(counts)):
                numerator[b] += torch.tensordot(run_scores, run_masks, dims=1)
                denominator[b] += run_masks.sum(0)
                score_sum[b] += run_scores.sum()
                score_count[b] += run_scores.numel()

    @staticmethod
    def _estimate(numerator, denominator, score_sum, score_count) -> Tensor:
        """Eq. 5, S = num / den; a pixel no mask kept (den = 0) gets the image's mean score."""
        mean = (score_sum / score_count.clamp_min(1)).view(-1, 1, 1, 1).expand_as(numerator)
        return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), mean)

    # -- attention ----------------------------------------------------------------------------------
    def _attention(self, images: Tensor) -> tuple[dict | None, tuple[int, int] | None]:
        """Phi' of every image (once per call: the features do not change across iterations) and, when it
        fits the memory budget, the full attention matrix A, reused by every iteration."""
        if self.attention == "none":
            return None, None
        extractor = self.feature_extractor or self._features  # the black box's own pass is counted
        size = tuple(images.shape[-2:])
        grid, phis = None, []
        for part in self._chunks(images.shape[0]):
            maps = list(extractor(images[part]))
            if grid is None:
                grid = attention_grid([tuple(m.shape[-2:]) for m in maps], size, self.grid_cap, self.reference_size)
            phis.append(lrpf_features(maps, grid))
            del maps
        phi = torch.cat(phis)
        batch, positions = phi.shape[:2]
        budget = int(self.attention_memory_mb * 2**20)
        matrix = None
        if batch * positions * positions * _FLOAT_BYTES <= budget // 2:
            matrix = attention_matrix(phi, self.attention, self.temperature,
                                      attention_chunk_rows(batch, positions, budget))
        return {"phi": phi, "matrix": matrix, "budget": budget}, grid

    def _bind(self, attention: dict | None, index: Tensor) -> Callable[[Tensor], Tensor] | None:
        """A x S restricted to the images ``index`` (the ones still iterating); None without attention."""
        if attention is None:
            return None
        every = index.numel() == attention["phi"].shape[0]
        if attention["matrix"] is not None:
            matrix = attention["matrix"] if every else attention["matrix"][index]
            return lambda values: torch.bmm(matrix, values[:, :, None].to(matrix.dtype)).squeeze(-1)
        phi = attention["phi"] if every else attention["phi"][index]
        rows = attention_chunk_rows(phi.shape[0], phi.shape[1], attention["budget"])
        return lambda values: attend(phi, values, self.attention, self.temperature, rows)
