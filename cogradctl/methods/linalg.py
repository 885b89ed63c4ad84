"""Small dense linear algebra for the K×K problems of the gradient methods (K = number of tasks).

After the one P-wide Gram product, every method solves a K×K problem. At K ≤ 8 a numpy or LAPACK
call costs several µs of fixed overhead, so these work on Python floats (``eigh_small``,
``solve_small``, ``eigh2``) or small numpy arrays (the simplex helpers); ``eigh_jacobi`` gets small
eigenvalues to relative accuracy where gradient norms are far apart.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS64 = float(np.finfo(np.float64).eps)


def eigh_small(m: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and unit eigenvectors (``vec[r]`` belongs to ``lam[r]``) of a small
    symmetric matrix as nested lists of floats: in closed form for 2×2 (``eigh2``), by LAPACK
    otherwise. Methods keep their K×K algebra in plain Python floats because, right after the
    backward passes, each numpy or torch call on a tiny array costs ~10 µs (cold caches), which
    added up to 1–2% of a small model's step (np.linalg.eigh: 89 µs in a step, 3.5 µs alone).

    >>> eigh_small([[2.0, 0.0], [0.0, 1.0]])
    ([1.0, 2.0], [[0.0, 1.0], [1.0, 0.0]])
    """
    if len(m) == 2:
        return eigh2(m[0][0], m[0][1], m[1][1])
    lam, vec = np.linalg.eigh(np.asarray(m, dtype=np.float64))
    return lam.tolist(), vec.T.tolist()


def solve_small(m: list[list[float]], rhs: list[list[float]]) -> list[list[float]] | None:
    """X with M X = B for a small square M, in Python floats (Gaussian elimination with partial
    pivoting, as LAPACK's ``gesv``); ``rhs`` and the result are lists of columns. ``None`` when a
    pivot is exactly 0 (singular M, where ``np.linalg.solve`` raises). A near-singular M gives an
    inaccurate X, as LAPACK's would: callers check what they need of it. Plain floats for the
    reason given in ``eigh_small``: right after a 4×1M Gram product, MGDA's K×K part took
    68–74 µs with ``np.linalg.solve`` and its numpy checks, 43–44 µs in floats (ad hoc).

    >>> solve_small([[2.0, 1.0], [1.0, 3.0]], [[3.0, 4.0]])
    [[1.0, 1.0]]
    """
    k = len(m)
    a = [row[:] + [col[i] for col in rhs] for i, row in enumerate(m)]  # augmented rows [M | B]
    for c in range(k):
        p, best = c, abs(a[c][c])
        for r in range(c + 1, k):
            if abs(a[r][c]) > best:
                p, best = r, abs(a[r][c])
        if best == 0.0:
            return None
        a[c], a[p] = a[p], a[c]
        pivot = a[c]
        for r in range(c + 1, k):
            f = a[r][c] / pivot[c]
            if f:
                a[r] = [x - f * y for x, y in zip(a[r], pivot)]
    x = []
    for j in range(k, len(a[0])):
        col = [0.0] * k
        for i in range(k - 1, -1, -1):
            row = a[i]
            col[i] = (row[j] - sum([row[t] * col[t] for t in range(i + 1, k)])) / row[i]
        x.append(col)
    return x


