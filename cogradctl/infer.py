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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.columns import plan_columns
from cogradctl.data import _categorical_values, _dense_values, _validate_labels
from cogradctl.encodings import Lookup, Spec, read_vocab_file
from cogradctl.errors import DataError, UsageError
from cogradctl.parquet_files import _short, read_file, read_schema, resolve
from cogradctl.schema import Feature, Schema, Task, family, parse_task_types
from cogradctl.stream.files import partition_array, partitions
from cogradctl.vocab_tensors import vocab_tensors

# The schema (vocabularies of up to vocab_tensors.INLINE_VOCAB values included) sits, JSON-escaped, in
# the checkpoint's safetensors header, which safetensors caps at 100 MB ("header too large" when
# saving). The rest of the header (model config, history, training state, one entry per tensor) gets
# the remaining 10 MB.
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
    encodings: dict[str, Spec] = field(default_factory=dict)  # column → its --encoding (default vocab)
    scaling: dict[str, str] = field(default_factory=dict)  # dense column → standard|none ("*": every one)
    max_len: dict[str, int] = field(default_factory=dict)  # sequence column → positions kept (default: the longest)


def infer_from_options(spec: str, opts: SchemaOptions) -> tuple[Schema, int, dict]:
    """The schema of the data ``spec`` under the choices ``opts``: → (schema, rows, report: per
    categorical column, its encoding and what it did to the data — values cut from a vocabulary,
    values without a row). One code path for ``init`` and ``import``, so a checkpoint imported from
    a team's weights encodes like one made fresh."""
    types = parse_task_types(opts.task_types, opts.tasks)
    return _infer(spec, opts.tasks, types, opts.features, opts.dense, opts.categorical, opts)


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
    """The schema with the default encodings (vocabularies, standardised dense features): → (schema, rows)."""
    opts = SchemaOptions(list(tasks), max_vocab=max_vocab, min_count=min_count, exclude=list(exclude))
    schema, rows, _ = _infer(spec, tasks, task_types, features, dense, categorical, opts)
    return schema, rows


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


def _infer(spec, tasks, task_types, features, dense, categorical, opts: SchemaOptions) -> tuple[Schema, int, dict]:
    """Read every file once: the feature kinds, vocabularies, normalisation statistics, and what each
    categorical encoding makes of the data. → (schema, rows, report).

    The first file (in sorted order) decides each column's kind; every other file must store each
    column with a type of the same family (:func:`cogradctl.schema.family`: integer and float widths, string and
    dictionary encodings are interchangeable, numbers and strings are not), else a DataError names
    both files and both types."""
    files = resolve(spec)
    first, _ = columns_of(files[0])
    kinds = plan_columns(first, str(files[0]), tasks, features, list(dense), list(categorical), list(opts.exclude))
    _check_choices(kinds, opts)
    kinds_all = {**kinds, **{t: "label" for t in tasks}}
    cats = {
        c: _Column(c, opts.encodings.get(c, Spec("vocab")), first.field(c).type, k, opts.max_len.get(c))
        for c, k in kinds.items()
        if k in ("categorical", "sequence")
    }
    vectors = {c: _Vector(c, first.field(c).type) for c, k in kinds.items() if k == "vector"}
    moments = {c: [0, 0.0, 0.0] for c, k in kinds.items() if k == "dense"}  # n, sum, sum of squares
    rows = 0
    for path in files:
        table = _read(path, [*kinds, *tasks])
        _same_types(table.schema, path, first, files[0], kinds_all)
        rows += table.num_rows
        _validate_labels(table, path, [Task(t, task_types[t]) for t in tasks])
        for col in kinds:
            if col in cats:
                cats[col].read(table.column(col), path)
            elif col in vectors:
                vectors[col].read(table.column(col), path)
            else:
                _add_moments(_dense_values(table.column(col), path, col), moments[col])
    if rows == 0:
        raise DataError(f"{spec}: the data has no rows")
    feats = [
        cats[col].feature(opts.max_vocab, opts.min_count)
        if col in cats
        else vectors[col].feature()
        if col in vectors
        else _dense(col, moments[col], opts.scaling.get(col, opts.scaling.get("*", "standard")))
        for col, kind in kinds.items()
    ]
    schema = Schema(feats, [Task(t, task_types[t]) for t in tasks])
    _check_header_size(spec, schema)
    return schema, rows, {c: cats[c].report for c in cats}


