"""Networks used by the benchmarks. Plain torch modules: logits over all classes.

Output layers have a fixed size (every class of the benchmark). Task-incremental
("multi-head") benchmarks restrict each example to its task's classes with a
mask (see ``cl_bayes.strategies.models.TaskMaskedModel``); the network itself
never grows, so optimizers with flat state buffers (IVON) stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(self, *, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Four 3x3 convolutions, two max-pools, one hidden dense layer (Zenke et al.'s CIFAR net)."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: int = 32, dense: int = 512):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, 2 * width), nn.Flatten(),
            nn.Linear(2 * width * 8 * 8, dense), nn.ReLU(),
        )
        self.classifier = nn.Linear(dense, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(
    kind: str, *, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256)
) -> nn.Module:
    """``mlp`` (``hidden`` widths) or ``cnn`` (for 3x32x32 inputs)."""
    if kind == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= d
        return MLP(in_features=in_features, hidden=hidden, num_classes=num_classes)
    if kind == "cnn":
        if tuple(input_shape[1:]) != (32, 32):
            raise ValueError(f"the cnn model expects 32x32 inputs, got {tuple(input_shape)}")
        return SmallCNN(in_channels=input_shape[0], num_classes=num_classes)
    raise ValueError(f"unknown model '{kind}' (known: mlp, cnn)")
