"""The data schema a checkpoint carries: which columns are features (and how to encode them) and
which are tasks (and of what type). ``init`` infers it from Parquet; every other command validates
data against it.

Encoding: a categorical feature's values become embedding rows by its ``encoding``
(:mod:`cogradctl.encodings`: ``vocab``, the default, maps its vocabulary to rows 1..V and missing and
out-of-vocabulary values to row 0; ``identity``, ``hash`` and ``vocab-file`` keep a team's own ids).
A dense feature is standardised with the mean and standard deviation seen at ``init``
(``scaling="standard"``; a missing (null) value becomes 0, the mean), or fed as stored
(``scaling="none"``: mean 0 and std 1; a missing value becomes 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.errors import UsageError

TASK_TYPES = ("binary", "regression")


ENCODINGS = ("vocab", "identity", "hash", "vocab-file")
SCALINGS = ("standard", "none")


@dataclass
class Feature:
    name: str
    kind: str  # "dense" or "categorical"
    # categorical: values (int or str; a list, or an Arrow array when read from checkpoint tensors):
    # vocab encoding: value i is row i + 1; vocab-file: value i is row i
    vocab: list = field(default_factory=list)
    value_type: str = ""  # categorical: "int" or "str", the type vocab values are compared as
    mean: float = 0.0  # dense
    std: float = 1.0  # dense
    encoding: str = "vocab"  # categorical: one of ENCODINGS (see cogradctl.encodings)
    buckets: int = 0  # identity/hash: N; vocab-file: the table's rows
    oov: int | None = None  # identity/hash/vocab-file: the row of values without one (None: an error)
    pad: int = 0  # the row that pads list features
    scaling: str = "standard"  # dense: one of SCALINGS ("none": mean 0, std 1)
    vocab_stored: int | None = None  # a vocabulary kept in checkpoint tensors, not yet read: its size
    max_len: int = 0  # sequence: the positions kept per row (a longer list keeps its first max_len)
    size: int = 0  # vector: the values per row

    @property
    def cardinality(self) -> int:
        """Number of embedding rows: ``vocab``: the vocabulary plus the OOV/missing row 0; else ``buckets``."""
        if self.encoding != "vocab":
            return self.buckets
        return (len(self.vocab) if self.vocab_stored is None else self.vocab_stored) + 1


@dataclass
class Task:
    name: str
    type: str = "binary"


@dataclass
class Schema:
    features: list[Feature]
    tasks: list[Task]

    @property
    def dense(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "dense"]

    @property
    def categorical(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def sequences(self) -> list[Feature]:
        """List columns of categorical values (click histories, tags), encoded like categorical ones."""
        return [f for f in self.features if f.kind == "sequence"]

    @property
    def vectors(self) -> list[Feature]:
        """Fixed-length list columns of numbers, fed as stored."""
        return [f for f in self.features if f.kind == "vector"]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.features] + self.task_names

    def to_json(self) -> str:
        return json.dumps({"features": [_as_dict(f) for f in self.features], "tasks": [asdict(t) for t in self.tasks]})

    @classmethod
    def from_json(cls, text: str) -> Schema:
        """The schema of ``text``, validated (``from_dict``); a ValueError says what is wrong."""
        try:
            d = json.loads(text)
        except RecursionError:
            raise ValueError("schema: nested too deeply") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d) -> Schema:
        """A schema from its JSON form, every field checked: a ValueError names the first problem
        (unknown kinds, task types or value types, vocabularies of the wrong type or with repeats,
        non-finite means, standard deviations that are not positive, repeated names)."""
        if not isinstance(d, dict) or not isinstance(d.get("features"), list) or not isinstance(d.get("tasks"), list):
            raise ValueError("schema: expected an object with lists 'features' and 'tasks'")
        features = [_feature(f, i) for i, f in enumerate(d["features"])]
        tasks = [_task(t, i) for i, t in enumerate(d["tasks"])]
        if not features or not tasks:
            raise ValueError("schema: needs at least one feature and one task")
        seen: set[str] = set()
        for name in [f.name for f in features] + [t.name for t in tasks]:
            if name in seen:
                raise ValueError(f"schema: column '{name}' is listed twice (features and tasks have distinct names)")
            seen.add(name)
        return cls(features, tasks)


def _as_dict(f: Feature) -> dict:
    """A feature's JSON form: an Arrow vocabulary as a list."""
    vocab = f.vocab.to_pylist() if isinstance(f.vocab, (pa.Array, pa.ChunkedArray)) else f.vocab
    return {**asdict(replace(f, vocab=[])), "vocab": vocab}