def _check_choices(kinds: dict[str, str], opts: SchemaOptions) -> None:
    """Every --encoding names a categorical feature and every --dense-scaling column a dense one."""
    for col in opts.encodings:
        if kinds.get(col) not in ("categorical", "sequence"):
            what = "not a feature" if col not in kinds else f"a {kinds[col]} feature"
            raise UsageError(
                f"--encoding {col}=…: '{col}' is {what}; encodings are for categorical and sequence features"
            )
    for col in opts.max_len:
        if kinds.get(col) != "sequence":
            what = "not a feature" if col not in kinds else f"a {kinds[col]} feature"
            raise UsageError(f"--max-len {col}=…: '{col}' is {what}; a maximum length is for sequence (list) features")
    for col in opts.scaling:
        if col != "*" and kinds.get(col) != "dense":
            what = "not a feature" if col not in kinds else "a categorical feature"
            raise UsageError(f"--dense-scaling {col}=…: '{col}' is {what}; scaling is for dense features")


class _Column:
    """One categorical or sequence column while inference reads the files: its value type (from the
    first file), its value counts (vocab encoding) or its rows under the encoding (the others), for
    a sequence its longest list, and the report."""

    def __init__(self, name: str, spec: Spec, arrow_type: pa.DataType, kind: str, max_len: int | None) -> None:
        self.name, self.spec, self.kind, self.max_len = name, spec, kind, max_len
        self.value_type = _value_type(arrow_type.value_type if kind == "sequence" else arrow_type)
        self.counts: Counter = Counter()
        self.report: dict = {"encoding": spec.kind}
        if kind == "sequence":
            self.report.update(longest=0, cut_rows=0)
        self.lookup = None
        if spec.kind != "vocab":
            if spec.kind == "identity" and self.value_type != "int":
                raise UsageError(
                    f"--encoding {name}=identity:…: column '{name}' holds {arrow_type} values; "
                    "identity needs integer row indices (use hash:N or vocab-file for other values)"
                )
            self.lookup = Lookup(self._feature(0, 1))
            # a sequence's values are counted one by one (a row holds many)
            unit = "values" if kind == "sequence" else "rows"
            self.report.update({"rows": self.lookup.feature.cardinality, f"unmapped_{unit}": 0, f"null_{unit}": 0})

    def read(self, arr: pa.ChunkedArray, path: Path) -> None:
        if self.kind == "sequence":
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
            self.report["longest"] = max(self.report["longest"], int(lengths.max()) if len(lengths) else 0)
            if self.max_len is not None:
                self.report["cut_rows"] += int((lengths > self.max_len).sum())
            arr = pc.list_flatten(arr)
        if self.lookup is None:
            _count_values(arr, path, self.name, self.counts, self.value_type)
            return
        try:
            _, unmapped = self.lookup.rows(arr)
        except ValueError as exc:
            raise DataError(f"{path}: {self.kind} column '{self.name}': {exc}") from None
        except (pa.ArrowException, TypeError) as exc:
            raise DataError(f"{path}: {self.kind} column '{self.name}' cannot be encoded ({_short(exc)})") from exc
        unit = "values" if self.kind == "sequence" else "rows"
        self.report[f"unmapped_{unit}"] += int(unmapped.sum())
        self.report[f"null_{unit}"] += arr.null_count

    def feature(self, max_vocab: int, min_count: int) -> Feature:
        feature = self._feature(max_vocab, min_count)
        if self.kind == "sequence":
            max_len = self.max_len or max(self.report["longest"], 1)
            self.report["max_len"] = max_len
            feature = replace(feature, kind="sequence", max_len=max_len)
        return feature

    def _feature(self, max_vocab: int, min_count: int) -> Feature:
        spec, name = self.spec, self.name
        if spec.kind == "vocab":
            return self._vocab(max_vocab, min_count)
        pad = spec.pad if spec.pad is not None else (spec.oov or 0)
        if spec.kind == "vocab-file":
            if self.lookup is not None:
                return self.lookup.feature
            values = read_vocab_file(spec.path, self.value_type, name)
            rows = max(len(values), spec.oov + 1, pad + 1)
            return Feature(
                name,
                "categorical",
                vocab=values,
                value_type=self.value_type,
                encoding=spec.kind,
                buckets=rows,
                oov=spec.oov,
                pad=pad,
            )
        return Feature(
            name,
            "categorical",
            value_type=self.value_type,
            encoding=spec.kind,
            buckets=spec.buckets,
            oov=spec.oov,
            pad=pad,
        )

    def _vocab(self, max_vocab: int, min_count: int) -> Feature:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        frequent = [(v, n) for v, n in ranked if n >= min_count]
        vocab = [v for v, _ in frequent[:max_vocab]]
        rare, cut = ranked[len(frequent) :], frequent[max_vocab:]
        self.report.update(
            values=len(vocab),
            distinct=len(ranked),
            cut_by_max_vocab={"values": len(cut), "rows": sum(n for _, n in cut)},
            cut_by_min_count={"values": len(rare), "rows": sum(n for _, n in rare)},
        )
        return Feature(self.name, "categorical", vocab=vocab, value_type=self.value_type)


