"""Schema inference: ``init`` and ``import`` read every file of ``--data`` once and decide the feature
kinds, vocabularies and normalisation statistics (:func:`infer_schema`).

Hive partition keys (``key=value`` directory names, as :func:`cogradctl.stream.partitions` reads them)
are columns too, exactly as the stream fills them when it reads: a key that a file does not store is a
column of that file holding the key's value (int64 if it parses, else float64, else a string).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.data import (
    _categorical_values,
    _dense_values,
    _short,
    _validate_labels,
    read_file,
    read_schema,
    resolve,
)
from cogradctl.errors import DataError
from cogradctl.schema import Feature, Schema, Task, family, parse_task_types, plan_columns
from cogradctl.stream.files import partition_array, partitions

# The schema (vocabularies included) sits, JSON-escaped, in the checkpoint's safetensors header, which
# safetensors caps at 100 MB ("header too large" when saving). The rest of the header (model config,
# history, training state, one entry per tensor) gets the remaining 10 MB.
SCHEMA_HEADER_BUDGET = 90_000_000


@dataclass
class SchemaOptions:
    """The schema choices ``init`` and ``import`` share, as the command line gives them (lists split)."""

    tasks: list[str]
    task_types: list[str] = field(default_factory=list)  # TASK=binary|regression
    features: list[str] | None = None  # None: every non-task column
    dense: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    max_vocab: int = 100_000
    min_count: int = 1
    exclude: list[str] = field(default_factory=list)  # columns left out of the default (every non-task column)


def infer_from_options(spec: str, opts: SchemaOptions) -> tuple[Schema, int]:
    """The schema of the data ``spec`` under the choices ``opts``: → (schema, rows). One code path for
    ``init`` and ``import``, so a checkpoint imported from a team's weights encodes like one made fresh."""
    types = parse_task_types(opts.task_types, opts.tasks)
    return infer_schema(
        spec,
        opts.tasks,
        types,
        opts.features,
        opts.dense,
        opts.categorical,
        opts.max_vocab,
        opts.min_count,
        exclude=opts.exclude,
    )


def columns_of(path: Path) -> tuple[pa.Schema, dict[str, str]]:
    """The columns of one file as inference sees them: those it stores, then its hive partition keys
    that it does not store (typed as the stream fills them) → (Arrow schema, {key: value})."""
    arrow = read_schema(path)
    keys = {k: v for k, v in partitions(path).items() if k not in arrow.names}
    extra = [pa.field(k, partition_array(v, 0).type) for k, v in keys.items()]
    return pa.schema([*arrow, *extra]), keys


def partition_keys(spec: str) -> list[str]:
    """The hive partition keys the first file of ``spec`` does not store (the columns they make)."""
    return list(columns_of(resolve(spec)[0])[1])


