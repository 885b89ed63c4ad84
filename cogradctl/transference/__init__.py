"""Pairwise task transference and gradient conflict (docs/methods.md §1, docs/transference.md).

For each measured batch: one forward and K backward passes (onto the shared parameters only) give
the losses L_j and the shared gradients g_i; then for each source task i one forward with the shared
parameters moved to θ_s − Δ_i (task-specific parameters unchanged, no model copy:
``torch.func.functional_call``) gives every target's lookahead loss L'_{i,j} at once. Δ_i is the
lookahead step: plain SGD, Δ_i = α g_i, or Adam's next step, Δ_i = α g_i / (sqrt(v̂'_i) + ε) with
v̂'_i = (β₂v + (1−β₂)g_i²)/(1−β₂^(t+1)) from the second moment v saved in the checkpoint by
``cogradctl train`` (g_i folded in as Adam does, so entries never trained, v = 0, stay bounded).

    Z[i, j]     = L_j − L'_{i,j}           absolute loss reduction of target j by a step on source i
    Z_rel[i, j] = 1 − L'_{i,j} / L_j        relative (TAG's inter-task affinity)

Rows are sources, columns targets, the diagonal is each task's own progress. Positive = positive
transfer. Also per batch: cosine of g_i and g_j, whether they conflict (cosine < 0), and gradient
magnitude similarity 2‖g_i‖‖g_j‖/(‖g_i‖²+‖g_j‖²). Reported: the mean over batches and its
standard error. With ``holdout`` the step is taken on one batch and the losses L_j, L'_{i,j} are
measured on the next one. With module groups, every quantity is also computed per group of shared
parameters: the gradient restricted to the group, and a lookahead that moves only that group.

Modules:

- :mod:`.groups`: shared-parameter groups (``default_group``, ``shared_groups``, :class:`Group`);
- :mod:`.lookahead`: one batch (``measure_batch``), with the SGD or Adam step
  (``adam_preconditioner``, ``AdamLookahead``);
- :mod:`.batches`: the measurement over seeded batches (``pick_batches``, ``measure_per_batch``,
  ``measure_full``, ``measure``);
- :mod:`.summary`: means and standard errors (``summarise``), before/after (``reorder``,
  ``compare``) and the quality gates (``check_gates``, ``gate``);
- :mod:`.raw`: the raw per-batch table (``raw_table``, ``write_raw``);
- :mod:`.rowsparse`: the same with row-sparse embedding tables (``split.tables``): the lookahead on
  the touched rows in place (``lookahead_outputs``), Adam's saved state per batch (``RowAdam``).

Everything the former module ``cogradctl/transference.py`` defined still imports from here.
"""

from cogradctl.transference.batches import measure, measure_full, measure_per_batch, pick_batches
from cogradctl.transference.groups import Group, build_groups, default_group, shared_groups
from cogradctl.transference.lookahead import (
    DEFAULT_LOOKAHEAD_LR,
    MATRICES,
    OPTIM_PREFIX,
    PER_BATCH_EXTRA,
    AdamLookahead,
    SharedGradients,
    adam_preconditioner,
    measure_batch,
)
from cogradctl.transference.raw import raw_table, write_raw
from cogradctl.transference.rowsparse import RowAdam
from cogradctl.transference.summary import check_gates, compare, gate, reorder, summarise

_groups = build_groups  # its name before the split; tests call tr._groups

__all__ = [
    "DEFAULT_LOOKAHEAD_LR",
    "MATRICES",
    "OPTIM_PREFIX",
    "PER_BATCH_EXTRA",
    "AdamLookahead",
    "Group",
    "RowAdam",
    "SharedGradients",
    "adam_preconditioner",
    "build_groups",
    "check_gates",
    "compare",
    "default_group",
    "gate",
    "measure",
    "measure_batch",
    "measure_full",
    "measure_per_batch",
    "pick_batches",
    "raw_table",
    "reorder",
    "shared_groups",
    "summarise",
    "write_raw",
]
