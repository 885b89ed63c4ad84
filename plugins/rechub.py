"""A bridge to torch-rechub's multi-task models: SharedBottom, MMOE, PLE, AITM and ESMM as cogradctl plugins.

Each bridge *is* the torch-rechub model: a subclass of torch-rechub's own class, built by its own
constructor from a JSON config that mirrors the constructor call (feature definitions, expert and
tower parameters, named as torch-rechub names them), running its own forward. So its parameters
and buffers carry torch-rechub's names exactly: a state dict saved from a torch-rechub model loads
into the bridge with no renaming, and the bridge's state dict loads back into torch-rechub's model.
The bridge adds only what cogradctl's plugin contract needs, and nothing to the state dict:

* inputs: cogradctl's encoded batch → torch-rechub's ``{feature name: tensor}``, with the public
  ``cogradctl.layers.OriginalIds`` / ``OriginalDense``: a sparse feature's cogradctl index (1..V by
  frequency, 0 = missing/unseen) becomes the team's encoded id again (its LabelEncoder output, the
  value in the data), index 0 becomes ``oov_id``; a dense feature's standardisation is undone
  (x·std + mean), since the model was trained on the raw values. Non-persistent buffers only.
* outputs: logits, not probabilities. torch-rechub ends each tower with a sigmoid applied to the
  tower MLP's one-unit output; the bridge reads that output (a forward hook on each tower during
  its forward) instead of inverting the sigmoid, which is inaccurate where it saturates. ESMM's
  CTCVR probability is a product of two sigmoids; its logit is computed from the two tower logits.
* tasks: towers follow the schema's tasks in order (``--tasks`` in the order of the team's label
  columns); ``task_parameters()`` names the parameters only one task's loss reaches.

The torch-rechub import is guarded: without the extra, loading these plugins fails with the
install command, and cogradctl's built-in plugins are unaffected.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from cogradctl.layers import OriginalDense, OriginalIds, owned_by_prefix
from cogradctl.schema import Schema

try:
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(
        f'the torch-rechub bridge needs torch-rechub 0.9: pip install -e ".[rechub]" from the clone ({exc})'
    ) from exc

SPARSE_KEYS = {"name", "type", "vocab_size", "embed_dim", "shared_with", "padding_idx"}
DENSE_KEYS = {"name", "type", "embed_dim"}
MLP_KEYS = {"dims", "dropout", "activation"}
TASK_TYPES = {"binary": "classification", "regression": "regression"}


# ---------------------------------------------------------------------------- config → torch-rechub arguments


def _count(value, what: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    return value


def rechub_features(specs, key: str = "features") -> list:
    """``[{"name": …, "vocab_size": …, "embed_dim": …, "shared_with": …}, {"name": …, "type": "dense"}]``
    → torch-rechub SparseFeature / DenseFeature objects, fresh ones (they cache their embedding)."""
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{key} must be a non-empty list of feature objects, got {specs!r}")
    out = []
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"{key}: each feature is an object with a 'name', got {spec!r}")
        name, kind = spec["name"], spec.get("type", "sparse")
        allowed = {"sparse": SPARSE_KEYS, "dense": DENSE_KEYS}.get(kind)
        if allowed is None:
            raise ValueError(
                f"feature {name!r}: type {kind!r} is not supported (sparse or dense; torch-rechub's "
                "SequenceFeature needs list columns, which cogradctl does not read)"
            )
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(
                f"feature {name!r}: unknown key(s) {', '.join(unknown)}; a {kind} feature has {sorted(allowed)}"
            )
        if kind == "dense":
            if spec.get("embed_dim", 1) != 1:
                raise ValueError(f"feature {name!r}: a dense feature is one value per row (embed_dim 1)")
            out.append(DenseFeature(name))
            continue
        vocab_size = _count(spec.get("vocab_size"), f"feature {name!r}: vocab_size")
        embed_dim = spec.get("embed_dim")
        if embed_dim is not None:
            _count(embed_dim, f"feature {name!r}: embed_dim")
        shared_with, padding_idx = spec.get("shared_with"), spec.get("padding_idx")
        out.append(SparseFeature(name, vocab_size, embed_dim, shared_with=shared_with, padding_idx=padding_idx))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: a feature name appears twice in {names}")
    return out


def _owners(features: list) -> dict[str, SparseFeature]:
    """Each sparse feature → the feature whose embedding table it uses (itself, or its ``shared_with``)."""
    tables = {f.name: f for f in features if isinstance(f, SparseFeature) and f.shared_with is None}
    owners = {}
    for f in features:
        if isinstance(f, SparseFeature):
            if f.shared_with is not None and f.shared_with not in tables:
                raise ValueError(
                    f"feature {f.name!r}: shared_with {f.shared_with!r} is not a sparse feature with its own table"
                )
            owners[f.name] = tables[f.shared_with or f.name]
    return owners


def mlp_params(value, key: str, hidden: bool) -> dict:
    """An expert/bottom/tower params dict as torch-rechub takes it: ``{"dims", "dropout", "activation"}``;
    ``hidden``: the dims may not be empty (the last one is the width of what follows)."""
    if not isinstance(value, dict) or not set(value) <= MLP_KEYS:
        raise ValueError(f"{key} must be an object with keys among {sorted(MLP_KEYS)}, got {value!r}")
    dims = value.get("dims", [])
    if not isinstance(dims, list) or (hidden and not dims):
        raise ValueError(
            f"{key}: dims must be a {'non-empty ' if hidden else ''}list of positive integers, got {dims!r}"
        )
    for d in dims:
        _count(d, f"{key}: dims")
    return dict(value)


def tower_params(value, schema: Schema, key: str = "tower_params_list") -> list[dict]:
    tasks = schema.task_names
    if not isinstance(value, list) or len(value) != len(tasks):
        raise ValueError(
            f"{key} must be a list of one tower per task ({len(tasks)}: {', '.join(tasks)}), got {value!r}"
        )
    return [mlp_params(v, f"{key}[{i}]", hidden=False) for i, v in enumerate(value)]


def _task_types(schema: Schema, given=None, binary_only: bool = False) -> list[str]:
    """The schema's task types as torch-rechub names them; a given list must agree with them."""
    types = [TASK_TYPES[t.type] for t in schema.tasks]
    if binary_only and any(t != "classification" for t in types):
        raise ValueError("every task of this model is a binary classification (its towers end with a sigmoid)")
    if given is not None and list(given) != types:
        raise ValueError(f"task_types {given!r} disagree with the data's tasks {schema.task_names}, which are {types}")
    return types


