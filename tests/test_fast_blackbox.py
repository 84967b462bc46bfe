"""Fast black-box options: bf16 autocast, channels-last, the "auto" rule, and faithfulness to float32
on the committed embedded black box (assets/embedded_blackbox.pt) with a handful of embedded test scenes."""
from __future__ import annotations

import pytest
import torch

from saliency_lab import explainers
import saliency_lab.metrics.causal as causal
from saliency_lab.core.blackbox import BlackBox, native_bf16, probability_gap
from saliency_lab.datamodules import ClutteredFashionMNIST
from saliency_lab.explainers.faithfulness import MIN_SPEARMAN, PROBABILITY_TOLERANCE, map_spearman, spearman_per_image
from saliency_lab.metrics import CausalProtocol, causal_curves

EMBEDDED = "assets/embedded_blackbox.pt"
SCENES = 4
# Budgets small enough for a test, large enough that the maps are not noise (at N = 40 RISE maps are mostly
# noise, which a bf16 rounding moves a lot; faithfulness is about the method as used).
FAITHFUL_HPARAMS = {
    "rise": {"n_masks": 500},
    "iassa": {"iterations": 2, "stride": 16.0},  # 4.6 px at 64 (the configs' quick-look stride): ~4x fewer
                                                 # windows than the default 2.3 px, Spearman still >= 0.9996
    "igos_pp": {"iterations": 3, "ig_steps": 5},
    "igos": {"iterations": 3, "ig_steps": 5},
    "gradient": {},
    "integrated_gradients": {"n_steps": 10},
    "smoothgrad": {"n_samples": 5},
}
# Which precision a pass runs in shows at any budget: the routing test needs no faithful-sized one.
ROUTING_HPARAMS = {"rise": {"n_masks": 50}}


@pytest.fixture(scope="module")
def embedded(repo_root):
    path = repo_root / EMBEDDED
    return {"fp32": BlackBox(f"ckpt:{path}", precision="32", channels_last=False),
            "fast": BlackBox(f"ckpt:{path}", precision="bf16", channels_last=True),
            "auto": BlackBox(f"ckpt:{path}", precision="auto", channels_last=True)}


@pytest.fixture(scope="module")
def scenes(embedded):
    dataset = ClutteredFashionMNIST("test", image_size=64, num_scenes=SCENES)
    images = torch.stack([dataset[i]["image"] for i in range(SCENES)])
    with torch.no_grad():
        targets = embedded["fp32"].logits(images).argmax(1)
    return images, targets, torch.arange(SCENES)


def test_defaults_are_the_measured_ones(tiny_blackbox_path):
    box = BlackBox(f"ckpt:{tiny_blackbox_path}")
    assert (box.precision, box.channels_last, box.compile_mode) == ("auto", True, None)
    assert box.pass_dtype("cpu") == torch.float32  # outside a fast() block


def test_options_are_validated_and_recorded(tiny_blackbox_path):
    with pytest.raises(ValueError, match="precision"):
        BlackBox(f"ckpt:{tiny_blackbox_path}", precision="fp16")
    with pytest.raises(ValueError, match="compile"):
        BlackBox(f"ckpt:{tiny_blackbox_path}", compile="fastest")
    with pytest.raises(ValueError, match="channels_last"):
        BlackBox(f"ckpt:{tiny_blackbox_path}", channels_last="yes")
    box = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="auto", channels_last=True)
    again = BlackBox.from_config(box.config())
    assert (again.precision, again.channels_last, again.compile_mode) == ("auto", True, None)


def test_channels_last_gives_the_float32_values_and_gradients(tiny_blackbox_path):
    plain = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="32", channels_last=False)
    last = BlackBox(f"ckpt:{tiny_blackbox_path}", channels_last=True)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(last.logits(x), plain.logits(x), atol=1e-5)
    grads = []
    for box in (plain, last):
        leaf = x.clone().requires_grad_(True)
        box.logits(leaf)[:, 1].sum().backward()
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert [f.shape for f in last.features(x)] == [f.shape for f in plain.features(x)]


def test_bf16_passes_return_float32_and_auto_is_bf16_only_inside_fast(tiny_blackbox_path):
    plain = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="32")  # channels-last, as the other two
    bf16 = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="bf16")
    auto = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="auto")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = plain.logits(x)
    low = bf16.logits(x)
    assert low.dtype == torch.float32 and not torch.equal(low, reference)  # bf16 rounding shows
    assert all(f.dtype == torch.float32 for f in bf16.features(x))
    assert torch.equal(auto.logits(x), reference)  # outside fast(): float32, bit for bit
    with auto.fast():
        assert auto.pass_dtype("cpu") == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
        inside = auto.logits(x)
    assert torch.equal(inside, low) if native_bf16(torch.device("cpu")) else torch.equal(inside, reference)
    with plain.fast():
        assert torch.equal(plain.logits(x), reference)  # precision "32" ignores fast()


