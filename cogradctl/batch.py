"""The batch a model receives, and how the encoders lay its parts out in two blocks.

``model(batch)`` gets a dict of tensors, B rows each, every part in the schema's feature order:

``"dense"``
    B×D float32: the scalar dense features (standardised, or as stored with ``scaling="none"``).
``"categorical"``
    B×C int64: each categorical feature's embedding row (see :mod:`cogradctl.encodings`).
``"sequence"`` (only when the schema has sequence features)
    B×(L₁+…+L_S) int64: each sequence feature's rows, L_s = its ``max_len`` positions side by side;
    a row's list fills the first positions of its feature's slice (the first ``max_len`` values of
    a longer list), the rest hold the feature's padding row ``pad``.
``"sequence_lengths"`` (with ``"sequence"``)
    B×S int64: each row's number of valid positions per sequence feature (0 for a null or empty list).
``"vector"`` (only when the schema has vector features)
    B×(V₁+…+V_R) float32: each vector feature's values as stored, side by side (a null list is zeros).

:func:`slices` says which columns of ``"sequence"``/``"vector"`` each feature holds. Inside the
library the encoders keep two blocks per row — every float (dense, then vectors) and every integer
(categorical, then sequence rows, then lengths) — and :func:`split` cuts them into the dict.
"""

from __future__ import annotations

import torch

from cogradctl.schema import Schema


def widths(schema: Schema) -> tuple[int, int]:
    """(floats, integers) per row of the two encoded blocks."""
    floats = len(schema.dense) + sum(f.size for f in schema.vectors)
    ints = len(schema.categorical) + sum(f.max_len for f in schema.sequences) + len(schema.sequences)
    return floats, ints


def slices(schema: Schema) -> dict[str, slice]:
    """Each sequence or vector feature's columns in ``batch["sequence"]`` or ``batch["vector"]``."""
    out, at = {}, 0
    for f in schema.sequences:
        out[f.name], at = slice(at, at + f.max_len), at + f.max_len
    at = 0
    for f in schema.vectors:
        out[f.name], at = slice(at, at + f.size), at + f.size
    return out


def split(floats: torch.Tensor, ints: torch.Tensor, schema: Schema) -> dict[str, torch.Tensor]:
    """The two encoded blocks of some rows → the model's batch dict (views, no copies)."""
    d, c = len(schema.dense), len(schema.categorical)
    batch = {"dense": floats[:, :d], "categorical": ints[:, :c]}
    if schema.sequences:
        positions = sum(f.max_len for f in schema.sequences)
        batch["sequence"] = ints[:, c : c + positions]
        batch["sequence_lengths"] = ints[:, c + positions :]
    if schema.vectors:
        batch["vector"] = floats[:, d:]
    return batch
