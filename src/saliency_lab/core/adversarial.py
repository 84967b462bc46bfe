"""Adversarial examples against a black box: MI-FGSM, the momentum iterative fast gradient sign method (Dong et al.
2018, "Boosting adversarial attacks with momentum"), which iGOS++'s adversarial analysis uses.

With x_0 = x, g_0 = 0 and the cross-entropy L of the model's logits on images in [0, 1]:

    g_{t+1} = mu g_t + grad_x L(x_t, y) / ||grad_x L(x_t, y)||_1          (per image)
    x_{t+1} = clip_{[0,1]} clip_{x +- eps}(x_t + s alpha sign(g_{t+1}))

with s = +1 (untargeted: move away from the true class y) or s = -1 (targeted: move toward the target class y).
Defaults as in the paper's L_inf setting scaled to [0, 1] pixels: eps = 8/255, alpha = eps / steps, 10 steps,
mu = 1. No random start: the attack is deterministic.

Written here rather than taken from torchattacks (whose MI-FGSM is the same update): torchattacks 3.5.1 pins
``requests~=2.25.1``, which would downgrade requests, idna and urllib3 for every other package of the
environment.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.inputs import check_explained_batch


def mi_fgsm(model: Callable[[Tensor], Tensor], images: Tensor, classes: Tensor, *, eps: float = 8 / 255,
            steps: int = 10, alpha: float | None = None, decay: float = 1.0, targeted: bool = False) -> Tensor:
    """Adversarial versions (B, 3, H, W) in [0, 1] of ``images`` (B, 3, H, W) in [0, 1], within ``eps`` of them in
    L_inf. ``classes`` (B,): the true classes to move away from (untargeted) or the target classes (targeted).
    ``model`` maps [0, 1] images to logits (a ``BlackBox`` normalises on its own)."""
    check_explained_batch(images, classes)
    if eps <= 0 or steps < 1 or decay < 0:
        raise ValueError(f"MI-FGSM needs eps > 0, steps >= 1 and decay >= 0; got eps={eps}, steps={steps}, "
                         f"decay={decay}")
    alpha = eps / steps if alpha is None else alpha
    sign = -1.0 if targeted else 1.0
    original = images.detach().float()
    adversarial = original.clone()
    momentum = torch.zeros_like(original)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adversarial).float(), classes)
            (grad,) = torch.autograd.grad(loss, adversarial)
        l1 = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        momentum = decay * momentum + grad / l1
        step = adversarial.detach() + sign * alpha * momentum.sign()
        adversarial = torch.min(torch.max(step, original - eps), original + eps).clamp(0.0, 1.0)
    return adversarial.detach()