# ---------------------------------------------------------------------------- cogradctl batch → torch-rechub input


def _team_id(sizes: dict[str, int], name: str, value) -> int:
    """``OriginalIds``' ``to_id``: a vocabulary value is the team's encoded id, which must fit its
    embedding; features the model does not read map to 0 (their ids are never looked up)."""
    if name not in sizes:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            f"feature {name!r} holds {value!r}; torch-rechub models take the team's encoded integer ids "
            "(LabelEncoder output), so the data must hold those"
        )
    if not 0 <= value < sizes[name]:
        raise ValueError(
            f"feature {name!r}: the data holds id {value}, outside the embedding's vocab_size {sizes[name]}"
        )
    return value


class _Bridge:
    """Mixed in before a torch-rechub model class; the subclasses name the towers and the owned parameters."""

    def __init__(self, schema: Schema, inputs: list, oov_id: int, **rechub_kwargs) -> None:
        super().__init__(**rechub_kwargs)  # torch-rechub's constructor: its modules, its names
        self.cogradctl_tasks = schema.task_names
        lists = [f.name for f in schema.sequences + schema.vectors]
        if lists:  # the bridge maps no list feature onto torch-rechub's inputs: refused, not ignored
            raise ValueError(
                f"list feature(s) {', '.join(lists)} cannot reach a torch-rechub model through the bridge "
                f"(SequenceFeature is not mapped); leave them out with --exclude-features {','.join(lists)}"
            )
        categorical, dense = {f.name for f in schema.categorical}, {f.name for f in schema.dense}
        sizes = {name: owner.vocab_size for name, owner in _owners(inputs).items()}  # the table each id indexes
        for fea in inputs:
            if isinstance(fea, SparseFeature) and fea.name not in categorical:
                hint = " (it is dense there: init/import with --categorical)" if fea.name in dense else ""
                raise ValueError(f"sparse feature {fea.name!r} is not a categorical feature of the data{hint}")
            if isinstance(fea, DenseFeature) and fea.name not in dense:
                hint = " (it is categorical there: init/import with --dense)" if fea.name in categorical else ""
                raise ValueError(f"dense feature {fea.name!r} is not a dense feature of the data{hint}")
        for name, size in sizes.items():
            if oov_id >= size:
                raise ValueError(f"oov_id {oov_id} is outside feature {name!r}'s vocab_size {size}")
        # cogradctl's indices → the team's ids (index 0, missing or unseen → oov_id) and standardised
        # dense values → the team's: modules with non-persistent buffers only, nothing in the state dict.
        self.cogradctl_ids = OriginalIds(schema, partial(_team_id, sizes), missing_id=oov_id)
        self.cogradctl_dense = OriginalDense(schema)
        self._sparse = [(f.name, self.cogradctl_ids.index[f.name]) for f in inputs if isinstance(f, SparseFeature)]
        self._dense = [(f.name, self.cogradctl_dense.index[f.name]) for f in inputs if isinstance(f, DenseFeature)]

    def rechub_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """cogradctl's encoded batch → torch-rechub's ``{feature name: B-vector}`` of the team's values."""
        ids, values = self.cogradctl_ids(batch["categorical"]), self.cogradctl_dense(batch["dense"])
        return {**{n: ids[:, k] for n, k in self._sparse}, **{n: values[:, k] for n, k in self._dense}}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torch-rechub's forward on the mapped inputs → {task: B-vector of logits (values for regression)}."""
        captured: dict[int, torch.Tensor] = {}
        heads = self._heads()
        # Hooks live for one call only: nothing persists on the modules (copies, pickling unaffected).
        handles = [head.register_forward_hook(partial(_keep, captured, i)) for i, head in enumerate(heads)]
        try:
            super().forward(self.rechub_inputs(batch))  # its probabilities are not used
        finally:
            for handle in handles:
                handle.remove()
        logits = self._logits([captured[i].squeeze(-1) for i in range(len(heads))])
        return dict(zip(self.cogradctl_tasks, logits))

    def _heads(self) -> list[nn.Module]:
        """The modules whose outputs are the pre-sigmoid values, one per tower."""
        return list(self.towers)

    def _logits(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return outputs


def _keep(captured: dict, index: int, module: nn.Module, args, output: torch.Tensor) -> None:
    captured[index] = output


# ---------------------------------------------------------------------------- the bridged models


class RechubSharedBottom(_Bridge, SharedBottom):
    """SharedBottom: a task owns its tower."""

    def task_parameters(self) -> dict[str, list[str]]:
        return owned_by_prefix(self, {t: (f"towers.{i}.",) for i, t in enumerate(self.cogradctl_tasks)})


class RechubMMOE(_Bridge, MMOE):
    """MMOE: a task owns its gate and its tower; the experts and embeddings are shared."""

    def task_parameters(self) -> dict[str, list[str]]:
        return owned_by_prefix(self, {t: (f"towers.{i}.", f"gates.{i}.") for i, t in enumerate(self.cogradctl_tasks)})


class RechubPLE(_Bridge, PLE):
    """PLE: a task owns its tower, its last-level specific experts and its gates of the last two levels.
    Its lower-level specific experts also feed that level's shared gate, so they are shared."""

    def task_parameters(self) -> dict[str, list[str]]:
        last = self.n_level - 1
        per = self.cgc_layers[last].n_expert_specific
        prefixes = {}
        for i, t in enumerate(self.cogradctl_tasks):
            own = [f"towers.{i}.", f"cgc_layers.{last}.gates_specific.{i}."]
            own += [f"cgc_layers.{last}.experts_specific.{e}." for e in range(i * per, (i + 1) * per)]
            if last > 0:
                own.append(f"cgc_layers.{last - 1}.gates_specific.{i}.")
            prefixes[t] = tuple(own)
        return owned_by_prefix(self, prefixes)


class RechubAITM(_Bridge, AITM):
    """AITM: a task owns its tower. A task's bottom, and the info gate and attention that feed it, also
    feed every later task (the information transfer), so only the last task owns those of its own."""

    def task_parameters(self) -> dict[str, list[str]]:
        tasks = self.cogradctl_tasks
        prefixes = {t: (f"towers.{i}.",) for i, t in enumerate(tasks)}
        n = len(tasks)
        last = [f"bottoms.{n - 1}."] + ([f"info_gates.{n - 2}.", f"aits.{n - 2}."] if n > 1 else [])
        prefixes[tasks[-1]] += tuple(last)
        return owned_by_prefix(self, prefixes)


class RechubESMM(_Bridge, ESMM):
    """ESMM: tasks CTR and CTCVR (torch-rechub trains no CVR loss). CTR's output is the CTR tower's;
    CTCVR's is the product of both towers' probabilities, so the CVR tower is CTCVR's own."""

    def _heads(self) -> list[nn.Module]:
        return [self.tower_cvr, self.tower_ctr]

    def _logits(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        cvr, ctr = outputs
        return [ctr, logit_of_product(cvr, ctr)]

    def task_parameters(self) -> dict[str, list[str]]:
        ctr, ctcvr = self.cogradctl_tasks
        return {ctr: [], **owned_by_prefix(self, {ctcvr: ("tower_cvr.",)})}


def logit_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit(σ(a)·σ(b)) without forming the probability: log p − log(1 − p), log p = log σ(a) + log σ(b)."""
    log_p = nn.functional.logsigmoid(a) + nn.functional.logsigmoid(b)
    # log(1 − e^z) for z ≤ 0, accurate on both sides of z = −log 2 (Mächler 2012).
    log_1mp = torch.where(log_p > -math.log(2.0), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))
    return log_p - log_1mp


# ---------------------------------------------------------------------------- factories (the entry points)


def _towered(cls, schema: Schema, features, tower_params_list, task_types, oov_id, **rest) -> nn.Module:
    """SharedBottom, MMOE and PLE: torch-rechub's features, task types and towers, and the model's own ``rest``."""
    feats = rechub_features(features)
    types = _task_types(schema, task_types)
    towers = tower_params(tower_params_list, schema)
    oov_id = _count(oov_id, "oov_id", 0)
    return cls(schema, feats, oov_id, features=feats, task_types=types, tower_params_list=towers, **rest)


def build_shared_bottom(
    schema: Schema, features=None, bottom_params=None, tower_params_list=None, task_types=None, oov_id: int = 0
) -> nn.Module:
    """torch-rechub's SharedBottom (Caruana 1997) as it is: a shared bottom MLP, a tower per task."""
    bottom = mlp_params(bottom_params, "bottom_params", hidden=True)
    return _towered(RechubSharedBottom, schema, features, tower_params_list, task_types, oov_id, bottom_params=bottom)


def build_mmoe(
    schema: Schema,
    features=None,
    n_expert=None,
    expert_params=None,
    tower_params_list=None,
    task_types=None,
    oov_id: int = 0,
) -> nn.Module:
    """torch-rechub's MMOE (Ma et al. 2018) as it is: shared experts, a gate and a tower per task."""
    experts = {"n_expert": _count(n_expert, "n_expert")}
    experts["expert_params"] = mlp_params(expert_params, "expert_params", hidden=True)
    return _towered(RechubMMOE, schema, features, tower_params_list, task_types, oov_id, **experts)


def build_ple(
    schema: Schema,
    features=None,
    n_level=None,
    n_expert_specific=None,
    n_expert_shared=None,
    expert_params=None,
    tower_params_list=None,
    task_types=None,
    oov_id: int = 0,
) -> nn.Module:
    """torch-rechub's PLE (Tang et al. 2020) as it is: CGC levels of task-specific and shared experts."""
    experts = {
        "n_level": _count(n_level, "n_level"),
        "n_expert_specific": _count(n_expert_specific, "n_expert_specific"),
        "n_expert_shared": _count(n_expert_shared, "n_expert_shared", minimum=0),
        "expert_params": mlp_params(expert_params, "expert_params", hidden=True),
    }
    return _towered(RechubPLE, schema, features, tower_params_list, task_types, oov_id, **experts)


def build_aitm(
    schema: Schema, features=None, bottom_params=None, tower_params_list=None, n_task=None, oov_id: int = 0
) -> nn.Module:
    """torch-rechub's AITM (Xi et al. 2021) as it is: a bottom and tower per task, information transfer in order."""
    feats = rechub_features(features)
    _task_types(schema, binary_only=True)
    if n_task is not None and n_task != len(schema.tasks):
        raise ValueError(
            f"n_task {n_task!r}, but the data has {len(schema.tasks)} tasks: {', '.join(schema.task_names)}"
        )
    return RechubAITM(
        schema,
        feats,
        _count(oov_id, "oov_id", 0),
        features=feats,
        n_task=len(schema.tasks),
        bottom_params=mlp_params(bottom_params, "bottom_params", hidden=True),
        tower_params_list=tower_params(tower_params_list, schema),
    )


def build_esmm(
    schema: Schema, user_features=None, item_features=None, cvr_params=None, ctr_params=None, oov_id: int = 0
) -> nn.Module:
    """torch-rechub's ESMM (Ma et al. 2018) as it is: tasks CTR and CTCVR (in that order), CVR as their ratio."""
    users, items = rechub_features(user_features, "user_features"), rechub_features(item_features, "item_features")
    for key, group in (("user_features", users), ("item_features", items)):
        if any(not isinstance(f, SparseFeature) for f in group) or len({f.embed_dim for f in group}) > 1:
            raise ValueError(f"{key}: ESMM takes sparse features of one embed_dim (it concatenates their embeddings)")
    _task_types(schema, binary_only=True)
    if len(schema.tasks) != 2:
        raise ValueError(
            f"ESMM has two tasks, CTR and CTCVR in that order; the data has {', '.join(schema.task_names)}"
        )
    return RechubESMM(
        schema,
        users + items,
        _count(oov_id, "oov_id", 0),
        user_features=users,
        item_features=items,
        cvr_params=mlp_params(cvr_params, "cvr_params", hidden=False),
        ctr_params=mlp_params(ctr_params, "ctr_params", hidden=False),
    )
