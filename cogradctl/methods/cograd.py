"""CoGrad: gradient coordination that maximises inter-task transference (SIGIR 2023).

Each task gradient gets an auxiliary term that increases the loss reduction it causes in the
other tasks (docs/methods.md §2):

    ĝ_i = g_i − γ_i Σ_{j≠i} H_i g_j,        update = Σ_i (w_i g_i − γ_i Σ_{j≠i} H_i g_j)

(the task weights scale the task gradients, not the corrections: that is the gradient of the
objective Σ_i w_i L_i − λ Σ_{i≠j} Z_{i→j}, whose transference term carries no w; with w = 1 the
update is Σ_i ĝ_i)

with one of four approximations of task i's Hessian H_i (option ``hessian``):

* ``diag`` (default): H_i ≈ diag(g_i ⊙ g_i). O(KP), no extra backward.
* ``fisher-ema``: H_i ≈ diag(v_i), v_i ← ρ v_i + (1 − ρ) g_i ⊙ g_i across steps (ρ =
  ``fisher_decay``; v_i starts at the first step's g_i ⊙ g_i). v is a K×P buffer.
* ``outer``: H_i ≈ g_i g_iᵀ, so Σ_{j≠i} H_i g_j = (Σ_{j≠i} g_iᵀg_j) g_i, read off the Gram matrix.
* ``exact``: true Hessian-vector products from the loop's ``hvp(i, v)`` (``requires_hvp``): one
  product H_i (Σ_{j≠i} g_j) per task (linearity), plus one H_i g_i per task when normalised.

The raw term is cubic in the gradient scale, so a fixed raw γ is either invisible or explosive
depending on the model. Option ``normalize`` makes γ scale-free:

* ``"relative"`` (default): γ_i is the size of the correction relative to the task gradient,
  ‖γ_i-term‖ = γ_i ‖g_i‖ exactly, every step; the approximation fixes only its direction. (On an
  MMoE with the sample data the curvature normalisation below gave corrections 6–40 times the task
  gradient at γ = 0.1 — heavy-tailed gradients make ``mean(g⊙g)`` a poor scale — hence this default.)
* ``"curvature"`` (or ``True``): H_i is divided by a scalar curvature scale ς_i of its own, which
  makes the term invariant to the scale of task i's loss (the size then still depends on how the
  gradients are distributed over the parameters):

* ``diag``/``fisher-ema``: ς_i = mean diagonal of the approximation (the normalised diagonal has
  mean 1);
* ``outer``: ς_i = ‖g_i‖², the one non-zero eigenvalue (H̃_i = u_i u_iᵀ, the projection on the unit
  gradient; dividing by the mean diagonal ‖g_i‖²/P instead would multiply the term by P);
* ``exact``: ς_i = ‖H_i g_i‖ / ‖g_i‖, the gain of H_i along the task's own gradient (which equals
  ‖g_i‖² for the ``outer`` approximation, so the two normalisations agree there).

A zero scale (zero gradient, or no curvature along it) means no correction for that task.
``"none"`` (or ``False``) gives the paper's raw form.

An unobserved task (``observed``: no labelled row in the batch) takes no part in the step: its row
is read as zero (no w_i g_i, and it is in no other task's Σ_{j≠i} g_j), its own correction is zero
(γ_i taken as 0: a ``fisher-ema`` v_i is not applied, no ``exact`` product H_i v is asked for), and
its ``fisher-ema`` row v_i is not moved. The update is then CoGrad over the observed tasks. (A task
unobserved at the very first step starts its v_i from 0 rather than from its first g_i ⊙ g_i.)
"""

from __future__ import annotations

import math
import warnings

import torch

from cogradctl.methods.base import Method, gram, number, numbers, per_task

# A correction whose size relative to the task gradient stays below this is invisible: warn once.
TINY_CORRECTION = 1e-4
TINY_STEPS_BEFORE_WARNING = 20


HESSIANS = ("diag", "fisher-ema", "outer", "exact")
NORMALIZE = ("relative", "curvature", "none")


