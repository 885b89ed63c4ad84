"""The data schema a checkpoint carries: which columns are features (and how to encode them) and
which are tasks (and of what type). ``init`` infers it from Parquet; every other command validates
data against it.

Encoding: a categorical feature maps its vocabulary to indices 1..V; index 0 is the bucket for
missing and out-of-vocabulary values. A dense feature is standardised with the mean and standard
deviation seen at ``init``; a missing (null) value becomes 0, the mean.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from cogradctl.errors import DataError, UsageError

TASK_TYPES = ("binary", "regression")


@dataclass
class Feature:
    name: str
    kind: str  # "dense" or "categorical"
    vocab: list = field(default_factory=list)  # categorical: values (int or str), index i+1
    value_type: str = ""  # categorical: "int" or "str", the type vocab values are compared as
    mean: float = 0.0  # dense
    std: float = 1.0  # dense

    @property
    def cardinality(self) -> int:
        """Number of embedding rows: the vocabulary plus the OOV/missing bucket 0."""
        return len(self.vocab) + 1


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
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.features] + self.task_names

    def to_json(self) -> str:
        return json.dumps({"features": [asdict(f) for f in self.features], "tasks": [asdict(t) for t in self.tasks]})

    @classmethod
    def from_json(cls, text: str) -> Schema:
        d = json.loads(text)
        return cls([Feature(**f) for f in d["features"]], [Task(**t) for t in d["tasks"]])


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


def plan_columns(
    arrow_schema: pa.Schema,
    source: str,
    tasks: list[str],
    features: list[str] | None,
    dense: list[str],
    categorical: list[str],
) -> dict[str, str]:
    """Decide each feature column's kind from its Arrow type and the overrides: {column: kind}."""
    names = arrow_schema.names
    for col in [*tasks, *(features or []), *dense, *categorical]:
        if col not in names:
            raise DataError(f"{source}: no column '{col}' (columns: {', '.join(names)})")
    both = set(dense) & set(categorical)
    if both:
        raise UsageError(f"column(s) {', '.join(sorted(both))} given to both --dense and --categorical")
    chosen = features if features else [n for n in names if n not in tasks]
    chosen = [c for c in chosen if c not in tasks]
    if not chosen:
        raise UsageError(f"{source}: no feature columns left besides the tasks {', '.join(tasks)}")
    kinds = {}
    for col in chosen:
        t = arrow_schema.field(col).type
        if col in dense:
            if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)):
                raise DataError(f"{source}: column '{col}' is {t}; --dense needs a numeric column")
            kinds[col] = "dense"
        elif col in categorical or is_categorical_type(t):
            if not (is_categorical_type(t) or pa.types.is_floating(t)):
                raise DataError(
                    f"{source}: column '{col}' is {t}; a categorical feature needs integer, string or dictionary values"
                )
            kinds[col] = "categorical"
        elif is_dense_type(t):
            kinds[col] = "dense"
        else:
            raise DataError(
                f"{source}: column '{col}' has type {t}, which is neither dense (float) nor categorical "
                "(integer, string, dictionary); leave it out with --features"
            )
    for task in tasks:
        t = arrow_schema.field(task).type
        if not is_label_type(t):
            raise DataError(f"{source}: task column '{task}' is {t}; labels must be numeric or boolean")
    return kinds