def _fields_of(kind, d, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"schema: {where} is not an object")
    unknown = sorted(set(d) - {f.name for f in fields(kind)})
    if unknown:
        raise ValueError(f"schema: {where} has unknown field(s) {', '.join(map(str, unknown))}")
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise ValueError(f"schema: {where} has no name")
    return d


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _feature(d, i: int) -> Feature:
    d = _fields_of(Feature, d, f"feature {i}")
    f = Feature(**d)
    where = f"schema: feature '{f.name}'"
    if f.kind == "dense":
        if not _number(f.mean) or not _number(f.std) or not f.std > 0:
            raise ValueError(f"{where}: mean and std must be finite numbers, std > 0 (got {f.mean!r}, {f.std!r})")
        if f.scaling not in SCALINGS or (f.scaling == "none" and (f.mean, f.std) != (0, 1)):
            raise ValueError(f"{where}: scaling must be 'standard' or 'none' (with mean 0, std 1), got {f.scaling!r}")
    elif f.kind in ("categorical", "sequence"):
        if f.value_type not in ("int", "str"):
            raise ValueError(f"{where}: value_type must be 'int' or 'str', got {f.value_type!r}")
        check_vocab(f, where)
        _check_rows(f, where)
        if (f.kind == "sequence") != _row(f.max_len - 1, 1 << 31):
            raise ValueError(
                f"{where}: max_len must be a positive integer for a sequence feature (only), got {f.max_len!r}"
            )
    elif f.kind == "vector":
        if not _row(f.size - 1, 1 << 31) or (f.mean, f.std, f.scaling) != (0, 1, "none"):
            raise ValueError(f"{where}: a vector feature has a size ≥ 1 and is fed as stored (scaling none)")
    else:
        raise ValueError(f"{where}: kind must be dense, categorical, sequence or vector, got {f.kind!r}")
    if f.kind != "sequence" and f.max_len or f.kind != "vector" and f.size:
        raise ValueError(f"{where}: max_len is for sequence features and size for vector features")
    return f


def check_vocab(f: Feature, where: str) -> None:
    """A vocabulary holds values of the feature's value type, each once (a list, or an Arrow array)."""
    if isinstance(f.vocab, (pa.Array, pa.ChunkedArray)):
        want = pa.int64() if f.value_type == "int" else pa.string()
        if f.vocab.type != want:
            raise ValueError(f"{where}: vocab values must all be {f.value_type}")
        if f.vocab.null_count or not _distinct(f.vocab):
            raise ValueError(f"{where}: vocab lists a value twice (or a null)")
        return
    if not isinstance(f.vocab, list):
        raise ValueError(f"{where}: vocab is not a list")
    want = str if f.value_type == "str" else int
    if not all(isinstance(v, want) and not isinstance(v, bool) for v in f.vocab):
        raise ValueError(f"{where}: vocab values must all be {f.value_type}")
    if len(set(f.vocab)) != len(f.vocab):
        raise ValueError(f"{where}: vocab lists a value twice")


def _distinct(values: pa.Array) -> bool:
    """Whether no value repeats (integers by sorting: cheaper than hashing ten million of them)."""
    if pa.types.is_integer(values.type):
        v = np.sort(values.to_numpy(zero_copy_only=False))
        return not (v[1:] == v[:-1]).any()
    return pc.count_distinct(values).as_py() == len(values)


