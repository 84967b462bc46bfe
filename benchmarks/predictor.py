"""Speed of the learned mask predictor against the black-box work it cannot avoid.

    python -m benchmarks.predictor [--batch 64] [--repeats 7] [--mode ct] [--threads 1] [--device auto]
                                   [--clock wall|cpu]

1. Explaining a batch (``MaskPredictor.as_explainer()``: one feature pass of the black box + generator +
   controller + upsampling) against one plain black-box forward of the same batch. Target: ratio <= 1.25.
2. One training step (clean forward, generator, substrate, perturbation, masked forward, backward, Adam step)
   against its bare work: the clean forward + the masked forward and backward through the black box alone
   (two masked batches for MGnet / a Destruction term: phi(I, M, A) and phi(I, 1 - M, A)),
   plus the generator's own cost (its forward, backward and Adam step on fixed features).
   Target: ratio <= 1.3.
Both on embedded test images with the embedded black box (the committed assets/ record, else random weights of
the same shape) and an untrained filter (speed does not depend on weights). Each pair is timed alternately in
one process, so machine noise hits both alike; medians of ``--repeats`` runs after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


from saliency_lab.datamodules import embedded_batch
from saliency_lab.core.resources import packaged
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from saliency_lab.lightning_modules.mask_predictor import MaskPredictor
from saliency_lab.lightning_modules.objectives import Preservation


CLASSIFIER_CONFIG = Path(__file__).resolve().parents[1] / "configs/model/embedded_classifier.yaml"


def build(mode: str) -> MaskPredictor:
    """The predictor on the demo's black box, or on random weights of the architecture its config names."""
    if packaged("assets/embedded_blackbox.pt").is_file():
        blackbox = BlackBox("embedded")
    else:
        import yaml

        blackbox = BlackBox.from_config(yaml.safe_load(CLASSIFIER_CONFIG.read_text())["init_args"]["blackbox"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-filter warning
        return MaskPredictor(blackbox=blackbox, filter_checkpoint=None, mode=mode)


def alternate(first, second, repeats: int, stopwatch: Stopwatch | None = None) -> tuple[float, float]:
    """Medians of ``repeats`` alternated timings of two callables (after one warm-up call of each), by
    ``stopwatch`` (default: the wall clock on the CPU)."""
    stopwatch = stopwatch or Stopwatch()
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            out.append(stopwatch.time(fn)[1])
    return statistics.median(times[0]), statistics.median(times[1])


def explain_vs_forward(module: MaskPredictor, images, repeats: int, stopwatch: Stopwatch | None = None) -> dict:
    blackbox, explainer = module.blackbox, module.as_explainer(max_forward_batch=images.shape[0])
    with torch.no_grad():
        targets = blackbox.logits(images).argmax(1)

    def forward():
        with torch.no_grad():
            blackbox.logits(images)

    def explain():
        explainer(images, targets)

    bare, method = alternate(forward, explain, repeats, stopwatch)
    return {"forward_s": bare, "explain_s": method, "ratio": method / bare}


def step_vs_bare(module: MaskPredictor, batch: dict, repeats: int, stopwatch: Stopwatch | None = None) -> dict:
    module.train()
    blackbox, net = module.blackbox, module.net
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    images, index = batch["image"], batch["index"]
    with torch.no_grad():
        features, logits = blackbox.features_and_logits(images)
    targets = logits.argmax(1)

    def training_step():
        with torch.no_grad():
            feats, out = blackbox.features_and_logits(images)
        loss = module.compute_loss(images, feats, out.argmax(1), index, 0)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # one masked batch per preservation-like term: phi(I, M, A), and phi(I, 1 - M, A) for MGnet's destroyer
    masked = sum(1 for o in module.objectives if o.weight and isinstance(o, Preservation))

    def bare_blackbox():
        with torch.no_grad():
            blackbox.features_and_logits(images)
        x = images.repeat(masked, 1, 1, 1).requires_grad_(True)
        F.cross_entropy(blackbox.logits(x), targets.repeat(masked)).backward()

    def generator_alone():
        mask = F.interpolate(net(features, targets), size=images.shape[-2:], mode="bilinear", align_corners=False)
        optimizer.zero_grad(set_to_none=True)
        mask.mean().backward()
        optimizer.step()

    step, bare = alternate(training_step, bare_blackbox, repeats, stopwatch)
    generator, _ = alternate(generator_alone, lambda: None, repeats, stopwatch)
    return {"step_s": step, "bare_blackbox_s": bare, "generator_s": generator, "ratio": step / (bare + generator)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mode", default="ct", choices=["ct", "bt", "mgnet"])
    add_timing_arguments(parser, threads=1, clock="wall")  # 1 thread: stable figures on a shared machine
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    print(stopwatch.header(), flush=True)
    torch.manual_seed(0)
    module = build(args.mode).to(stopwatch.device)
    batch = {key: value.to(stopwatch.device) for key, value in embedded_batch(args.batch).items()}
    print(f"black box {module.blackbox.spec} {module.blackbox.feature_channels}, generator widths "
          f"{module.net.generator.widths}, mode {args.mode}, batch {args.batch} x {tuple(batch['image'].shape[1:])}")
    module.eval()
    explain = explain_vs_forward(module, batch["image"], args.repeats, stopwatch)
    print(f"1. explain {explain['explain_s'] * 1e3:.1f} ms vs one black-box forward {explain['forward_s'] * 1e3:.1f} ms"
          f" -> ratio {explain['ratio']:.3f} (target <= 1.25)")
    step = step_vs_bare(module, batch, args.repeats, stopwatch)
    print(f"2. training step {step['step_s'] * 1e3:.1f} ms vs bare black-box work {step['bare_blackbox_s'] * 1e3:.1f} ms"
          f" + generator {step['generator_s'] * 1e3:.1f} ms -> ratio {step['ratio']:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