def _read(path: Path, columns: list[str]) -> pa.Table:
    """``columns`` of one file, a partition key filled with its value; a missing one is a DataError."""
    arrow, keys = columns_of(path)
    missing = [c for c in columns if c not in arrow.names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (neither stored nor a partition key of its path; "
            "the first file has them)"
        )
    table = read_file(path, [c for c in columns if c not in keys])
    for c in columns:
        if c in keys:
            table = table.append_column(c, partition_array(keys[c], table.num_rows))
    return table.select(columns)


def infer_schema(
    spec: str,
    tasks: list[str],
    task_types: dict[str, str],
    features: list[str] | None = None,
    dense: list[str] = (),
    categorical: list[str] = (),
    max_vocab: int = 100_000,
    min_count: int = 1,
    *,
    exclude: list[str] = (),
) -> tuple[Schema, int]:
    """Read every file once: the feature kinds, vocabularies, normalisation statistics. → (schema, rows).

    The first file (in sorted order) decides each column's kind; every other file must store each
    column with a type of the same family (:func:`cogradctl.schema.family`: integer and float widths, string and
    dictionary encodings are interchangeable, numbers and strings are not), else a DataError names
    both files and both types."""
    files = resolve(spec)
    first, _ = columns_of(files[0])
    kinds = plan_columns(first, str(files[0]), tasks, features, list(dense), list(categorical), list(exclude))
    kinds_all = {**kinds, **{t: "label" for t in tasks}}
    counts = {c: Counter() for c, k in kinds.items() if k == "categorical"}
    value_types: dict[str, str] = {}
    moments = {c: [0, 0.0, 0.0] for c, k in kinds.items() if k == "dense"}  # n, sum, sum of squares
    rows = 0
    for path in files:
        table = _read(path, [*kinds, *tasks])
        _same_types(table.schema, path, first, files[0], kinds_all)
        rows += table.num_rows
        _validate_labels(table, path, [Task(t, task_types[t]) for t in tasks])
        for col, kind in kinds.items():
            if kind == "categorical":
                _count_values(table.column(col), path, col, counts[col], value_types)
            else:
                _add_moments(_dense_values(table.column(col), path, col), moments[col])
    if rows == 0:
        raise DataError(f"{spec}: the data has no rows")
    feats = [_feature(col, kind, counts, value_types, moments, max_vocab, min_count) for col, kind in kinds.items()]
    schema = Schema(feats, [Task(t, task_types[t]) for t in tasks])
    _check_header_size(spec, schema)
    return schema, rows


def _count_values(arr: pa.ChunkedArray, path: Path, col: str, counts: Counter, value_types: dict[str, str]) -> None:
    try:
        values, vtype = _categorical_values(arr, value_types.get(col))
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(
            f"{path}: categorical column '{col}' is {arr.type}, which cannot be read as a vocabulary "
            f"without loss ({_short(exc)}); store it as int64 or as strings"
        ) from exc
    value_types.setdefault(col, vtype)
    for item in pc.value_counts(values.drop_null()).to_pylist():
        counts[item["values"]] += item["counts"]


def _add_moments(values: np.ndarray, m: list) -> None:
    finite = values[~np.isnan(values)]
    m[0] += finite.size
    m[1] += float(finite.sum())
    m[2] += float(np.square(finite).sum())


def _feature(col, kind, counts, value_types, moments, max_vocab: int, min_count: int) -> Feature:
    if kind == "categorical":
        ranked = sorted(counts[col].items(), key=lambda kv: (-kv[1], str(kv[0])))
        vocab = [v for v, n in ranked if n >= min_count][:max_vocab]
        return Feature(col, "categorical", vocab=vocab, value_type=value_types.get(col, "str"))
    n, s, ss = moments[col]
    mean = s / n if n else 0.0
    var = max(ss / n - mean * mean, 0.0) if n else 0.0
    std = math.sqrt(var) if var > 1e-12 else 1.0
    return Feature(col, "dense", mean=mean, std=std)


def _same_types(arrow: pa.Schema, path: Path, first: pa.Schema, first_path: Path, kinds: dict[str, str]) -> None:
    for col, kind in kinds.items():
        t, t0 = arrow.field(col).type, first.field(col).type
        if family(kind, t) != family(kind, t0):
            what = "task column" if kind == "label" else f"{kind} column"
            raise DataError(
                f"{path}: {what} '{col}' is {t}, but {first_path} stores it as {t0}; every file must store "
                f"a column as the same kind of value (here: {family(kind, t0)}); rewrite one of them"
            )


def _check_header_size(spec: str, schema: Schema) -> None:
    """Refuse a schema too big for the checkpoint header, naming the largest vocabulary's column."""
    size = len(json.dumps(schema.to_json()))  # as it sits, escaped, in the header
    if size <= SCHEMA_HEADER_BUDGET:
        return
    cats = schema.categorical or [None]
    big = max(cats, key=lambda f: len(json.dumps(f.vocab)) if f else 0)
    detail = ""
    if big is not None:
        longest = max((len(str(v)) for v in big.vocab), default=0)
        detail = (
            f"; column '{big.name}' has the largest vocabulary ({len(big.vocab)} values, the longest "
            f"{longest} characters, {len(json.dumps(big.vocab)) / 1e6:.1f} MB)"
        )
    raise DataError(
        f"{spec}: the schema would take {size / 1e6:.1f} MB of the checkpoint header, over the "
        f"{SCHEMA_HEADER_BUDGET / 1e6:.0f} MB it may use (safetensors caps headers at 100 MB){detail}; "
        "lower --max-vocab, raise --min-count, or shorten (hash) the values"
    )