def test_fast_block_nests_and_restores(tiny_blackbox_path):
    auto = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="auto")
    with pytest.raises(RuntimeError):
        with auto.fast():
            with auto.fast(enabled=False):
                assert auto._fast_depth == 1
            raise RuntimeError("boom")
    assert auto._fast_depth == 0 and auto.pass_dtype("cpu") == torch.float32


def test_spearman_per_image():
    a = torch.arange(16.0).view(1, 1, 4, 4)
    pair = torch.cat([a, a])
    other = torch.cat([a ** 3, -a])  # monotone: 1; reversed: -1
    assert torch.allclose(spearman_per_image(other, pair), torch.tensor([1.0, -1.0], dtype=torch.float64))
    flat = torch.zeros(1, 1, 4, 4)
    assert spearman_per_image(flat, flat).item() == 1.0 and spearman_per_image(flat, a).item() == 0.0


def test_probabilities_within_tolerance_of_float32(embedded, scenes):
    gap = probability_gap(embedded["fast"], embedded["fp32"], scenes[0])
    assert gap.shape == (SCENES,)
    assert (gap <= PROBABILITY_TOLERANCE).all(), gap
    assert gap.max() > 0  # bf16 did run


@pytest.mark.parametrize("name", sorted(FAITHFUL_HPARAMS))
def test_maps_faithful_to_float32(name, embedded, scenes):
    """The maps of every method that runs fast by default (fast_passes) hold the bar on bf16 + channels-last;
    the methods that do not are listed by the benchmark with their figures (here: they must not opt in)."""
    result = map_spearman(name, embedded["fast"], embedded["fp32"], *scenes, **FAITHFUL_HPARAMS[name])
    bar = MIN_SPEARMAN["gradient" if explainers.build(name, embedded["fp32"]).needs_grad else "gradient_free"]
    assert result.bar == bar and result.spearman.shape == (SCENES,)
    if explainers.build(name, embedded["fp32"]).fast_passes:
        assert result.holds, (name, result.spearman)


def test_explainers_opting_in_run_bf16_on_an_auto_black_box(embedded, scenes):
    """A fast_passes method on precision="auto" gives the maps of the bf16 black box; on "32" the fp32 ones."""
    fast_ones = [n for n in FAITHFUL_HPARAMS if explainers.build(n, embedded["fp32"]).fast_passes]
    if not native_bf16(torch.device("cpu")) or not fast_ones:
        pytest.skip("no native bf16 on this CPU, or no method opts in")
    name = fast_ones[0]
    images, targets, indices = scenes
    hparams = {**FAITHFUL_HPARAMS[name], **ROUTING_HPARAMS.get(name, {})}
    maps = {key: explainers.build(name, embedded[key], **hparams)(images, targets, indices)
            for key in ("fp32", "fast", "auto")}
    assert torch.equal(maps["auto"], maps["fast"]) and not torch.equal(maps["auto"], maps["fp32"])


def test_causal_metrics_faithful_to_float32(embedded, scenes):
    images, targets, _ = scenes
    saliency = torch.rand(SCENES, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    protocol = CausalProtocol.rise(64, steps=16)
    reference = causal_curves(embedded["fp32"], images, saliency, targets, protocol)
    previous = causal.FAST_PASSES
    causal.FAST_PASSES = True
    try:
        fast = causal_curves(embedded["auto"], images, saliency, targets, protocol)
    finally:
        causal.FAST_PASSES = previous
    for key in ("deletion", "insertion"):
        assert (getattr(fast, key) - getattr(reference, key)).abs().max() <= PROBABILITY_TOLERANCE


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU: 'auto' is float32")
def test_bf16_passes_do_not_depend_on_the_batch_they_run_in(embedded, tiny_blackbox_path):
    """Why batch = single calls (test_explainers_conformance) hold under precision "auto" with its bf16 passes:
    oneDNN's bf16 kernels compute each image alone, so an image's logits are the same bits whatever batch or
    chunk it runs in (measured here for every chunk size below; float32 differs by ~1e-7 between batch sizes,
    within those tests' tolerance). A CPU whose bf16 kernels broke this would fail here first, by name."""
    for box, size in ((embedded["fast"], 64), (BlackBox(f"ckpt:{tiny_blackbox_path}", precision="bf16"), 48)):
        x = torch.rand(17, 3, size, size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            whole = box.logits(x)
            for chunk in (1, 2, 5, 12):
                assert torch.equal(torch.cat([box.logits(part) for part in x.split(chunk)]), whole), chunk


@pytest.mark.slow  # compiles with inductor: ~15 s on 2 cores
def test_compiled_black_box_runs_and_gives_the_eager_values(tiny_blackbox_path):
    """compile=MODE wraps the network in torch.compile; its logits equal the eager network's (float32). (The
    wrapper must never be tested for truth: an OptimizedModule of a ResNet raises on len().)"""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eager = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="32")
    compiled = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="32", compile="default")
    assert compiled.compile_mode == "default"
    torch.testing.assert_close(compiled.logits(x), eager.logits(x), rtol=1e-4, atol=1e-5)
