"""The generator of ``sample_data/``: a synthetic multi-task dataset of known task relatedness.

The construction follows the synthetic data of the MMoE paper (Ma et al. 2018, §4): each task t
has a weight vector w_t on a latent vector z, with cos(w_anchor, w_t) = ρ_t set by the caller, and
a regression target y_t = w_tᵀz + Σ_k sin(a_k w_tᵀz + b_k) + noise that is shared in form across
tasks. Here the latent z is what the features reveal — six dense features directly, and the
embeddings of three categorical features (a string, a small and a larger integer id) — and each
task's binary label is 1 for the top ``rate_t`` fraction of y_t. The first task is the anchor
(ρ = 1); tasks with ρ near 1 are related to it, ρ near 0 unrelated, ρ < 0 opposed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cogradctl.atomic_files import atomic_write_bytes

DEFAULT_TASKS = {"click": (1.0, 0.30), "like": (0.8, 0.20), "share": (-0.5, 0.10)}  # name: (ρ, positive rate)
DEVICES = ["android", "ios", "web"]
KINDS = ("mtl", "ctr-cvr")  # sample-data --kind: the data sets generate and generate_ctr_cvr write
CTR_CVR_TASKS = {"click": (1.0, 0.30), "purchase": (0.6, 0.30)}  # purchase: null where click = 0
WEIGHT_VALUES = (0.5, 1.0, 2.0)  # the ctr-cvr data's row weights, drawn uniformly
HISTORY_MAX = 8  # the ctr-cvr data's history lists: 0 to this many categories
NUM_DENSE, NUM_CATEGORY, NUM_USER_BUCKET = 6, 50, 200
LATENT = NUM_DENSE + 1 + 2 + 2  # dense, device, category, user_bucket dimensions
SINES = 10


def generate(
    rows: int,
    tasks: dict[str, tuple[float, float]] = DEFAULT_TASKS,
    seed: int = 0,
    noise: float = 0.5,
    world_seed: int = 1234,
) -> pa.Table:
    """``rows`` rows of features and binary task labels.

    ``world_seed`` fixes the hidden structure (task weights, embeddings, label thresholds) so that
    train and validation splits drawn with different ``seed`` come from the same distribution.
    """
    world = World(tasks, world_seed)
    rng = np.random.default_rng(seed)
    dense, device, category, user_bucket, z = world.draw(rng, rows)
    columns: dict[str, pa.Array] = {f"f{k}": pa.array(dense[:, k].astype(np.float32)) for k in range(NUM_DENSE)}
    columns["device"] = pa.array([DEVICES[d] for d in device], type=pa.string())
    columns["category"] = pa.array(category.astype(np.int32))
    columns["user_bucket"] = pa.array(user_bucket.astype(np.int32))
    for name in tasks:
        y = world.score(name, z) + noise * rng.standard_normal(rows)
        columns[name] = pa.array((y > world.thresholds[name]).astype(np.int8))
    return pa.table(columns)


class World:
    """The hidden structure shared by every split: task directions, embeddings, thresholds."""

    def __init__(self, tasks: dict[str, tuple[float, float]], world_seed: int) -> None:
        if len(tasks) > LATENT - 1:
            raise ValueError(f"at most {LATENT - 1} tasks")
        rng = np.random.default_rng(world_seed)
        # Orthonormal directions: column 0 is the anchor, column k+1 the private direction of task k.
        basis, _ = np.linalg.qr(rng.standard_normal((LATENT, LATENT)))
        self.weights = {}
        for k, (name, (rho, _rate)) in enumerate(tasks.items()):
            if not -1.0 <= rho <= 1.0:
                raise ValueError(f"task {name}: relatedness must be in [-1, 1], got {rho}")
            self.weights[name] = rho * basis[:, 0] + math.sqrt(max(0.0, 1.0 - rho * rho)) * basis[:, k + 1]
        self.a, self.b = rng.normal(size=SINES), rng.normal(size=SINES)
        self.device_p = np.array([0.5, 0.35, 0.15])
        self.device_emb = rng.normal(size=(len(DEVICES), 1))
        self.category_emb = rng.normal(size=(NUM_CATEGORY, 2))
        self.user_emb = rng.normal(size=(NUM_USER_BUCKET, 2))
        # Each task's threshold: the (1 - rate) quantile of its noise-free score on a reference draw.
        z = self.draw(np.random.default_rng(world_seed + 1), 50_000)[-1]
        self.thresholds = {
            name: float(np.quantile(self.score(name, z), 1.0 - rate)) for name, (_rho, rate) in tasks.items()
        }

    def draw(self, rng: np.random.Generator, rows: int):
        dense = rng.standard_normal((rows, NUM_DENSE))
        device = rng.choice(len(DEVICES), size=rows, p=self.device_p)
        category = np.minimum(rng.zipf(1.3, size=rows) - 1, NUM_CATEGORY - 1)
        user_bucket = rng.integers(0, NUM_USER_BUCKET, size=rows)
        z = np.concatenate(
            [dense, self.device_emb[device], self.category_emb[category], self.user_emb[user_bucket]], axis=1
        )
        return dense, device, category, user_bucket, z

    def score(self, task: str, z: np.ndarray) -> np.ndarray:
        """Noise-free score: 2·w_tᵀz plus a sum of sines of it (the MMoE paper's nonlinearity)."""
        s = 2.0 * (z @ self.weights[task])
        return s + np.sin(np.outer(s, self.a) + self.b).sum(axis=1) / math.sqrt(SINES)


def generate_ctr_cvr(rows: int, seed: int = 0, world_seed: int = 1234) -> pa.Table:
    """``rows`` rows of a CTR/CVR-style data set (``sample-data --kind ctr-cvr``): the features of
    :func:`generate`, a ``click`` task and a ``purchase`` task (conversion) that is observed only
    after a click: null where click = 0 (a partial label, masked by ``--missing-labels mask``), a
    ``history`` list column (browsed categories: a sequence feature), and a ``weight`` column of row weights drawn from WEIGHT_VALUES (``--weight-column weight``).
    Among clicks, a purchase is the top rate fraction of its own score, related to click's by ρ."""
    table = generate(rows, CTR_CVR_TASKS, seed=seed, world_seed=world_seed)
    click = table.column("click").to_numpy(zero_copy_only=False)
    purchase = table.column("purchase").to_numpy(zero_copy_only=False)
    at = table.schema.get_field_index("purchase")
    table = table.set_column(at, "purchase", pa.array(purchase, mask=click == 0, type=pa.int8()))
    rng = np.random.default_rng([seed, 0xC0C0])
    weight = pa.array(rng.choice(WEIGHT_VALUES, size=rows).astype(np.float32))
    table = table.append_column("history", _history(table.column("category").to_numpy(), rng))
    return table.append_column("weight", weight)


def _history(category: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """A list column (a sequence feature): the categories a user browsed before, 0 to HISTORY_MAX of
    them, most recent first; the row's own category is among them four times in five, so the list
    carries some of the signal the category column does."""
    lengths = rng.integers(0, HISTORY_MAX + 1, size=len(category))
    values = np.minimum(rng.zipf(1.3, size=int(lengths.sum())) - 1, NUM_CATEGORY - 1)
    starts = np.cumsum(lengths) - lengths
    own = (lengths > 0) & (rng.random(len(category)) < 0.8)
    values[starts[own]] = category[own]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))


