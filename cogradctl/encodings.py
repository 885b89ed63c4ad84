"""How a categorical feature's values become embedding rows: its encoding, chosen at ``init``/``import``
(``--encoding COLUMN=SPEC``) and stored in the checkpoint's schema.

``vocab``
    (the default) a vocabulary built from the data at ``init``, most frequent value first: value i
    of the vocabulary is row i + 1; row 0 holds missing (null) values and values outside the
    vocabulary (``--max-vocab``/``--min-count`` decide its size). Rows: vocabulary size + 1.
``identity:N``
    the values are already row indices 0..N−1 (label-encoded ids): value v is row v. A null or a
    value outside 0..N−1 has no row: an error, unless ``:oov=R`` names the row it takes (counted).
``hash:N``
    row = ``stable_hash(value) mod N``, the same in every process, platform and version:
    integers (booleans as 0/1) ``splitmix64(v)``, strings ``splitmix64(fnv1a64(UTF-8 bytes))``
    (see :func:`stable_hash`; a team's pipeline can reproduce it). A null is an error unless
    ``:oov=R``.
``vocab-file:PATH:oov=R``
    the team's own vocabulary: a text file of one value per line, line i (from 0) is row i; a value
    not in the file, or a null, takes row R (counted). The file is read once at ``init`` and its
    values stored in the checkpoint (which then needs no file). Rows: max(lines, R + 1, P + 1).

Every encoding takes ``:pad=P``, the row that pads list (sequence) features past their length
(default: the OOV row, or 0); list positions past a row's length are also masked by its lengths.

>>> parse_spec("user", "hash:1000003:oov=0")
Spec(kind='hash', buckets=1000003, path=None, oov=0, pad=None)
>>> [int(b) for b in stable_hash(pa.array([0, 1, 42]), "int") % 1000]
[535, 465, 413]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.errors import DataError, UsageError

KINDS = ("vocab", "identity", "hash", "vocab-file")
LUT_SPAN = 1 << 22  # integer vocabularies spanning at most this many values use a lookup table
SMALL_VOCAB = 4096  # string vocabularies up to this size are matched by Arrow's index_in
_SUFFIX = re.compile(r":(oov|pad)=(-?\d+)$")
SPEC_HELP = "vocab, identity:N, hash:N or vocab-file:PATH:oov=R (each may end in :oov=R and :pad=P)"


@dataclass(frozen=True)
class Spec:
    """A parsed ``--encoding`` value."""

    kind: str
    buckets: int | None = None  # identity/hash: N
    path: str | None = None  # vocab-file
    oov: int | None = None  # the row of values that have none (None: an error; vocab: always 0)
    pad: int | None = None  # the row padding list features


def parse_spec(column: str, text: str) -> Spec:
    """``--encoding COLUMN=TEXT``'s TEXT → a Spec; a UsageError names the column and what is expected."""
    where = f"--encoding {column}={text}"
    rest, extra = text, {}
    while m := _SUFFIX.search(rest):
        if m.group(1) in extra:
            raise UsageError(f"{where}: :{m.group(1)}= is given twice")
        extra[m.group(1)] = int(m.group(2))
        rest = rest[: m.start()]
    kind, _, arg = rest.partition(":")
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown encoding {kind!r}; expected {SPEC_HELP}")
    for key, row in extra.items():
        if row < 0:
            raise UsageError(f"{where}: :{key}={row}: a row must be ≥ 0")
    if kind == "vocab":
        if arg or extra:
            raise UsageError(f"{where}: 'vocab' takes no argument (its OOV and padding row is 0)")
        return Spec("vocab")
    if kind == "vocab-file":
        if not arg:
            raise UsageError(f"{where}: expected vocab-file:PATH:oov=R")
        if "oov" not in extra:
            raise UsageError(f"{where}: a vocabulary file needs its OOV row: vocab-file:{arg}:oov=R")
        return Spec(kind, path=arg, **extra)
    if not arg.isdigit() or int(arg) < 1:
        raise UsageError(f"{where}: expected {kind}:N with N a number of rows ≥ 1, got {arg!r}")
    n = int(arg)
    for key, row in extra.items():
        if row >= n:
            raise UsageError(f"{where}: :{key}={row} is not one of the {n} rows 0..{n - 1}")
    return Spec(kind, buckets=n, **extra)


