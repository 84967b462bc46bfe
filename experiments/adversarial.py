"""Do the causal curves flag adversarial images? iGOS++'s adversarial analysis (its Fig. 4) on the embedded data.

    python -m experiments.adversarial [--num_images 32] [--methods gradient,gradcam,rise,...]
        [--method_hparams '{"rise": {"n_masks": 1000}}'] [--predictor assets/embedded_predictor_game.ckpt ...]
        [--eps 0.0314] [--steps 10] [--targeted] [--protocol igos|rise] [--precision 32|bf16|auto]
        [--resamples 1000] [--out outputs/adversarial]

The first ``--num_images`` test scenes are attacked with MI-FGSM (``core.adversarial.mi_fgsm``, L_inf ``--eps`` in
[0, 1] pixels, ``--steps``) against the embedded black box. Untargeted (the default), the attack moves away from the
predicted class and the images whose predicted class it changed are kept; ``--targeted`` moves toward a target
class drawn per image from the other classes (seeded by ``--seed``) and keeps the images whose prediction became
that target. Every method explains the predicted class of the natural image and of its
adversarial version, and both maps are scored by deletion and insertion under ``--protocol`` (default ``igos``,
the paper's: both substrates a strong blur, which also removes most of the high-frequency attack; ``rise``
inserts into a mild blur that keeps it). Per method:
the mean scores on natural and adversarial images, the paired difference adversarial - natural of each score,
and the AUROC of each score for telling natural (positive) from adversarial images (0.5: no signal; for deletion,
where lower is better, the AUROC of its negation), each with a 95% percentile-bootstrap interval over scenes (a
scene's natural and adversarial image are resampled together; seeded by ``--seed``).
Each ``--predictor`` adds a trained method: ``PATH`` (the method its checkpoint records) or ``NAME=PATH`` (another
registered trained method built from that checkpoint, e.g. ``predictor_ct_posthoc=`` a CT run's or
``mgnet_ct_posthoc=`` an MGnet run's); the option repeats.
Writes ``OUT/adversarial.json`` (with every scene's scores) and ``OUT/adversarial.md`` and prints the table; every
stochastic method is seeded by the image index, so a rerun gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from saliency_lab import explainers
from saliency_lab.cli.checks import ckpt_spec
from saliency_lab.core.adversarial import mi_fgsm
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.files import atomic_write, atomic_write_json
from saliency_lab.core.machine import describe
from saliency_lab.datamodules import embedded_batch
from saliency_lab.metrics import causal_curves, make_protocol
from saliency_lab.metrics.report import percentile_interval

DEFAULT_METHODS = "gradient,integrated_gradients,gradcam,rise,iassa"


def attack_targets(natural: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Target classes (B,) for a targeted attack: per image a class drawn uniformly from the ``num_classes - 1``
    classes other than its natural prediction ``natural`` (B,)."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, num_classes, natural.shape, generator=generator)
    return (natural + offsets) % num_classes


def attack(blackbox: BlackBox, images: torch.Tensor, eps: float, steps: int, chunk: int = 16,
           target_seed: int | None = None):
    """(adversarial images, natural predictions, adversarial predictions, success (B,) bool), the attack run in
    chunks: untargeted when ``target_seed`` is None (success: the prediction changed), else toward the classes
    ``attack_targets`` draws with that seed (success: the prediction is the target)."""
    with torch.no_grad():
        natural = blackbox(images).argmax(1)
    targets = None if target_seed is None else attack_targets(natural, blackbox.num_classes, target_seed)
    classes = natural if targets is None else targets
    adversarial = torch.cat([mi_fgsm(blackbox, images[i:i + chunk], classes[i:i + chunk], eps=eps, steps=steps,
                                     targeted=targets is not None)
                             for i in range(0, len(images), chunk)])
    with torch.no_grad():
        fooled = blackbox(adversarial).argmax(1)
    success = fooled != natural if targets is None else fooled == targets
    return adversarial, natural, fooled, success


def trained_method(spec: str) -> tuple[str, str]:
    """(registry name, checkpoint path) of a ``--predictor`` value, parsed as evaluate.py's ``--ckpt_path``
    (:func:`saliency_lab.cli.checks.ckpt_spec`): ``NAME=PATH``, or a plain path (even one holding ``=``, as
    Lightning's names do) for the method its checkpoint records."""
    parsed = ckpt_spec(spec)
    name, path = parsed["name"], parsed["checkpoint"]
    if not explainers.is_trained(name):
        raise SystemExit(f"--predictor {spec}: {name!r} is not a trained method (it takes no checkpoint)")
    return name, path


def scores(blackbox, explainer, images, targets, indices, protocol, chunk: int = 16) -> dict[str, torch.Tensor]:
    """Deletion and insertion (B,) of ``explainer``'s maps of ``targets`` on ``images``."""
    out = {"deletion": [], "insertion": []}
    for i in range(0, len(images), chunk):
        part = slice(i, i + chunk)
        maps = explainer(images[part], targets[part], indices[part])
        curves = causal_curves(blackbox, images[part], maps, targets[part], protocol)
        out["deletion"].append(curves.deletion)
        out["insertion"].append(curves.insertion)
    return {k: torch.cat(v).float() for k, v in out.items()}


def auroc(natural: torch.Tensor, adversarial: torch.Tensor, higher_is_natural: bool) -> float:
    """AUROC of a score separating natural (positive) from adversarial images."""
    values = torch.cat([natural, adversarial]).double()
    labels = [1] * len(natural) + [0] * len(adversarial)
    return float(roc_auc_score(labels, values if higher_is_natural else -values))


def scene_resamples(scenes: int, resamples: int, seed: int) -> torch.Tensor:
    """(resamples, scenes) indices of a seeded bootstrap over scenes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(scenes, (resamples, scenes), generator=generator)


def score_summary(natural: torch.Tensor, adversarial: torch.Tensor, higher_is_natural: bool,
                  draws: torch.Tensor) -> dict[str, float]:
    """One score's natural and adversarial means, the paired difference adversarial - natural and the AUROC, the
    last two with percentile intervals over the scene ``draws`` (R, N) of :func:`scene_resamples` (N scenes;
    ``natural[i]`` and ``adversarial[i]`` are the same scene)."""
    difference = (adversarial - natural).double()
    low, high = percentile_interval(difference[draws].mean(1))
    aurocs = torch.tensor([auroc(natural[d], adversarial[d], higher_is_natural) for d in draws])
    auroc_low, auroc_high = percentile_interval(aurocs)
    return {"natural": natural.mean().item(), "adversarial": adversarial.mean().item(),
            "difference": difference.mean().item(), "difference_low": low, "difference_high": high,
            "auroc": auroc(natural, adversarial, higher_is_natural), "auroc_low": auroc_low, "auroc_high": auroc_high}


def markdown(result: dict) -> str:
    causal = result["protocol"]
    kind = "targeted" if result.get("targeted") else "untargeted"
    lines = [f"{result['attacked']} of {result['images']} test scenes fooled by {kind} MI-FGSM "
             f"(eps {result['eps']:.4f}, {result['steps']} steps); the scores below are over those images, "
             f"deletion and insertion with units {causal['units']} and blur sigma {causal['blur_sigma']:.2f}; "
             f"95% intervals from {result['resamples']} bootstrap resamples of the scenes.", "",
             "| method | insertion natural | insertion adversarial | adversarial - natural | AUROC insertion | "
             "deletion natural | deletion adversarial | adversarial - natural | AUROC deletion |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        cells = []
        for score in ("insertion", "deletion"):
            s = r[score]
            cells += [f"{s['natural']:.3f}", f"{s['adversarial']:.3f}",
                      f"{s['difference']:+.3f} [{s['difference_low']:+.3f}, {s['difference_high']:+.3f}]",
                      f"{s['auroc']:.3f} [{s['auroc_low']:.3f}, {s['auroc_high']:.3f}]"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="registered untrained explainers, comma-separated")
    parser.add_argument("--method_hparams", type=json.loads, default={}, help='JSON {method: {hparam: value}}')
    parser.add_argument("--predictor", action="append", default=[],
                        help="a trained method's checkpoint, PATH or NAME=PATH, added as a method; repeatable")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--targeted", action="store_true",
                        help="attack toward a class drawn per image from the other classes (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=("igos", "rise"), default="igos", help="the causal metrics' preset")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the scenes")
    parser.add_argument("--precision", choices=("32", "bf16", "auto"), default="32",
                        help="the black box's pass precision (default 32: the same numbers on every CPU; auto is "
                             "bf16 where the CPU computes it natively, see core.blackbox)")
    parser.add_argument("--out", type=Path, default=Path("outputs/adversarial"))
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error(f"--resamples must be >= 1, got {args.resamples}")
    blackbox = BlackBox("embedded", precision=args.precision)
    data = embedded_batch(args.num_images)
    adversarial, natural, fooled, success = attack(blackbox, data["image"], args.eps, args.steps,
                                                   target_seed=args.seed if args.targeted else None)
    kept = success.nonzero().flatten()
    if len(kept) < 2:
        raise SystemExit(f"the attack fooled {len(kept)} of {args.num_images} images: too few to compare; raise --eps")
    images, adversarial, indices = data["image"][kept], adversarial[kept], data["index"][kept]
    protocol = make_protocol(args.protocol, int(images.shape[-1]))
    methods = {name: explainers.build(name, blackbox, seed=args.seed, **args.method_hparams.get(name, {}))
               for name in args.methods.split(",") if name}
    for spec in args.predictor:
        name, checkpoint = trained_method(spec)
        if name in methods:
            raise SystemExit(f"--predictor {spec}: the method {name!r} is already in the table")
        methods[name] = explainers.build(name, blackbox, checkpoint=checkpoint)
    result = {"images": args.num_images, "attacked": len(kept), "eps": args.eps, "steps": args.steps,
              "targeted": args.targeted, "resamples": args.resamples, "precision": args.precision,
              "protocol": protocol.to_dict(), "scenes": indices.tolist(),
              "machine": describe("cpu"), "methods": {}}
    draws = scene_resamples(len(kept), args.resamples, args.seed)
    for name, explainer in methods.items():
        clean = scores(blackbox, explainer, images, natural[kept], indices, protocol)
        attacked = scores(blackbox, explainer, adversarial, fooled[kept], indices, protocol)
        result["methods"][name] = {
            score: {**score_summary(clean[score], attacked[score], score == "insertion", draws),
                    "per_scene_natural": clean[score].tolist(), "per_scene_adversarial": attacked[score].tolist()}
            for score in ("insertion", "deletion")}
        print(markdown({**result, "methods": {name: result["methods"][name]}}).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "adversarial.json", result)
    atomic_write(args.out / "adversarial.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
