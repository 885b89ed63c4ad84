"""The one abstraction of cogradctl's gradient methods.

A method maps the K×P matrix of task gradients on the shared parameters (one row per task) and
the K task losses to the P-vector update applied to the shared parameters. It is a
``torch.nn.Module`` so that any state it keeps across steps (moving averages, learnable loss
weights) lives in buffers and parameters that a checkpoint stores and restores with
``state_dict()``; learnable parameters (``method.parameters()``) are trained by the loop's
optimizer, and a method sets their ``.grad`` itself inside ``aggregate``.
"""

from __future__ import annotations

import torch

from cogradctl.errors import UsageError


class Method(torch.nn.Module):
    """Base class: subclasses implement ``aggregate`` and, if they keep per-task state, ``setup``.

    Class attributes describe the method for ``cogradctl methods``:
    ``family`` ("loss weighting", "gradient manipulation" or "transference"), ``paper`` and
    ``options`` (option name → one-line description).
    """

    family = ""
    paper = ""
    options: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        self.num_tasks: int | None = None
        # Diagnostics of the last call, logged to metrics.jsonl by the training loop.
        self.stats: dict[str, float | list[float]] = {}

    def setup(self, num_tasks: int) -> None:
        """Allocate per-task state for ``num_tasks`` tasks. Called once before the first step."""
        self.num_tasks = num_tasks

    def forward(self, grads: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        if grads.dim() != 2:
            raise ValueError(f"grads must be a K×P matrix, got shape {tuple(grads.shape)}")
        if losses is not None and losses.shape != (grads.shape[0],):
            raise ValueError(f"losses must be a K-vector, got shape {tuple(losses.shape)} for K={grads.shape[0]}")
        if self.num_tasks != grads.shape[0]:
            self.setup(grads.shape[0])
        return self.aggregate(grads, losses)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def task_weights(self) -> torch.Tensor | None:
        """Weights of each task's gradient on its own task-specific parameters (None: all 1)."""
        return None


def per_task(value: float | list[float] | tuple[float, ...] | torch.Tensor, num_tasks: int, name: str) -> torch.Tensor:
    """A scalar or a K-sequence option as a K-vector; a wrong length names the option."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        return t.expand(num_tasks).clone()
    if t.numel() != num_tasks:
        raise UsageError(f"option {name}: expected one value or {num_tasks} (one per task), got {t.numel()}")
    return t
