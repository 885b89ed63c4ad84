"""Groups of shared parameters (modules) for the per-module measurement: the default grouping by
top-level module, a model plugin's own ``shared_groups()``, and each group's positions in the flat
vector of shared parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogradctl.errors import PluginError
from cogradctl.models import ParamSplit


def default_group(name: str) -> str:
    """The default module group of a shared parameter: its top-level module, descending through an
    indexed container only when the indexed element has named children.

    ``input.embedding.weight`` → ``input``; ``experts.3.0.weight`` → ``experts`` (a list of like
    experts is one group); ``levels.0.shared.1.0.bias`` → ``levels.0.shared``;
    ``bottom.2.weight`` → ``bottom``.
    """
    parts = name.split(".")
    path = parts[:-1] or parts  # drop the leaf (weight, bias, …)
    out, k = [path[0]], 1
    while k + 1 < len(path) and path[k].isdigit() and not path[k + 1].isdigit():
        out += path[k : k + 2]
        k += 2
    return ".".join(out)


def shared_groups(model: torch.nn.Module, split: ParamSplit, plugin: str = "model") -> dict[str, list[str]]:
    """{group: [shared parameter names]}: the plugin's ``shared_groups()`` when it defines one (shared
    parameters it leaves out form the group ``(other)``), else :func:`default_group`. Row-sparse
    tables (``split.tables``) are shared parameters here too, in the model's order."""
    shared = all_shared_names(model, split)
    custom = getattr(model, "shared_groups", None)
    if custom is None:
        groups: dict[str, list[str]] = {}
        for n in shared:
            groups.setdefault(default_group(n), []).append(n)
        return groups
    given = custom()
    if not isinstance(given, dict) or not all(isinstance(v, (list, tuple)) for v in given.values()):
        raise PluginError(f"model plugin '{plugin}': shared_groups() must return {{group: [parameter names]}}")
    known, seen, groups = set(shared), {}, {}
    for group, names in given.items():
        for n in names:
            if n not in known:
                raise PluginError(
                    f"model plugin '{plugin}': shared_groups() puts '{n}' in group '{group}', "
                    "but it is not a shared parameter"
                )
            if n in seen:
                raise PluginError(
                    f"model plugin '{plugin}': shared_groups() puts '{n}' in groups '{seen[n]}' and '{group}'"
                )
            seen[n] = group
        if names:
            groups[str(group)] = [n for n in shared if n in set(names)]  # keep the model's order
    rest = [n for n in shared if n not in seen]
    if rest:
        groups["(other)"] = rest
    return groups


def all_shared_names(model: torch.nn.Module, split: ParamSplit) -> list[str]:
    """The shared parameters' names, row-sparse tables' included, in the model's parameter order."""
    if not split.tables:
        return list(split.shared_names)
    mine = {id(p): n for n, p in zip([*split.shared_names, *split.table_names], [*split.shared, *split.tables])}
    return [mine[id(p)] for p in model.parameters() if id(p) in mine]


@dataclass
class Group:
    name: str
    params: list[str]
    # positions of the group's entries in the flat P-vector of the dense shared parameters (with
    # row-sparse tables a batch's columns are found per batch: rowsparse.group_columns)
    index: torch.Tensor
    size: int  # entries, a table's every row included


def build_groups(split: ParamSplit, spec: dict[str, list[str]], device) -> list[Group]:
    """:class:`Group` of each ``{group: [shared parameter names]}`` entry of ``spec``, in its order."""
    offsets, offset = {}, 0
    for n, p in zip(split.shared_names, split.shared):
        offsets[n] = (offset, offset + p.numel())
        offset += p.numel()
    sizes = {n: p.numel() for n, p in zip([*split.shared_names, *split.table_names], [*split.shared, *split.tables])}
    out = []
    for name, params in spec.items():
        pieces = [torch.arange(*offsets[n], device=device) for n in params if n in offsets]
        index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
        out.append(Group(name, list(params), index, sum(sizes[n] for n in params)))
    return out