def _row(value, rows: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < rows


def _check_rows(f: Feature, where: str) -> None:
    """The encoding's fields agree: its rows, OOV row and padding row (see ``cogradctl.encodings``)."""
    if f.encoding not in ENCODINGS:
        raise ValueError(f"{where}: encoding must be one of {', '.join(ENCODINGS)}, got {f.encoding!r}")
    stored = f.vocab_stored
    if stored is not None and (not _row(stored, 1 << 62) or len(f.vocab)):
        raise ValueError(f"{where}: vocab_stored must be a size ≥ 0 with an empty inline vocab")
    if f.encoding == "vocab":
        if f.buckets != 0 or f.oov not in (None, 0) or f.pad != 0:
            raise ValueError(f"{where}: the vocab encoding has no buckets and OOV and padding row 0")
        return
    if not _row(f.buckets, 1 << 62) or f.buckets < 1:
        raise ValueError(f"{where}: buckets must be a positive integer, got {f.buckets!r}")
    if f.oov is not None and not _row(f.oov, f.buckets) or not _row(f.pad, f.buckets):
        raise ValueError(f"{where}: oov and pad must be rows 0..{f.buckets - 1} (got {f.oov!r}, {f.pad!r})")
    size = len(f.vocab) if stored is None else stored
    if f.encoding == "vocab-file":
        if f.oov is None or size < 1 or size > f.buckets:
            raise ValueError(f"{where}: a vocab-file encoding needs values, an OOV row and buckets ≥ its values")
    elif size:
        raise ValueError(f"{where}: the {f.encoding} encoding keeps no vocabulary")
    if f.encoding == "identity" and f.value_type != "int":
        raise ValueError(f"{where}: the identity encoding needs integer values")


def _task(d, i: int) -> Task:
    t = Task(**_fields_of(Task, d, f"task {i}"))
    if t.type not in TASK_TYPES:
        raise ValueError(f"schema: task '{t.name}' has type {t.type!r}; expected one of {', '.join(TASK_TYPES)}")
    return t


def is_dense_type(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def is_categorical_type(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_dictionary(t)
        or pa.types.is_boolean(t)
    )


def family(kind: str, t: pa.DataType) -> str:
    """What a column of Arrow type ``t`` is read as for ``kind``: dense features and labels are read as
    float64 (any integer, float or boolean is a number); categorical values as int64 (integers,
    booleans), as strings (string, large string) or as the string form of a float; a dictionary as
    its values; a list column as ``list<…>`` of its values' family. Two files agree on a column
    when its family is the same in both."""
    if kind in ("sequence", "vector"):
        if not is_list_type(t):
            return str(t)
        return f"list<{family('categorical' if kind == 'sequence' else 'dense', t.value_type)}>"
    if pa.types.is_dictionary(t):
        t = t.value_type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    if kind != "categorical":
        return "number" if numeric else str(t)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return "integer"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return "float" if pa.types.is_floating(t) else str(t)


def is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_numeric_type(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)


# What a column of each feature kind may hold, in words, and the test of an Arrow type.
ACCEPTS = {
    "dense": ("numeric", is_numeric_type),
    "categorical": (
        "integer, boolean, string or dictionary",
        lambda t: is_categorical_type(t) or pa.types.is_floating(t),
    ),
    "sequence": ("list of integers or strings", lambda t: is_list_type(t) and is_categorical_type(t.value_type)),
    "vector": ("list of numbers", lambda t: is_list_type(t) and is_numeric_type(t.value_type)),
}


def type_problem(f: Feature, t: pa.DataType) -> str | None:
    """What is wrong with a column of Arrow type ``t`` for feature ``f``, or None: the kind's types
    (``ACCEPTS``), and for categorical and sequence values the value type the vocabulary or hash
    was made for (numbers where init saw strings would only match by accident: "007" → 7)."""
    expected, ok = ACCEPTS[f.kind]
    if not ok(t):
        return f"is {t}; the checkpoint expects a {expected} {f.kind} feature"
    if f.kind in ("categorical", "sequence"):
        values = t.value_type if f.kind == "sequence" else t
        if (family("categorical", values) == "integer") != (f.value_type == "int"):
            holds = "integers" if f.value_type == "int" else "strings"
            return f"is {t}; the checkpoint's {f.kind} feature holds {holds}"
    return None


def is_label_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def parse_task_types(specs: list[str], tasks: list[str]) -> dict[str, str]:
    """``["ctr=binary", "dwell=regression"]`` → {task: type}; every task defaults to binary."""
    types = {t: "binary" for t in tasks}
    for spec in specs:
        name, sep, kind = spec.partition("=")
        if not sep or name not in types or kind not in TASK_TYPES:
            raise UsageError(
                f"--task-type {spec!r}: expected TASK=TYPE with TASK one of {', '.join(tasks)} "
                f"and TYPE one of {', '.join(TASK_TYPES)}"
            )
        types[name] = kind
    return types
