"""Building blocks for model plugins (public: third-party plugins may use them too)."""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from cogradctl.schema import Schema


class FeatureInput(nn.Module):
    """Embeds every categorical feature and concatenates the standardised dense features.

    All categorical features share one embedding table with per-feature row offsets (one lookup
    per batch instead of one per feature). Output: B × (C·embedding_dim + D).
    """

    def __init__(self, schema: Schema, embedding_dim: int = 8) -> None:
        super().__init__()
        cards = [f.cardinality for f in schema.categorical]
        # Summed in Python, not with Tensor.cumsum: on the meta device (where every checkpoint's model
        # is first built) that goes through torch's Python decompositions, whose first use imports
        # torch._refs and torch._prims, seconds added to every command's start.
        offsets = torch.tensor(list(accumulate([0, *cards[:-1]])) if cards else [], dtype=torch.long)
        self.register_buffer("offsets", offsets, persistent=False)
        # No categorical features: no embedding table (an unused parameter would count as shared).
        self.embedding = nn.Embedding(sum(cards), embedding_dim) if cards else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.05)
        self.num_categorical = len(cards)
        self.num_dense = len(schema.dense)
        self.out_dim = self.num_categorical * embedding_dim + self.num_dense

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.num_categorical:
            parts.append(self.embedding(batch["categorical"] + self.offsets).flatten(1))
        if self.num_dense:
            parts.append(batch["dense"])
        return torch.cat(parts, dim=1)


def mlp(in_dim: int, hidden: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear → ReLU (→ Dropout) for each hidden size; an empty list is the identity."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


def out_dim(in_dim: int, hidden: list[int]) -> int:
    return hidden[-1] if hidden else in_dim


class Tower(nn.Module):
    """A task's head: an MLP and a linear output of one unit (a logit, or a regression value)."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.body = mlp(in_dim, hidden, dropout)
        self.out = nn.Linear(out_dim(in_dim, hidden), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)).squeeze(-1)


def check_config(**values) -> None:
    """Validate plugin options: sizes are positive integers (or lists of them), dropout in [0, 1).
    A ValueError names the key; ``cogradctl init`` reports it as a usage error (exit 2)."""
    for key, value in values.items():
        if key == "dropout":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
        elif isinstance(value, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                raise ValueError(f"{key} must be a list of positive integers, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def owned_by_prefix(module: nn.Module, prefixes: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """``task_parameters()`` helper: task → names of the parameters that start with its prefixes."""
    names = [n for n, _ in module.named_parameters()]
    return {task: [n for n in names if n.startswith(pre)] for task, pre in prefixes.items()}


# ---------------------------------------------------------------------------- models trained elsewhere


class OriginalIds(nn.Module):
    """Map cogradctl's categorical indices back to the ids a model trained elsewhere expects.

    cogradctl feeds a categorical value as its index 1..V in the feature's vocabulary (the schema
    of the checkpoint, most frequent value first), 0 for a missing value or one outside the
    vocabulary; ``feature.vocab[i - 1]`` is the original value of index i. A team's model was
    trained on its own ids (raw integers, hashes, a vocabulary file): ``to_id(feature_name, value)``
    gives the team's id of an original value (default: the value itself, for integer features),
    and index 0 becomes ``missing_id`` (an int, or ``{feature_name: int}``).

    The table is a non-persistent buffer, rebuilt from the schema and never in the state dict, so
    imported weights need not contain it. ``forward``: B×C indices in the schema's categorical order
    → B×C long ids in the same order; ``index[name]`` is a feature's column, so a plugin can pick
    its model's inputs by name, in its model's order.

    With the ``vocab`` encoding a value that was not in the import sample reaches the model as
    ``missing_id``, whatever the team's pipeline would have made of it. A feature encoded with
    ``identity``, ``hash`` or ``vocab-file`` (``--encoding`` at import) already arrives as the team's
    row: it passes through unchanged (``to_id`` and ``missing_id`` do not apply to it).
    """

    def __init__(self, schema: Schema, to_id=None, missing_id: int | dict[str, int] = 0) -> None:
        super().__init__()
        feats = schema.categorical
        self.index = {f.name: k for k, f in enumerate(feats)}
        tables = []
        for f in feats:
            if f.encoding != "vocab":
                tables.append(torch.arange(f.cardinality, dtype=torch.long))
                continue
            if to_id is None and f.value_type != "int":
                raise ValueError(f"feature '{f.name}' has {f.value_type} values: give to_id(name, value) → int id")
            missing = missing_id.get(f.name, 0) if isinstance(missing_id, dict) else missing_id
            ids = [int(missing)] + [int(v if to_id is None else to_id(f.name, v)) for v in f.vocab]
            tables.append(torch.tensor(ids, dtype=torch.long))
        sizes = [len(t) for t in tables]
        offsets = (
            torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0) if sizes else torch.zeros(0, dtype=torch.long)
        )
        self.register_buffer("offsets", offsets, persistent=False)
        table = torch.cat(tables) if tables else torch.zeros(0, dtype=torch.long)
        self.register_buffer("table", table, persistent=False)

    def forward(self, categorical: torch.Tensor) -> torch.Tensor:
        return self.table[categorical + self.offsets]


class OriginalDense(nn.Module):
    """Undo cogradctl's standardisation of dense features: B×D → the original values.

    cogradctl feeds ``(x − mean) / std`` with the mean and std of the sample ``init``/``import``
    read (a missing value arrives as 0, i.e. as the mean); a model trained elsewhere expects its
    own preprocessing of ``x``. Computed in float64 and returned as float32, so an original float32
    value comes back as it was (to rounding). ``index[name]`` is a feature's column. The statistics
    are non-persistent buffers, rebuilt from the schema and never in the state dict.
    """

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        feats = schema.dense
        self.index = {f.name: k for k, f in enumerate(feats)}
        self.register_buffer("mean", torch.tensor([f.mean for f in feats], dtype=torch.float64), persistent=False)
        self.register_buffer("std", torch.tensor([f.std for f in feats], dtype=torch.float64), persistent=False)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return (dense.double() * self.std + self.mean).float()