def parse_specs(items: list[str]) -> dict[str, Spec]:
    """``["user=hash:1000", …]`` → {column: Spec}; a column given twice is an error."""
    out = {}
    for item in items:
        column, sep, text = item.partition("=")
        if not sep or not column or not text:
            raise UsageError(f"--encoding {item!r}: expected COLUMN=ENCODING, ENCODING one of {SPEC_HELP}")
        if column in out:
            raise UsageError(f"--encoding: column '{column}' is given twice")
        out[column] = parse_spec(column, text)
    return out


def read_vocab_file(path: str, value_type: str, column: str) -> list:
    """The values of a vocabulary file (one per line, line i = row i), typed as the column's values;
    a missing file, a value that is not an integer (int columns) or a repeated value is a DataError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--encoding {column}=vocab-file:{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--encoding {column}=vocab-file:{path}: cannot be read as UTF-8 text ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    values: list = lines
    if value_type == "int":
        try:
            values = [int(v) for v in lines]
        except ValueError:
            bad = next(i for i, v in enumerate(lines) if not _is_int(v))
            raise DataError(
                f"{path}: line {bad + 1} ({lines[bad]!r}) is not an integer; column '{column}' has integer values"
            ) from None
    seen: dict = {}
    for i, v in enumerate(values):
        if v in seen:
            raise DataError(f"{path}: value {v!r} is on lines {seen[v] + 1} and {i + 1}; each value may have one row")
        seen[v] = i
    if not values:
        raise DataError(f"{path}: the vocabulary file is empty")
    return values


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- the stable hash

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea & Flood 2014) of uint64 values, modulo 2^64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _fnv1a64(arr: pa.Array) -> np.ndarray:
    """FNV-1a (64-bit) of each string's UTF-8 bytes, vectorised over the strings (nulls hash as "")."""
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max()) if n else 0):
            live = np.flatnonzero(lengths > j)
            h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
    return h


def stable_hash(values: pa.Array, value_type: str) -> np.ndarray:
    """uint64 hashes of non-null ``values`` (int64 for "int", strings for "str"); nulls give 0.

    Integers: ``splitmix64(v mod 2^64)``; strings: ``splitmix64(fnv1a64(UTF-8 bytes))``. Plain
    integer arithmetic, so the same in every process, platform and numpy/pyarrow version (Python's
    own ``hash`` of a string is salted per process and is never used)."""
    if value_type == "int":
        raw = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return _splitmix64(raw.view(np.uint64))
    return _splitmix64(_fnv1a64(values.fill_null("")))


# ---------------------------------------------------------------------------- values → rows


