"""A small Gaussian process for mixed numeric/categorical inputs (numpy + scipy.optimize).

Used by ``MCTSSampler`` as the local model inside a chosen region. Kept deliberately small:
Matern-5/2 kernel with one lengthscale per numeric dimension and one per categorical parameter
(a mismatch counts as distance one, scaled), a zero mean on standardised targets (``power``,
``standard`` or ``copula``), and MAP hyperparameters (dimension-scaled log-normal lengthscale
prior, a lengthscale floor) found by L-BFGS-B from fixed starts with a capped number of
evaluations, so the fit is a deterministic function of the data (journal replay relies on it).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GP", "copula", "log_ei", "norm_cdf"]

_SQRT5 = math.sqrt(5.0)


def norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF (vectorised; erfc approximation, relative error < 1.2e-7)."""
    x = -np.asarray(z, dtype=float) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.5 * np.abs(x))
    poly = (
        -np.square(x)
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t
                        * (
                            0.27886807
                            + t
                            * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                        )
                    )
                )
            )
        )
    )
    erfc = t * np.exp(poly)
    erfc = np.where(x >= 0, erfc, 2.0 - erfc)
    return 0.5 * erfc


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (Acklam's rational approximation, error < 1.2e-9)."""
    a = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
         -30.66479806614716, 2.506628277459239)  # fmt: skip
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
         -13.28068155288572)  # fmt: skip
    c = (-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
         4.374664141464968, 2.938163982698783)  # fmt: skip
    d = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
    p = np.asarray(p, dtype=float)
    out = np.empty_like(p)
    lo, hi = p < 0.02425, p > 1 - 0.02425
    mid = ~(lo | hi)
    q = p[mid] - 0.5
    r = q * q
    out[mid] = (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )
    for mask, sign, pp in ((lo, 1.0, p[lo]), (hi, -1.0, 1 - p[hi])):
        q = np.sqrt(-2 * np.log(pp))
        out[mask] = sign * (
            (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
            / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        )
    return out


def copula(y: np.ndarray) -> np.ndarray:
    """Rank-Gaussianise losses: robust to scale and outliers (Rosenbrock's 1e6 vs 1e-2)."""
    n = len(y)
    order = np.argsort(y, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=float)
    # Tied values (e.g. failures recorded at the worst loss) share their mean rank.
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(counts) < n:
        sums = np.bincount(inverse, weights=ranks)
        ranks = sums[inverse] / counts[inverse]
    return _norm_ppf((ranks + 0.5) / n)


def power(y: np.ndarray) -> np.ndarray:
    """Standardise losses after a Yeo-Johnson transform whose lambda maximises the likelihood.

    Tames heavy upper tails (Rosenbrock's 1e6 next to 1e-2) while keeping the order and the
    local smoothness of the values, which rank-based transforms lose.
    """
    z = standard(y)
    if np.ptp(z) == 0:
        return z
    pos = z >= 0
    best, best_t = -math.inf, z
    for lam in np.linspace(-2.0, 2.0, 21):
        t = np.empty_like(z)
        # Yeo-Johnson: (z+1)^lam for z >= 0, -(1-z)^(2-lam) for z < 0 (with log limits).
        t[pos] = np.log1p(z[pos]) if abs(lam) < 1e-9 else (np.power(z[pos] + 1, lam) - 1) / lam
        neg = ~pos
        if abs(lam - 2) < 1e-9:
            t[neg] = -np.log1p(-z[neg])
        else:
            t[neg] = -(np.power(1 - z[neg], 2 - lam) - 1) / (2 - lam)
        var = np.var(t)
        if var <= 0 or not np.isfinite(var):
            continue
        # Profile log-likelihood of a normal fit, plus the log-Jacobian of the transform.
        ll = -0.5 * len(z) * math.log(var) + (lam - 1) * np.sum(np.sign(z) * np.log1p(np.abs(z)))
        if ll > best:
            best, best_t = ll, t
    return standard(best_t)


def standard(y: np.ndarray) -> np.ndarray:
    """Plain standardisation."""
    return (y - np.mean(y)) / (np.std(y) or 1.0)


def log_ei(mu: np.ndarray, sigma: np.ndarray, best: float) -> np.ndarray:
    """log expected improvement below ``best`` (stable far in the tail)."""
    sigma = np.maximum(sigma, 1e-12)
    z = (best - mu) / sigma
    out = np.empty_like(z)
    mid = z > -6
    zm = z[mid]
    pdf = np.exp(-0.5 * zm * zm) / math.sqrt(2 * math.pi)
    out[mid] = np.log(np.maximum(pdf + zm * norm_cdf(zm), 1e-300))
    zt = z[~mid]
    # Tail: h(z) ~ phi(z) / z^2 * (1 - 3/z^2).
    out[~mid] = (
        -0.5 * zt * zt - 0.5 * math.log(2 * math.pi) - 2 * np.log(-zt) + np.log1p(-3 / (zt * zt))
    )
    return out + np.log(sigma)


class GP:
    """GP regression on numeric features in [0, 1] plus integer category codes.

    ``xn``: (n, dn) floats; ``xc``: (n, dc) integer codes (-1 = inactive); ``y``: (n,) targets,
    already standardised (e.g. ``copula``).
    """

    def __init__(
        self,
        xn: np.ndarray,
        xc: np.ndarray,
        y: np.ndarray,
        *,
        steps: int = 60,
        theta: np.ndarray | None = None,
        starts: tuple[float, ...] | None = None,
        min_lengthscale: float = 0.01,
    ) -> None:
        self.xn, self.xc, self.y = xn, xc, y
        self.dn, self.dc = xn.shape[1], xc.shape[1]
        d = max(1, self.dn + self.dc)
        # Dimension-scaled lengthscale prior (log-normal, median growing like sqrt(d)); it
        # keeps models smooth when points are few, which is what a 100-trial budget needs.
        self._prior_mu = math.sqrt(2.0) + 0.5 * math.log(d)
        self._prior_sd = math.sqrt(3.0)
        # Per-dimension squared distances between training points: only fitting needs them.
        self._dist = self._pairwise(xn, xc, xn, xc) if theta is None else None
        # Log-lengthscale starting points: the prior median and a short-lengthscale start.
        self.min_lengthscale = min_lengthscale
        self.starts = starts if starts is not None else (self._prior_mu, math.log(0.3))
        self.theta = self._fit(steps) if theta is None else np.asarray(theta, float)
        self._factor()

    # -------------------------------------------------------------------------- kernel
    @staticmethod
    def _pairwise(an, ac, bn, bc) -> np.ndarray:
        """Per-dimension squared distances, shape (len(a), len(b), dn + dc)."""
        dn = np.square(an[:, None, :] - bn[None, :, :])
        dc = (ac[:, None, :] != bc[None, :, :]).astype(float)
        return np.concatenate([dn, dc], axis=2)

    @staticmethod
    def _matern(r2: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Kernel value and its derivative with respect to r^2."""
        r = np.sqrt(np.maximum(r2, 1e-30))
        e = np.exp(-_SQRT5 * r)
        k = scale * (1 + _SQRT5 * r + 5.0 / 3.0 * r2) * e
        dk = -scale * 5.0 / 6.0 * (1 + _SQRT5 * r) * e
        return k, dk

    def _unpack(self, theta: np.ndarray) -> tuple[np.ndarray, float, float]:
        inv_l2 = np.exp(-2 * theta[:-2])
        return inv_l2, float(np.exp(theta[-2])), float(np.exp(theta[-1]))

    def _objective(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Negative log marginal posterior and its gradient in log-parameter space."""
        inv_l2, scale, noise = self._unpack(theta)
        n = len(self.y)
        dist = self._dist
        assert dist is not None, "distances are kept whenever the model is fitted"
        r2 = dist @ inv_l2
        k, dk = self._matern(r2, scale)
        kk = k + (noise + 1e-8) * np.eye(n)
        try:
            chol = np.linalg.cholesky(kk)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros_like(theta)
        linv = _chol_inv(chol)
        kinv = linv.T @ linv
        alpha = kinv @ self.y
        nll = 0.5 * self.y @ alpha + np.log(np.diag(chol)).sum()
        w = np.outer(alpha, alpha) - kinv  # d nll / dK = -w / 2
        grad = np.empty_like(theta)
        # dK/dlog l_j = dk * (-2 * dist_j * inv_l2_j)
        grad[:-2] = 0.5 * 2 * inv_l2 * np.tensordot(w * dk, dist, axes=([0, 1], [0, 1]))
        grad[-2] = -0.5 * np.sum(w * k)
        grad[-1] = -0.5 * noise * np.trace(w)
        # Priors: log-normal lengthscales, log-normal signal variance around 1, noise weak.
        ll = theta[:-2]
        nll += 0.5 * np.sum(np.square((ll - self._prior_mu) / self._prior_sd))
        grad[:-2] += (ll - self._prior_mu) / self._prior_sd**2
        nll += 0.5 * theta[-2] ** 2
        grad[-2] += theta[-2]
        nll += 0.5 * ((theta[-1] + 6.0) / 3.0) ** 2
        grad[-1] += (theta[-1] + 6.0) / 9.0
        return float(nll), grad

    def _fit(self, steps: int) -> np.ndarray:
        """MAP hyperparameters by L-BFGS-B from fixed starts (deterministic given the data)."""
        from scipy.optimize import minimize

        d = self.dn + self.dc
        lo = np.concatenate(
            [np.full(d, math.log(self.min_lengthscale)), [math.log(0.05), math.log(1e-6)]]
        )
        hi = np.concatenate([np.full(d, math.log(50.0)), [math.log(20.0), math.log(0.5)]])
        best, best_theta = math.inf, None
        for start in self.starts:
            start = max(start, math.log(self.min_lengthscale))
            theta0 = np.concatenate([np.full(d, start), [0.0, math.log(1e-3)]])
            res = minimize(
                self._objective,
                theta0,
                jac=True,
                method="L-BFGS-B",
                bounds=list(zip(lo, hi, strict=True)),
                options={"maxiter": steps, "maxfun": steps},
            )
            if res.fun < best:
                best, best_theta = float(res.fun), res.x
        if best_theta is None:  # every start failed numerically: fall back to the prior
            best_theta = np.concatenate([np.full(d, self._prior_mu), [0.0, math.log(1e-3)]])
        return np.clip(best_theta, lo, hi)

    def _factor(self) -> None:
        inv_l2, scale, noise = self._unpack(self.theta)
        self.inv_l2, self.scale, self.noise = inv_l2, scale, noise
        k, _ = self._matern(self._r2(self.xn, self.xc), scale)
        n = len(self.y)
        jitter = noise + 1e-8
        for _ in range(6):
            try:
                self._chol = np.linalg.cholesky(k + jitter * np.eye(n))
                break
            except np.linalg.LinAlgError:
                jitter *= 10
        self._linv = _chol_inv(self._chol)
        self._alpha = self._linv.T @ (self._linv @ self.y)

    @property
    def lengthscales(self) -> np.ndarray:
        """Fitted lengthscales, numeric dimensions first then categorical parameters."""
        return np.exp(self.theta[:-2])

    # ----------------------------------------------------------------------- prediction
    def predict(self, xn: np.ndarray, xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (latent, noise-free) at new points."""
        ks, _ = self._matern(self._r2(xn, xc), self.scale)
        mu = ks @ self._alpha
        v = self._linv @ ks.T
        var = np.maximum(self.scale - np.sum(v * v, axis=0), 1e-12)
        return mu, np.sqrt(var)

    def _r2(self, xn: np.ndarray, xc: np.ndarray) -> np.ndarray:
        """Scaled squared distances to the training points, without a per-dimension tensor."""
        w = np.sqrt(np.exp(-2 * self.theta[: self.dn]))
        a, b = xn * w, self.xn * w
        r2 = np.square(a).sum(1)[:, None] + np.square(b).sum(1)[None, :] - 2.0 * a @ b.T
        r2 = np.maximum(r2, 0.0)
        for j in range(self.dc):
            r2 += (xc[:, j, None] != self.xc[None, :, j]) * math.exp(-2 * self.theta[self.dn + j])
        return r2

    def condition(self, xn: np.ndarray, xc: np.ndarray, y: np.ndarray) -> GP:
        """A GP with extra (e.g. fantasised) observations, same hyperparameters."""
        return GP(
            np.vstack([self.xn, xn]),
            np.vstack([self.xc, xc]),
            np.concatenate([self.y, y]),
            theta=self.theta,
            min_lengthscale=self.min_lengthscale,
        )


def _chol_inv(chol: np.ndarray) -> np.ndarray:
    """Inverse of a small lower-triangular Cholesky factor (numpy has no triangular solver)."""
    return np.linalg.inv(chol)