class _Vector:
    """One vector column while inference reads the files: its length, the same in every row."""

    def __init__(self, name: str, arrow_type: pa.DataType) -> None:
        self.name = name
        self.size = arrow_type.list_size if pa.types.is_fixed_size_list(arrow_type) else None

    def read(self, arr: pa.ChunkedArray, path: Path) -> None:
        lengths = pc.list_value_length(arr).drop_null().to_numpy(zero_copy_only=False)
        found = set(np.unique(lengths).tolist()) | ({self.size} if self.size is not None else set())
        if len(found) > 1:
            raise DataError(
                f"{path}: vector column '{self.name}' holds lists of {', '.join(map(str, sorted(found)))} values; "
                "a vector feature has one length in every row (pad it, or give it as a sequence with --categorical)"
            )
        self.size = found.pop() if found else self.size

    def feature(self) -> Feature:
        if not self.size:
            raise DataError(f"vector column '{self.name}': no row holds a value, so its length is unknown")
        return Feature(self.name, "vector", size=self.size, scaling="none")


def _value_type(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return "int" if (pa.types.is_integer(t) or pa.types.is_boolean(t)) else "str"


def _dense(col: str, m: list, scaling: str) -> Feature:
    if scaling == "none":
        return Feature(col, "dense", mean=0.0, std=1.0, scaling="none")
    n, s, ss = m
    mean = s / n if n else 0.0
    var = max(ss / n - mean * mean, 0.0) if n else 0.0
    std = math.sqrt(var) if var > 1e-12 else 1.0
    return Feature(col, "dense", mean=mean, std=std)


def _count_values(arr: pa.ChunkedArray, path: Path, col: str, counts: Counter, value_type: str) -> None:
    try:
        values, _ = _categorical_values(arr, value_type)
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(
            f"{path}: categorical column '{col}' is {arr.type}, which cannot be read as a vocabulary "
            f"without loss ({_short(exc)}); store it as int64 or as strings"
        ) from exc
    for item in pc.value_counts(values.drop_null()).to_pylist():
        counts[item["values"]] += item["counts"]


def _add_moments(values: np.ndarray, m: list) -> None:
    finite = values[~np.isnan(values)]
    m[0] += finite.size
    m[1] += float(finite.sum())
    m[2] += float(np.square(finite).sum())


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
    """Refuse a schema too big for the checkpoint header, naming the largest vocabulary's column. The
    header holds vocabularies of up to INLINE_VOCAB values (larger ones are tensors): many long
    values can still overflow it."""
    inline, _ = vocab_tensors(schema)
    size = len(json.dumps(inline.to_json()))  # as it sits, escaped, in the header
    if size <= SCHEMA_HEADER_BUDGET:
        return
    cats = [f for f in inline.features if f.kind in ("categorical", "sequence")] or [None]
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
