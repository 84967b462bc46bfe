"""Cost of the ROAD metric per image: the imputations (one sparse solve per fraction and order, on the CPU)
against the black-box passes on the imputed images, at the embedded size and at a larger one.

    python -m benchmarks.road [--sizes 64,224] [--images 4] [--repeats 3] [--threads 2] [--clock wall|cpu]

Prints, per image size, the median seconds per image of ``road_scores`` (9 fractions x 2 orders), of its
imputations alone, of pytorch-grad-cam's imputer on the same masks (the reference construction of the same
system) and of the same number of black-box forwards, with the machine line of the Stopwatch. The
black box is the embedded one (at a larger size it sees upscaled scenes: the cost of the solve grows with the
pixel count, not with the content).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.timing import add_timing_arguments, stopwatch_from_args
from saliency_lab.datamodules import embedded_batch
from saliency_lab.metrics.road import ROAD_FRACTIONS, impute, removal_masks, road_scores


def measure(model, images: torch.Tensor, repeats: int, stopwatch) -> dict[str, float]:
    batch = images.shape[0]
    saliency = torch.rand(batch, 1, *images.shape[-2:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = model(images).argmax(1)

    def imputations():
        for order in (True, False):
            masks = removal_masks(saliency, ROAD_FRACTIONS, order)
            for b in range(batch):
                for f in range(len(ROAD_FRACTIONS)):
                    impute(images[b], masks[b, f])

    def grad_cam_imputations():
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer

        imputer = NoisyLinearImputer(noise=0.0)
        for order in (True, False):
            masks = removal_masks(saliency, ROAD_FRACTIONS, order)
            for b in range(batch):
                for f in range(len(ROAD_FRACTIONS)):
                    imputer(images[b].cpu(), (~masks[b, f]).float().cpu())

    stack = images.repeat(2 * len(ROAD_FRACTIONS), 1, 1, 1)

    def forwards():
        with torch.no_grad():
            model(stack)

    whole = stopwatch.median(lambda: road_scores(model, images, saliency, targets), repeats)
    solve = stopwatch.median(imputations, repeats)
    reference = stopwatch.median(grad_cam_imputations, repeats)
    passes = stopwatch.median(forwards, repeats)
    return {"road": whole / batch, "imputation": solve / batch, "grad_cam": reference / batch,
            "forwards": passes / batch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,224", help="image sizes, comma-separated")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    stopwatch = stopwatch_from_args(args)
    model = BlackBox("embedded").to(stopwatch.device)
    scenes = embedded_batch(args.images)["image"].to(stopwatch.device)
    print(stopwatch.header())
    print(f"ROAD, {len(ROAD_FRACTIONS)} fractions x 2 orders, {args.images} images, median of {args.repeats}")
    print("| size | ROAD s/image | our imputation s/image | grad-cam's imputer s/image | black-box forwards s/image |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        images = F.interpolate(scenes, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        figures = measure(model, images, args.repeats, stopwatch)
        print(f"| {size} | {figures['road']:.3f} | {figures['imputation']:.3f} | {figures['grad_cam']:.3f} "
              f"| {figures['forwards']:.4f} |")


if __name__ == "__main__":
    main()
