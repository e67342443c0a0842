"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1 with the AlexNet backbone, written here because every library path needs
torchvision (the ``lpips`` package imports it at module level, torchmetrics builds the backbone
through it), and torchvision does not import next to the CPU torch this project pins.

The modules mirror the published layouts so that the real weights load unchanged:

- ``features``: torchvision's ``alexnet().features`` (keys ``features.0.weight`` ...): conv 11x11
  stride 4 (64), max-pool, conv 5x5 (192), max-pool, conv 3x3 (384), conv 3x3 (256),
  conv 3x3 (256), max-pool; LPIPS reads the five ReLU outputs. Weights: torchvision's ImageNet
  AlexNet file ``alexnet-owt-7be5be79.pth`` (or any state dict with those keys);
- ``lin0`` .. ``lin4``: LPIPS's learned 1x1 convolutions (keys ``lin<k>.model.1.weight``,
  [1, C_k, 1, 1]; index 0 of ``model`` is a dropout), the ``alex.pth`` file that the ``lpips`` and
  ``torchmetrics`` packages ship.

Distance: inputs in [-1, 1] are shifted and scaled per channel (the constants below), each
tapped feature map is unit-normalized along channels (eps 1e-10), the squared difference is
weighted by ``lin<k>``, averaged over space, and the five layers are summed.
"""

from __future__ import annotations

import torch
from torch import nn

# per-channel input normalization of LPIPS v0.1 (ImageNet statistics mapped to [-1, 1] inputs)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
# features[i] for i < TAPS[k] ends slice k (each slice ends with a ReLU)
TAPS = (2, 5, 8, 10, 12)
EPS = 1e-10


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` (same indices, so its state dict keys load)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class _Lin(nn.Module):
    """LPIPS's ``NetLinLayer`` layout: ``model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))``
    (dropout is inactive in eval mode; it is kept so that the key is ``model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 / AlexNet. ``forward(a, b)``: float32 [N, 3, H, W] in [-1, 1] (H, W >= 32)
    -> float32 [N] distances (0 for identical images)."""

    MIN_SIDE = 32  # smaller inputs vanish in the second max-pool

    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _Lin(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def load_weights(self, backbone: dict, lins: dict) -> None:
        """Load torchvision AlexNet weights (``features.*`` keys; other keys ignored) and the
        LPIPS ``lin*`` weights; raises ValueError naming a missing or misshapen key."""
        own = self.state_dict()
        picked = {k: v for k, v in backbone.items() if k.startswith("features.")}
        picked.update({k: v for k, v in lins.items() if k.startswith("lin")})
        for key, ref in own.items():
            got = picked.get(key)
            if got is None:
                raise ValueError(f"LPIPS weights: key {key!r} is missing")
            if tuple(got.shape) != tuple(ref.shape):
                raise ValueError(
                    f"LPIPS weights: {key!r} is {tuple(got.shape)}, expected {tuple(ref.shape)}"
                )
        self.load_state_dict({k: picked[k].float() for k in own}, strict=True)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs for input x float32 [N, 3, H, W] in [-1, 1]."""
        x = (x - self.shift) / self.scale
        out, start = [], 0
        for end in TAPS:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if min(a.shape[-2:]) < self.MIN_SIDE:
            raise ValueError(f"LPIPS: images of {tuple(a.shape[-2:])}; needs sides >= 32")
        total = torch.zeros(a.shape[0], device=a.device)
        for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b))):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + EPS)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + EPS)
            weighted = getattr(self, f"lin{k}")((fa - fb) ** 2)  # [N, 1, h, w]
            total = total + weighted.mean(dim=(1, 2, 3))
        return total