def eigh2(a: float, b: float, c: float) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and unit eigenvectors of the symmetric [[a, b], [b, c]], in closed
    form. A diagonal matrix gives the coordinate axes, as LAPACK's eigh does: with equal
    eigenvalues every basis is an eigenbasis, and GDOD's split depends on which one is used.

    The eigenvalue of the larger magnitude is mean ± d, a sum without cancellation; the other is
    det / that one (det = ac − b²), not mean ∓ d, which cancels: for a Gram matrix of two gradients
    whose norms are 1e8 apart, mean − d keeps no correct digit of the small eigenvalue, det/λ_max
    keeps it to eps·cond of the cosine matrix (as Jacobi's method does, ``eigh_jacobi``).

    >>> eigh2(2.0, 1.0, 2.0)
    ([1.0, 3.0], [[-0.7071067811865475, 0.7071067811865475], [0.7071067811865475, 0.7071067811865475]])
    """
    if b == 0.0:
        return ([a, c], [[1.0, 0.0], [0.0, 1.0]]) if a <= c else ([c, a], [[0.0, 1.0], [1.0, 0.0]])
    half = 0.5 * (a - c)
    d = math.hypot(half, b)
    mean = 0.5 * (a + c)
    big = mean + d if mean >= 0 else mean - d
    small = (a / big) * c - (b / big) * b  # det / big, scaled so that a·c cannot overflow
    lam = [small, big] if mean >= 0 else [big, small]
    # The eigenvector of the larger eigenvalue mean + d, from whichever row of (M − λI) has no
    # cancellation: (λ − c, b) when a ≥ c, else (b, λ − a).
    x, y = (d + half, b) if half >= 0 else (b, d - half)
    norm = math.hypot(x, y)
    x, y = x / norm, y / norm
    return lam, [[-y, x], [x, y]]


def eigh_jacobi(m: list[list[float]], sweeps: int = 50) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and unit eigenvectors (``vec[r]`` belongs to ``lam[r]``) of a small
    symmetric positive semi-definite matrix, by cyclic Jacobi rotations in Python floats.

    Unlike LAPACK's eigh (tridiagonal reduction), whose eigenvalues carry an absolute error of about
    K·eps·λ_max, Jacobi's method with the stopping test |m_pq| ≤ eps·√(m_pp m_qq) gets every
    eigenvalue of M = DCD (D diagonal, C with a unit diagonal) to a relative error of about
    eps·cond(C) (Demmel & Veselić, 1992): for a Gram matrix, the small eigenvalues that belong to
    tasks with small gradients are as accurate as the large ones, however far apart the norms.
    Slower than LAPACK (K(K−1)/2 rotations of O(K) Python float operations per sweep, a few sweeps),
    so callers use it where the grading requires it.

    >>> lam, vec = eigh_jacobi([[1e16, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1e-16]])
    >>> [float(f"{x:.12g}") for x in lam]
    [1e-16, 1.0, 1e+16]
    """
    k = len(m)
    a = [row[:] for row in m]
    v = [[float(i == j) for j in range(k)] for i in range(k)]  # v[r]: the eigenvector of a[r][r]
    for _ in range(sweeps):
        rotated = False
        for p in range(k - 1):
            for q in range(p + 1, k):
                if abs(a[p][q]) > EPS64 * math.sqrt(abs(a[p][p] * a[q][q])):
                    _rotate(a, v, p, q)
                    rotated = True
        if not rotated:
            break
    order = sorted(range(k), key=lambda i: a[i][i])
    return [a[i][i] for i in order], [v[i] for i in order]


def _rotate(a: list[list[float]], v: list[list[float]], p: int, q: int) -> None:
    """One Jacobi rotation in the (p, q) plane that zeroes a[p][q] (the stable formulas: t is the
    smaller root of t² + 2θt − 1 = 0), applied to a's rows and columns p, q and to v's rows p, q."""
    apq = a[p][q]
    theta = (a[q][q] - a[p][p]) / (2.0 * apq)
    t = math.copysign(1.0, theta) / (abs(theta) + math.hypot(theta, 1.0))
    c = 1.0 / math.hypot(t, 1.0)
    s = t * c
    a[p][p] -= t * apq
    a[q][q] += t * apq
    a[p][q] = a[q][p] = 0.0
    for r in range(len(a)):
        if r != p and r != q:
            arp, arq = a[r][p], a[r][q]
            a[r][p] = a[p][r] = c * arp - s * arq
            a[r][q] = a[q][r] = s * arp + c * arq
    vp, vq = v[p], v[q]
    v[p] = [c * x - s * y for x, y in zip(vp, vq)]
    v[q] = [s * x + c * y for x, y in zip(vp, vq)]


def solve_on_faces(m: np.ndarray, b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The bordered system of every face of the simplex, solved in one batch (MGDA, CAGrad).

    For each of the 2^K − 1 supports S, K_S = [[M_SS, 1], [1ᵀ, 0]] (with α_i pinned to 0 off S) is
    solved for [0; 1], giving p (the min-norm point of the face's affine hull, MGDA's candidate),
    and, if ``b`` is given, for [−b_S; 0], giving q. Batched LU (``torch.linalg.solve_ex``, which
    does not raise): singular faces (affinely dependent gradients) come back with ``solved``
    False. Returns (p, q, solved), p and q of shape (2^K − 1) × K.
    """
    k = m.shape[0]
    codes = np.arange(1, 2**k)
    masks = ((codes[:, None] >> np.arange(k)) & 1).astype(bool)  # S × K supports
    n = masks.shape[0]
    kkt = np.zeros((n, k + 1, k + 1))
    kkt[:, :k, :k] = np.where(masks[:, :, None] & masks[:, None, :], m[None], 0.0) + (
        np.eye(k, dtype=bool)[None] & ~masks[:, :, None]
    )
    kkt[:, :k, k] = masks
    kkt[:, k, :k] = masks
    rhs = np.zeros((n, k + 1, 1 if b is None else 2))
    rhs[:, k, 0] = 1.0
    if b is not None:
        rhs[:, :k, 1] = np.where(masks, -b[None], 0.0)
    sol, info = torch.linalg.solve_ex(torch.from_numpy(kkt), torch.from_numpy(rhs))
    sol = sol.numpy()
    return sol[:, :k, 0], (sol[:, :k, 1] if b is not None else None), info.numpy() == 0


def on_simplex(rows: np.ndarray) -> np.ndarray:
    """Which rows of an S × K array are points of the simplex up to round-off (≥ −1e-10, sum 1 ± 1e-8)."""
    return (rows >= -1e-10).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-8)


def snap_to_simplex(rows: np.ndarray) -> np.ndarray:
    """Rows that ``on_simplex`` accepts, put exactly on it: negatives clipped to 0, sums rescaled to 1."""
    rows = np.clip(rows, 0.0, None)
    return rows / np.clip(rows.sum(axis=1, keepdims=True), 1e-300, None)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of a vector onto the probability simplex (sort-based, exact)."""
    k = v.numel()
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    ind = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = u - css / ind > 0
    rho = int(torch.nonzero(cond).max())
    tau = css[rho] / (rho + 1)
    return (v - tau).clamp_min(0)
