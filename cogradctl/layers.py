"""Building blocks for model plugins (public: third-party plugins may use them too)."""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from cogradctl.encodings import vocab_array
from cogradctl.schema import Schema

POOLINGS = ("mean", "sum")


class FeatureInput(nn.Module):
    """Embeds every categorical and sequence feature and concatenates them with the dense features
    and vectors (the batch of :mod:`cogradctl.batch`).

    All features share one embedding table with per-feature row offsets (one lookup per batch
    instead of one per feature). A sequence feature's embeddings are pooled over its row's valid
    positions (``pooling``: their mean, or their sum; an empty list gives zeros). Output:
    B × ((C + S)·embedding_dim + D + vector values).
    """

    def __init__(self, schema: Schema, embedding_dim: int = 8, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        cards = [f.cardinality for f in schema.categorical]
        seq_cards = [f.cardinality for f in schema.sequences]
        # Summed in Python, not with Tensor.cumsum: on the meta device (where every checkpoint's model
        # is first built) that goes through torch's Python decompositions, whose first use imports
        # torch._refs and torch._prims, seconds added to every command's start.
        starts = list(accumulate([0, *cards, *seq_cards]))
        self.register_buffer("offsets", torch.tensor(starts[: len(cards)], dtype=torch.long), persistent=False)
        # each sequence position's feature offset, position by position
        positions = [starts[len(cards) + s] for s, f in enumerate(schema.sequences) for _ in range(f.max_len)]
        self.register_buffer("seq_offsets", torch.tensor(positions, dtype=torch.long), persistent=False)
        self.max_lens = [f.max_len for f in schema.sequences]
        # No categorical features: no embedding table (an unused parameter would count as shared).
        rows = sum(cards) + sum(seq_cards)
        self.embedding = nn.Embedding(rows, embedding_dim) if rows else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.05)
        self.pooling = pooling
        self.num_categorical = len(cards)
        self.num_dense = len(schema.dense)
        self.num_vector = sum(f.size for f in schema.vectors)
        self.out_dim = (len(cards) + len(seq_cards)) * embedding_dim + self.num_dense + self.num_vector

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.num_categorical:
            parts.append(self.embedding(batch["categorical"] + self.offsets).flatten(1))
        if self.max_lens:
            parts.append(self._pooled(batch["sequence"], batch["sequence_lengths"]))
        if self.num_dense:
            parts.append(batch["dense"])
        if self.num_vector:
            parts.append(batch["vector"])
        return torch.cat(parts, dim=1)

    def _pooled(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """B × S·embedding_dim: each sequence feature's embeddings pooled over its valid positions."""
        emb = self.embedding(rows + self.seq_offsets)  # B × ΣL × dim
        out = []
        for s, piece in enumerate(torch.split(emb, self.max_lens, dim=1)):
            n = lengths[:, s : s + 1]
            valid = torch.arange(piece.shape[1], device=rows.device) < n  # B × L
            total = (piece * valid.unsqueeze(-1).to(piece.dtype)).sum(dim=1)
            out.append(total / n.clamp(min=1).to(piece.dtype) if self.pooling == "mean" else total)
        return torch.cat(out, dim=1)


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
    """Validate plugin options: sizes are positive integers (or lists of them), dropout in [0, 1),
    pooling one of POOLINGS.
    A ValueError names the key; ``cogradctl init`` reports it as a usage error (exit 2)."""
    for key, value in values.items():
        if key == "pooling":
            if value not in POOLINGS:
                raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {value!r}")
        elif key == "dropout":
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
            values = vocab_array(f).to_pylist()  # plain Python values (a large vocabulary is an Arrow array)
            ids = [int(missing)] + [int(v if to_id is None else to_id(f.name, v)) for v in values]
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
