"""Task-incremental ("multi-head") models for Avalanche without growing heads."""

from __future__ import annotations

import torch
from avalanche.models import MultiTaskModule
from torch import Tensor, nn

MASKED_LOGIT = -1e4  # softmax weight exp(-1e4) is exactly 0 in float32, and log-softmax stays finite


class TaskMaskedModel(MultiTaskModule):
    """One fixed output layer over all classes; each task sees only its own classes.

    ``class_masks[t, c]`` is True when class ``c`` belongs to task ``t``. Logits
    outside an example's task are set to ``MASKED_LOGIT``, so the softmax is
    over the task's classes only: the same as one head per task, with no
    parameters added when a task arrives (optimizers with flat state, such as
    IVON, stay valid).
    """

    def __init__(self, net: nn.Module, class_masks: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("class_masks", class_masks.clone().bool())

    def mask_for(self, task_labels: Tensor | int, n: int) -> Tensor:
        if isinstance(task_labels, int):
            return self.class_masks[task_labels].expand(n, -1)
        return self.class_masks[task_labels.long()]

    def forward(self, x: Tensor, task_labels: Tensor | int | None) -> Tensor:  # type: ignore[override]
        if task_labels is None:  # Avalanche's convention: every head's output, by task id (LwF uses it)
            return self.forward_all_tasks(x)
        logits = self.net(x)
        return logits.masked_fill(~self.mask_for(task_labels, logits.shape[0]), MASKED_LOGIT)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.forward(x, task_label)

    def forward_all_tasks(self, x: Tensor) -> dict[int, Tensor]:
        logits = self.net(x)
        return {t: logits.masked_fill(~m, MASKED_LOGIT) for t, m in enumerate(self.class_masks)}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside a ``TaskMaskedModel`` (or the model itself)."""
    return model.net if isinstance(model, TaskMaskedModel) else model


@torch.no_grad()
def class_mask(model: nn.Module, task_labels: Tensor, n: int) -> Tensor | None:
    """The (n, C) class mask for these task labels, or None for single-head models."""
    return model.mask_for(task_labels, n) if isinstance(model, TaskMaskedModel) else None