class CoGrad(Method):
    """CoGrad: ĝ_i = g_i − γ_i Σ_{j≠i} H_i g_j, update Σ_i (w_i g_i − γ_i Σ_{j≠i} H_i g_j) (scale-free H_i by default).

    >>> import torch
    >>> g = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    >>> # (g_1 - 0.5 g_1⊙g_1⊙g_2) + (g_2 - 0.5 g_2⊙g_2⊙g_1) = [0.5, 4] + [0.5, -2]
    >>> CoGrad(gamma=0.5, normalize=False)(g)
    tensor([1., 2.])
    >>> # outer: H_1 g_2 = (g_1·g_2) g_1 = -g_1, H_2 g_1 = (g_1·g_2) g_2 = -g_2
    >>> CoGrad(gamma=0.5, hessian="outer", normalize=False)(g)
    tensor([3.0000, 1.5000])
    """

    family = "transference"
    paper = "Gradient Coordination for Quantifying and Maximizing Knowledge Transference (SIGIR 2023)"
    options = {
        "gamma": "strength of the transference term: one value or one per task (default 0.1)",
        "hessian": "Hessian approximation: 'diag' (default), 'fisher-ema', 'outer' or 'exact' (needs HVPs)",
        "normalize": "'relative' (default: gamma = correction size / task-gradient size), 'curvature' (H_i over its own scale) or 'none' (raw γ)",
        "weights": "task weights w_i on the task gradients, not the corrections: one value or one per task (default 1)",
        "fisher_decay": "EMA decay ρ of the fisher-ema diagonal (default 0.9)",
    }

    def __init__(
        self, gamma=0.1, hessian: str = "diag", normalize="relative", weights=1.0, fisher_decay: float = 0.9
    ) -> None:
        super().__init__()
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {', '.join(HESSIANS)}, got {hessian!r}")
        if not 0.0 <= number("fisher_decay", fisher_decay) < 1.0:
            raise ValueError("fisher_decay must be in [0, 1)")
        self.gamma_option = numbers("gamma", gamma)
        self.weights_option = numbers("weights", weights)
        self.hessian = hessian
        if normalize is True or normalize is False:
            normalize = "curvature" if normalize else "none"
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
        self.normalize = normalize
        self.fisher_decay = float(fisher_decay)
        # The loop passes hvp=fn to methods whose (instance) requires_hvp is true.
        self.requires_hvp = hessian == "exact"
        self.column_state = hessian == "fisher-ema"  # one average per column
        self._tiny_steps = 0
        self._warned = False

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.gamma = per_task(self.gamma_option, num_tasks, "gamma", torch.float64)
        self.weights = per_task(self.weights_option, num_tasks, "weights")
        if self.hessian == "fisher-ema":
            width = sum(self.segments) if self.segments else 0
            self.register_buffer("fisher", torch.zeros(num_tasks, width))
            self.register_buffer("fisher_steps", torch.zeros((), dtype=torch.long))

    def _segments_changed(self) -> None:
        super()._segments_changed()
        width = sum(self.segments) if self.segments else 0
        if self.hessian == "fisher-ema" and self.fisher.shape[1] != width and int(self.fisher_steps) == 0:
            self.fisher = torch.zeros(self.num_tasks, width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The fisher buffer's width P may be unknown until the first step: take the saved one's.
        key = prefix + "fisher"
        if self.hessian == "fisher-ema" and key in state_dict and hasattr(self, "fisher"):
            self.fisher = torch.zeros_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        """Rows of a non-negative diagonal divided by their mean (zero rows stay zero), over
        ``columns`` when zero columns were left out (row-sparse tables)."""
        mean = h.mean(dim=1, keepdim=True) if not self.columns else h.sum(dim=1, keepdim=True) / self.columns
        return torch.where(mean > 0, h / mean.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))

    def _gamma(self) -> torch.Tensor:
        """γ, with 0 for the tasks this step did not observe."""
        return self.gamma if self.observed_rows is None else torch.where(self.observed, self.gamma, 0.0)

    def corrections(self, grads: torch.Tensor, hvp=None) -> torch.Tensor:
        """The K×P matrix of auxiliary terms γ_i Σ_{j≠i} H_i g_j."""
        if self.normalize != "relative":
            return self._terms(grads, hvp, self._gamma().to(grads), self.normalize == "curvature")
        terms, coef, _ = self._relative(grads, hvp)
        return torch.tensor(coef, dtype=grads.dtype, device=grads.device)[:, None] * terms

    def _relative(self, grads: torch.Tensor, hvp) -> tuple[torch.Tensor, list[float], list[bool]]:
        """``normalize="relative"``: (terms, coef, active), correction_i = coef_i · terms_i.

        The direction comes from the curvature-scaled (better conditioned) term; coef_i rescales it
        to γ_i ‖g_i‖, so the relative correction is γ_i wherever the term and g_i are non-zero
        (``active``). The K-vectors are Python floats: right after the backward passes a numpy or
        torch call on a tiny array costs tens of µs (cold caches), which added up to 1% of a small
        model's step.
        """
        g_norm = torch.linalg.vector_norm(grads, dim=1).tolist()
        if self.hessian == "diag":
            # g_i ⊙ g_i / mean(g_i ⊙ g_i) = u_i ⊙ u_i with u_i = g_i / rms(g_i), rms = ‖g_i‖/√P:
            # the mean comes from the norm above instead of another P-wide reduction.
            root_p = math.sqrt(grads.shape[1])
            inv_rms = [root_p / n if n > 0 else 0.0 for n in g_norm]
            u = grads * torch.tensor(inv_rms, dtype=grads.dtype, device=grads.device)[:, None]
            terms = u * u * (grads.sum(dim=0, keepdim=True) - grads)
        else:
            terms = self._terms(grads, hvp, torch.ones_like(self.gamma).to(grads), self.hessian != "exact")
        size = torch.linalg.vector_norm(terms, dim=1).tolist()
        active = [t > 0 and n > 0 for t, n in zip(size, g_norm)]
        coef = [gamma * n / t if on else 0.0 for gamma, n, t, on in zip(self._gamma().tolist(), g_norm, size, active)]
        return terms, coef, active

    def _terms(self, grads: torch.Tensor, hvp, gamma: torch.Tensor, normalize: bool) -> torch.Tensor:
        others = grads.sum(dim=0, keepdim=True) - grads  # Σ_{j≠i} g_j
        if self.hessian in ("diag", "fisher-ema"):
            h = grads * grads  # diag(H_i), one row per task
            if self.hessian == "fisher-ema":
                h = self._update_fisher(h)
            if normalize:
                h = self._scaled(h)
            return gamma[:, None] * h * others
        if self.hessian == "outer":
            m = gram(grads)
            coef = m.sum(dim=1) - m.diagonal()  # g_iᵀ Σ_{j≠i} g_j
            if normalize:
                sq = m.diagonal()
                coef = torch.where(sq > 0, coef / torch.where(sq > 0, sq, 1.0), torch.zeros_like(coef))
            return (gamma * coef.to(grads))[:, None] * grads
        if hvp is None:
            raise ValueError("cograd with hessian='exact' needs Hessian-vector products: call it with hvp=fn")
        rows = []
        for i in range(grads.shape[0]):
            # no product for an unobserved task (in the loop its loss has no graph)
            if self.observed_rows is not None and not bool(self.observed[i]):
                rows.append(torch.zeros_like(grads[i]))
                continue
            hv = hvp(i, others[i]).detach().reshape(-1).to(grads)
            if normalize:
                g_norm = float(grads[i].norm())
                scale = float(hvp(i, grads[i]).detach().reshape(-1).to(grads).norm()) / g_norm if g_norm > 0 else 0.0
                hv = hv / scale if scale > 0 and scale == scale and scale != float("inf") else torch.zeros_like(hv)
            rows.append(gamma[i] * hv)
        return torch.stack(rows)

    def _update_fisher(self, sq: torch.Tensor) -> torch.Tensor:
        if self.fisher.shape != sq.shape:
            self.fisher = torch.zeros_like(sq)
            self.fisher_steps.zero_()
        fisher = self.fisher.to(sq)
        if int(self.fisher_steps) == 0:
            fisher = sq.clone()
        elif self.observed_rows is None:
            fisher = self.fisher_decay * fisher + (1.0 - self.fisher_decay) * sq
        else:  # an unobserved task's v_i stays as it is
            moved = self.fisher_decay * fisher + (1.0 - self.fisher_decay) * sq
            fisher = torch.where(self.observed.to(sq.device)[:, None], moved, fisher)
        self.fisher = fisher.detach().to(self.fisher.dtype)
        self.fisher_steps += 1
        return fisher

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None, hvp=None) -> torch.Tensor:
        if self.observed_rows is not None:  # the unobserved rows read as zero
            grads = torch.where(self.observed.to(grads.device)[:, None], grads, 0.0)
        if self.normalize == "relative":
            terms, coef, active = self._relative(grads, hvp)
            # w @ grads − coef @ terms: the weights scale the task gradients, not the corrections
            update = (self.weights.to(grads) @ grads).sub_(
                torch.tensor(coef, dtype=grads.dtype, device=grads.device) @ terms
            )
            rel = [
                gamma if on else 0.0 for gamma, on in zip(self.gamma.tolist(), active)
            ]  # ‖correction_i‖ / ‖g_i‖, by construction
        else:
            corr = self.corrections(grads, hvp)
            update = self.weights.to(grads) @ grads - corr.sum(dim=0)
            g_norm = grads.norm(dim=1)
            rel = torch.where(g_norm > 0, corr.norm(dim=1) / g_norm.clamp_min(1e-30), torch.zeros_like(g_norm)).tolist()
        self.stats = {"relative_correction": rel}
        if self.observed_rows is None or len(self.observed_rows) > 1:  # one task alone: nothing to correct
            self._warn_if_invisible(max(rel))
        return update

    def task_weights(self) -> torch.Tensor | None:
        return self.weights

    def _warn_if_invisible(self, largest: float) -> None:
        self._tiny_steps = self._tiny_steps + 1 if largest < TINY_CORRECTION else 0
        if self._tiny_steps >= TINY_STEPS_BEFORE_WARNING and not self._warned:
            self._warned = True
            warnings.warn(
                f"cograd: the transference correction has stayed below {TINY_CORRECTION:g} of the task "
                f"gradients for {TINY_STEPS_BEFORE_WARNING} steps, so the update is practically 'ew'; "
                "raise gamma (or use the default normalize=relative)",
                stacklevel=2,
            )