def write(table: pa.Table, path: Path) -> None:
    """Write ``table`` atomically as Parquet (zstd, row groups of 4096 rows)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=4096)
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


def write_splits(
    out: Path, rows: int, valid_rows: int, tasks: dict[str, tuple[float, float]], seed: int = 0, kind: str = "mtl"
) -> dict:
    """Write ``out``/train.parquet and ``out``/valid.parquet, drawn with the seeds 2·seed+1 and
    2·seed+2 (distinct for every seed); → {split: {"path": …, "rows": …}}. ``kind`` (KINDS):
    ``mtl``, the tasks given; ``ctr-cvr``, :func:`generate_ctr_cvr` (``tasks`` unused)."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    written = {}
    for name, n, split_seed in (("train", rows, seed * 2 + 1), ("valid", valid_rows, seed * 2 + 2)):
        path = Path(out) / f"{name}.parquet"
        write(generate(n, tasks, seed=split_seed) if kind == "mtl" else generate_ctr_cvr(n, seed=split_seed), path)
        written[name] = {"path": str(path), "rows": n}
    return written


def parse_tasks(spec: str) -> dict[str, tuple[float, float]]:
    """``"click=1:0.3,like=0.8:0.2"`` → {name: (relatedness, positive rate)}."""
    tasks = {}
    for item in spec.split(","):
        name, sep, rest = item.strip().partition("=")
        rho, _, rate = rest.partition(":")
        try:
            tasks[name] = (float(rho), float(rate) if rate else 0.2)
        except ValueError:
            raise ValueError(f"--tasks item {item!r}: expected NAME=RELATEDNESS[:RATE]") from None
        if not sep or not name or not 0 < tasks[name][1] < 1:
            raise ValueError(f"--tasks item {item!r}: expected NAME=RELATEDNESS[:RATE] with 0 < RATE < 1")
    return tasks
