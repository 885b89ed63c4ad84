"""The output contract of a model (built-in or plugin), checked once before anything is written.

Every command calls ``model(batch)`` with ``batch = {"dense": B×D float32, "categorical": B×C
int64}`` (and the list features' parts, :mod:`cogradctl.batch`) and reads ``outputs[task]`` as the B-vector of that task's logits (binary) or values
(regression): ``taskgrad.task_losses`` feeds it to ``binary_cross_entropy_with_logits``/``mse_loss``
against the B-vector of labels, ``evaluate`` writes it into one column of an N×K array. A plugin
that returns B×1 (or a list, or misses a task) would otherwise pass ``init`` and fail later as a
bug, after ``train`` has written its run directory. ``init``, ``import`` and ``train`` call
:func:`check_output` right after building the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cogradctl.batch import split, widths
from cogradctl.errors import PluginError
from cogradctl.schema import Schema

ROWS = 4  # rows of the probe batch


def probe_batch(schema: Schema, device: torch.device | str, rows: int = ROWS) -> dict[str, torch.Tensor]:
    """A small batch of the model's input form: standardised dense values and vectors, each categorical
    and sequence feature's padding row (row 0 unless its encoding names another; every table has
    it), sequence lengths 0, 1, 2, … up to each feature's max_len."""
    gen = torch.Generator().manual_seed(0)
    floats, _ = widths(schema)
    pads = [f.pad for f in schema.categorical]
    pads += [f.pad for f in schema.sequences for _ in range(f.max_len)]
    lengths = [[min(r, f.max_len) for f in schema.sequences] for r in range(rows)]
    block = torch.tensor(pads, dtype=torch.long).repeat(rows, 1)
    block = torch.cat([block, torch.tensor(lengths, dtype=torch.long).reshape(rows, -1)], dim=1)
    return split(torch.randn(rows, floats, generator=gen).to(device), block.to(device), schema)


def check_output(model: torch.nn.Module, schema: Schema, plugin: str, rows: int = ROWS) -> None:
    """PluginError (exit 2) naming ``plugin``, the task, the expected and the actual output unless
    ``model`` maps a ``rows``-row batch to ``{task: floating tensor of shape (rows,)}`` for every task
    of ``schema``. The model's train/eval mode and its parameters are left as they were."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(probe_batch(schema, device, rows))
    finally:
        model.train(was_training)
    where = f"model {plugin!r}: forward"
    if not isinstance(outputs, Mapping):
        raise PluginError(
            f"{where} returned {type(outputs).__name__}; expected a dict of task name → tensor of shape ({rows},) "
            f"for a batch of {rows} rows (tasks {', '.join(schema.task_names)})"
        )
    for task in schema.task_names:
        if task not in outputs:
            raise PluginError(f"{where} returned no output for task {task!r} (keys: {', '.join(map(str, outputs))})")
        out = outputs[task]
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            kind = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.dtype} tensor"
            raise PluginError(
                f"{where} returned {kind} for task {task!r}; expected a floating tensor of shape ({rows},)"
            )
        if tuple(out.shape) != (rows,):
            raise PluginError(
                f"{where} returned shape {tuple(out.shape)} for task {task!r} on a batch of {rows} rows; expected "
                f"({rows},), one value per row (e.g. .squeeze(-1) a B×1 output)"
            )
