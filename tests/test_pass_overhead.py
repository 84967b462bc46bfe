"""benchmarks/pass_overhead.py: the recording black box sees every call an explainer or a metric makes (rows,
backward, fast block) and the bare replay times them."""
from __future__ import annotations

import torch

from saliency_lab import explainers
from benchmarks.pass_overhead import RecordingBlackBox, bare_seconds
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import Stopwatch


def test_recording_matches_the_explainers_own_count(tiny_blackbox_path):
    box = BlackBox(f"ckpt:{tiny_blackbox_path}")
    proxy = RecordingBlackBox(box)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 3])
    assert proxy.num_classes == box.num_classes and torch.equal(proxy.std, box.std)  # the wrapped box's

    rise = explainers.build("rise", proxy, n_masks=20, max_forward_batch=16)
    maps = rise(images, targets)
    assert sum(c[1] for c in proxy.calls) == rise.cost.forwards == 40
    assert max(c[1] for c in proxy.calls) <= 16
    assert not any(c[3] for c in proxy.calls)  # no backward
    assert all(c[2] for c in proxy.calls)  # RISE runs its passes in the fast block
    assert torch.allclose(maps, explainers.build("rise", box, n_masks=20, max_forward_batch=16)(images, targets))

    proxy.calls = []
    gradient = explainers.build("gradient", proxy)
    gradient(images, targets)
    assert [c[0] for c in proxy.calls] == ["logits"] and proxy.calls[0][1:] == [2, False, True]
    assert gradient.cost.backwards == 2

    seconds = bare_seconds(box, proxy.calls, images[:1], Stopwatch())
    assert seconds > 0