def plain_values(arr, value_type: str) -> pa.Array:
    """A categorical column as one int64 or string array (dictionaries decoded, booleans 0/1)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_boolean(arr.type):
        arr = arr.cast(pa.int8())
    return arr.cast(pa.int64() if value_type == "int" else pa.string())


class Lookup:
    """A categorical feature's values → its embedding rows (int64), one object per feature, built
    once. ``rows(arr)`` → (rows, unmapped): ``unmapped`` marks the non-null values that have no row of
    their own and took the OOV row (counted by the callers). A value that has no row where the
    encoding has no OOV row raises a ValueError saying how many and one of them."""

    def __init__(self, feature) -> None:
        self.feature = feature
        self.kind = feature.encoding
        self.value_type = feature.value_type
        self.oov = 0 if self.kind == "vocab" else feature.oov
        self.lut = self.sorted = None
        if self.kind in ("vocab", "vocab-file"):
            self.base = 1 if self.kind == "vocab" else 0
            self.values = vocab_array(feature)
            if len(self.values) > SMALL_VOCAB or self.value_type == "int":
                self._index()

    def _index(self) -> None:
        """Built once: a lookup table for integers of a small span, else the values' sort order (for
        strings, of their 64-bit hashes, each match then checked against the value itself). Arrow's
        ``index_in`` would hash the whole vocabulary again for every batch."""
        if self.value_type == "int":
            vals = self.values.to_numpy(zero_copy_only=False).astype(np.int64)
            if not len(vals):
                return
            lo, hi = int(vals.min()), int(vals.max())
            if hi - lo <= LUT_SPAN:
                lut = np.full(hi - lo + 1, -1, dtype=np.int64)
                lut[vals - lo] = np.arange(len(vals), dtype=np.int64)
                self.lut = (lo, lut)
                return
        else:
            vals = stable_hash(self.values, "str")
        order = np.argsort(vals)  # the values are distinct: any sort will do
        keys = vals[order]
        if self.value_type == "str" and (keys[1:] == keys[:-1]).any():
            return  # two values share a 64-bit hash: index_in, which compares the values themselves
        self.sorted = (keys, order)

    def rows(self, arr) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        if pa.types.is_dictionary(arr.type) and len(arr.dictionary) < len(arr):
            # the dictionary's rows, then each value's: the dictionary is usually much shorter
            rows, unmapped = self._rows(plain_values(arr.dictionary, self.value_type))
            idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False)
            valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
            rows = rows[idx] if len(rows) else np.zeros(len(arr), np.int64)
            unmapped = unmapped[idx] if len(unmapped) else np.zeros(len(arr), bool)
            if valid is not None:
                rows, unmapped = self._nulls(rows, unmapped, ~valid)
            return rows, unmapped
        return self._rows(plain_values(arr, self.value_type))

    def _rows(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Rows of plain int64/string values (nulls included)."""
        null = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
        if self.kind == "hash":
            rows = (stable_hash(values, self.value_type) % np.uint64(self.feature.buckets)).astype(np.int64)
            unmapped = np.zeros(len(values), bool)
        elif self.kind == "identity":
            v = values.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            unmapped = (v < 0) | (v >= self.feature.buckets)
            if null is not None:
                unmapped &= ~null
            rows = v
        else:
            pos = self._positions(values)
            unmapped = pos < 0
            if null is not None:
                unmapped &= ~null
            rows = pos + self.base
        if unmapped.any():
            if self.oov is None:
                raise ValueError(_no_row(values, unmapped, self.feature))
            rows = np.where(unmapped, self.oov, rows)
        return self._nulls(rows, unmapped, null)

    def _nulls(self, rows, unmapped, null) -> tuple[np.ndarray, np.ndarray]:
        if null is None or not null.any():
            return rows, unmapped
        if self.oov is None:
            raise ValueError(
                f"{int(null.sum())} null value(s), which the {self.kind} encoding gives no row; "
                f"name the row they take with :oov=R at init, or fill them in the data"
            )
        return np.where(null, self.oov, rows), unmapped

    def _positions(self, values: pa.Array) -> np.ndarray:
        """Each value's position in the vocabulary, −1 when it has none (and for nulls)."""
        if self.lut is not None:
            lo, lut = self.lut
            v = values.fill_null(lo - 1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False) - lo
            inside = (v >= 0) & (v < len(lut))
            return np.where(inside, lut[np.clip(v, 0, len(lut) - 1)], -1)
        if self.sorted is not None:
            keys, order = self.sorted
            if self.value_type == "int":
                v = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            else:
                v = stable_hash(values, "str")
            at = np.minimum(np.searchsorted(keys, v), len(keys) - 1)
            pos = np.where(keys[at] == v, order[at], -1)
            if self.value_type == "str":  # a hash match is a match only if the value is the same
                same = pc.equal(values, self.values.take(pa.array(np.maximum(pos, 0))))
                pos = np.where(pc.fill_null(same, False).to_numpy(zero_copy_only=False), pos, -1)
            elif values.null_count:
                pos = np.where(values.is_valid().to_numpy(zero_copy_only=False), pos, -1)
            return pos
        idx = pc.index_in(values, value_set=self.values)
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _no_row(values: pa.Array, unmapped: np.ndarray, feature) -> str:
    example = values.filter(pa.array(unmapped))[0].as_py()
    what = {
        "identity": f"outside 0..{(feature.buckets or 0) - 1}",
        "vocab-file": "not in its vocabulary file",
    }.get(feature.encoding, "without a row")
    return (
        f"{int(unmapped.sum())} value(s) {what} (e.g. {example!r}), and the {feature.encoding} encoding has no "
        "OOV row; name one with :oov=R at init, or fix the data"
    )


def vocab_array(feature) -> pa.Array:
    """A vocabulary (list or Arrow array) as an Arrow int64 or string array."""
    vocab = feature.vocab
    t = pa.int64() if feature.value_type == "int" else pa.string()
    if isinstance(vocab, (pa.Array, pa.ChunkedArray)):
        return (vocab.combine_chunks() if isinstance(vocab, pa.ChunkedArray) else vocab).cast(t)
    return pa.array(vocab, type=t)
