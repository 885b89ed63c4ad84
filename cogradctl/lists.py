"""List columns encoded: sequence features (lists of categorical values) and vector features
(fixed-length lists of numbers), for both encoders (``data.encode`` and ``stream.Encoder``).

The batch layout they fill is :mod:`cogradctl.batch`'s.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.encodings import Lookup


def _one(arr) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        return arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr


def _layout(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each row's list length, 0 for null; each flattened value's row; its position in its row)."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    parent = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    return lengths, parent, np.arange(len(parent), dtype=np.int64) - starts[parent]


def sequence_rows(arr, lookup: Lookup, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array, int]:
    """A list column of categorical values → (N×max_len rows, padded with the feature's ``pad`` row;
    N lengths, at most max_len; the mask of rows holding a value that took the OOV row; those
    values; the number of rows whose list was cut to its first max_len values). A ValueError (from
    the Lookup) when a value has no row and the encoding no OOV row."""
    arr = _one(arr)
    lengths, parent, pos = _layout(arr)
    values = pc.list_flatten(arr)
    rows, unmapped = lookup.rows(values)
    out = np.full((len(arr), max_len), lookup.feature.pad, dtype=np.int64)
    keep = pos < max_len
    out[parent[keep], pos[keep]] = rows[keep]
    flagged = np.zeros(len(arr), dtype=bool)
    flagged[parent[unmapped]] = True
    unseen = values.filter(pa.array(unmapped)) if unmapped.any() else values.slice(0, 0)
    return out, np.minimum(lengths, max_len), flagged, unseen, int((lengths > max_len).sum())


def vector_values(arr, size: int, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A list column of numbers, ``size`` per row → (N×size float64, a null list or value as 0; the
    mask of rows holding a NaN or infinite value, None when there is none). A row whose list has
    another length is a ValueError (the vector is the model's input width)."""
    arr = _one(arr)
    lengths, parent, pos = _layout(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
    wrong = lengths != size if valid is None else (lengths != size) & valid
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(
            f"vector column '{name}' holds {size} values per row, but {int(wrong.sum())} row(s) hold another "
            f"number (e.g. row {i}: {int(lengths[i])})"
        )
    values = pc.list_flatten(arr).cast(pa.float64()).to_numpy(zero_copy_only=False)  # a null value → NaN
    out = np.zeros((len(arr), size), dtype=np.float64)
    stored = pc.is_valid(pc.list_flatten(arr)).to_numpy(zero_copy_only=False)
    out[parent[stored], pos[stored]] = values[stored]
    bad = ~np.isfinite(values) & stored
    if not bad.any():
        return out, None
    rows = np.zeros(len(arr), dtype=bool)
    rows[parent[bad]] = True
    return out, rows
