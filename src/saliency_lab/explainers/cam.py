"""Grad-CAM and Grad-CAM++ through pytorch-grad-cam, on the black box's deepest feature level.

Grad-CAM (Selvaraju et al., ICCV 2017, Eqs. 1-2): with A^k the k-th channel of the target layer and y_c
the target logit,  alpha_k = mean_ij dy_c / dA^k_ij,  L = ReLU(sum_k alpha_k A^k).
Grad-CAM++ (Chattopadhay et al., WACV 2018, Eq. 19): alpha_k = sum_ij a^k_ij ReLU(dy_c / dA^k_ij) with
a^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3), g = dy_c / dA^k_ij (the closed form for an exponential score).
The coarse map L (h x w, stride 32 for our CNNs) is upsampled bilinearly to H x W.

What comes from pytorch-grad-cam and what does not:
- from it: the hooks on the target layer (``ActivationsAndGradients``, released in a ``finally``), the
  per-method channel weights and weighted sum (``get_cam_image``: the method-specific part), the targets
  (``ClassifierOutputTarget``);
- not from it: the forward/backward (our counted black-box call, a vectorised gather of the target logits
  instead of a python sum over images), the ReLU and the bilinear upsampling, done in torch on the device.
  Its ``__call__`` would rescale every map to [0, 1] per image and resize with OpenCV on the CPU (the
  numpy-in-the-core-path its users report); the numpy part here is limited to the last-level
  activations and gradients (b, C, h, w), which its hooks copy to the CPU.
- not its context manager: ``BaseCAM.__exit__`` swallows any IndexError raised inside the block.
pytorch-grad-cam is imported lazily: it pulls in OpenCV and ttach (seconds of import time).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.blackbox import require_feature_levels
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.registry import register


def cam_target_layer_name(blackbox: nn.Module) -> str:
    """Name, within ``blackbox.net``, of the module whose output is the deepest selected feature level
    (``BlackBox.feature_modules[-1]``: ``layer4`` for ResNets, ``inception5b`` for GoogLeNet)."""
    if hasattr(blackbox, "require_features"):
        require_feature_levels(blackbox, "Grad-CAM (its default target layer)")
    modules = getattr(blackbox, "feature_modules", None)
    if not modules:
        raise ValueError(f"cannot locate the last feature level of black box {getattr(blackbox, 'spec', blackbox)!r}; "
                         "pass target_layer='name.of.module.in.blackbox.net'")
    return modules[-1]


class _CountedLogits(nn.Module):
    """The model pytorch-grad-cam sees: [0, 1] images -> logits through the explainer's counted call."""

    def __init__(self, blackbox: nn.Module, logits_fn):
        super().__init__()
        self.blackbox = blackbox  # a submodule, so pytorch-grad-cam finds the device in its parameters
        self.logits_fn = logits_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_fn(x)


class _PytorchGradCAM(Explainer):
    """Shared wrapper; subclasses name the pytorch-grad-cam class in ``cam_class``.

    Args:
        target_layer: module name inside ``blackbox.net`` (default: :func:`cam_target_layer_name`).
        seed, max_forward_batch: see :class:`saliency_lab.explainers.base.Explainer` (deterministic method: seed unused).

    Output (B, 1, H, W) >= 0, not normalised per image. Cost: one forward and one backward per image.
    """

    needs_grad = True
    cam_class: ClassVar[str]

    def __init__(self, blackbox, *, target_layer: str | None = None, **common):
        super().__init__(blackbox, **common)
        self.target_layer = target_layer or cam_target_layer_name(blackbox)
        blackbox.net.get_submodule(self.target_layer)  # fail at construction, not at the first call

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        import pytorch_grad_cam

        layer = self.blackbox.net.get_submodule(self.target_layer)
        cam = getattr(pytorch_grad_cam, self.cam_class)(model=_CountedLogits(self.blackbox, self._logits),
                                                        target_layers=[layer])
        try:
            coarse = torch.cat([self._coarse_map(cam, layer, images[part], targets[part])
                                for part in self._chunks(images.shape[0])])
        finally:
            cam.activations_and_grads.release()
        return F.interpolate(coarse.relu(), size=images.shape[-2:], mode="bilinear", align_corners=False)

    @staticmethod
    def _coarse_map(cam, layer: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        """sum_k alpha_k A^k (b, 1, h, w) before the ReLU, on the images' device."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        # The black box is frozen: unless the input requires grad, the layer's output has no grad_fn and
        # pytorch-grad-cam's gradient hook is never attached. The parameters stay frozen.
        x = images.detach().requires_grad_(True)
        logits = cam.activations_and_grads(x)
        torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
        store = cam.activations_and_grads
        activations, gradients = store.activations[0].numpy(), store.gradients[0].numpy()
        cam_targets = [ClassifierOutputTarget(c) for c in targets.tolist()]
        weighted = cam.get_cam_image(x, layer, cam_targets, activations, gradients)  # numpy (b, h, w)
        return torch.from_numpy(weighted).to(device=images.device, dtype=images.dtype)[:, None]


@register("gradcam")
class GradCAM(_PytorchGradCAM):
    """Grad-CAM (Selvaraju et al. 2017) via ``pytorch_grad_cam.GradCAM``; see the module docstring."""

    cam_class = "GradCAM"


@register("gradcam_pp")
class GradCAMPlusPlus(_PytorchGradCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018) via ``pytorch_grad_cam.GradCAMPlusPlus``; see the module docstring."""

    cam_class = "GradCAMPlusPlus"
