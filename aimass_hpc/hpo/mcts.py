"""``MCTSSampler``: tree search over learned partitions with a local GP solver in the leaf.

How a proposal is made (all in the encoded space of ``Space``: numbers in [0, 1], category
codes, NaN for inactive parameters):

1. **Start-up.** The first ``n_init`` trials are points of a scrambled Sobol sequence seeded
   by the sampler's seed: they cover the space evenly, so a first batch spreads out, without
   the pull towards corners that maximin designs have in many dimensions (that pull cost
   Levy-10 and Ackley-10 most of their budget).
2. **Learned partition tree** (after LA-MCTS). The completed trials are ranked (failures last)
   and the space is split recursively like a regression tree on the ranks: each cut is
   axis-aligned on a numeric dimension, or a subset of categories for a categorical one, chosen
   to best separate good from bad trials. A child must keep ``leaf_size`` trials, so the tree
   widens progressively as results come in (the progressive widening of MOSAIC) and every leaf
   is a box plus category subsets, trivial to sample from. A conditional parameter is only cut
   where it is active for every trial in the node, so the tree cuts the parent (the optimizer)
   before its children (momentum).
3. **UCB descent with virtual loss** (after UCT / WU-UCT). From the root, take the child with
   the highest mean goodness plus ``exploration * sqrt(2 ln N_parent / N_child)``; pending
   trials count as visits that scored zero (weighted by ``virtual_loss``), so a large batch
   is spread over several regions instead of piling into one.
4. **Local solver in the leaf** (the role BO plays in LA-MCTS). A Gaussian process (Matern-5/2,
   a lengthscale per numeric dimension and per categorical parameter, which counts a mismatch
   as distance one) is fitted to Yeo-Johnson-standardised losses, with a lengthscale floor at
   the spacing of the data so rugged objectives read as noise around a trend. Candidates are
   perturbations of the leaf's best trial at scales from 0.3% to 40% of the range (shaped by
   the lengthscales; half move every coordinate, half only one to three; categories switch
   too), uniform points in the leaf and in the whole space, and recombinations of the best
   20% of trials (a per-dimension fit, like an estimation-of-distribution step). They are
   scored by expected improvement over the best posterior mean.
5. **Pending trials** enter the GP as fantasies at their predicted mean (kriging believer),
   which flattens the improvement around them; candidates whose uncertainty is mostly
   explained by pending trials, or that lie within ``min_gap`` of one, are skipped. A batch of
   8 is 8 different points even once the model is sure where the optimum is.
6. **Noisy objectives** (fitted noise above ``noisy`` x signal variance, e.g. a CV score on a
   small data set): candidates within ``done_gap`` of a finished trial are skipped too, since
   re-measuring next to it mostly re-measures the noise; without this the search can settle on
   a lucky corner.

Integers are rounded and conditionals resolved before a candidate is scored (``Space.canonical``),
so the model sees exactly the points that will run; exact repeats of trials held are skipped.
Failed trials count as the worst result seen. Everything is a deterministic function of
``(seed, trial id, records held)``: a sampler rebuilt from the journal proposes the same next
trials (see ``Sampler``); the caches below are memos of such functions.

Cost: beyond ``max_model_points`` results, the tree is re-learned only every ~10% of new
results (later ones are routed down the cached cuts), the GP conditions on the
``max_model_points`` trials nearest the chosen leaf, and its hyperparameters are fitted on the
``fit_points`` nearest among the results the tree was learned from (memoised). An ``ask`` at
1,000 trials takes a few milliseconds of one core; BLAS is held to one thread meanwhile.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aimass_hpc.hpo import gp as _gpm
from aimass_hpc.hpo.gp import GP, log_ei
from aimass_hpc.hpo.samplers import Direction, Sampler, Trial, TrialRecord
from aimass_hpc.hpo.space import Space

__all__ = ["MCTSSampler"]


_THREADS: list = []


def _one_blas_thread():
    """A context limiting BLAS to one thread (threadpoolctl, when installed).

    The matrices here are ~100 x 100: threads only add overhead, and on a shared login node
    a multi-threaded BLAS would grab every core for nothing.
    """
    if not _THREADS:
        try:
            import scipy.optimize  # noqa: F401 - load scipy's own BLAS before the snapshot
            from threadpoolctl import ThreadpoolController

            _THREADS.append(ThreadpoolController())
        except Exception:  # noqa: BLE001 - optional speed-up, never a failure
            _THREADS.append(None)
    ctl = _THREADS[0]
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1)


def _reflect(x: np.ndarray, lo, hi) -> np.ndarray:
    """Fold values back into [lo, hi] like a mirror (clipping would pile them on the edges)."""
    width = np.maximum(np.asarray(hi, dtype=float) - lo, 1e-12)
    y = np.mod(x - lo, 2 * width)
    return lo + width - np.abs(y - width)


@dataclass
class _Node:
    """A region: numeric box ``lo``..``hi`` and, per restricted categorical dim, allowed codes."""

    lo: np.ndarray
    hi: np.ndarray
    allowed: dict[int, np.ndarray]
    idx: np.ndarray  # rows of the completed-trial matrix inside this region
    dim: int = -1
    thr: float = math.nan  # numeric cut: value < thr goes left
    left_codes: np.ndarray | None = None  # categorical cut: bool mask of codes going left
    nan_left: bool = True  # where a point with the cut parameter inactive goes
    children: list[_Node] = field(default_factory=list)

    def goes_left(self, x: np.ndarray) -> np.ndarray:
        """For rows ``x`` (encoded), True where they fall into the left child."""
        col = x[:, self.dim]
        nan = np.isnan(col)
        if self.left_codes is not None:
            codes = np.nan_to_num(col, nan=0).astype(int)
            left = self.left_codes[np.clip(codes, 0, len(self.left_codes) - 1)]
        else:
            left = col < self.thr
        return np.where(nan, self.nan_left, left)


@dataclass
class _Model:
    """What is fitted once per set of results: data, tree and GP."""

    x: np.ndarray  # (n, D) encoded completed+failed trials, id order
    loss: np.ndarray  # (n,) losses, failures set to the worst loss
    failed: np.ndarray  # (n,) bool
    good: np.ndarray  # (n,) goodness in [0, 1] (1 = best), failures 0
    root: _Node
    gps: dict[tuple[int, ...], GP] = field(default_factory=dict)


class MCTSSampler(Sampler):
    """Monte-Carlo tree search over learned partitions, with a GP/EI local solver per leaf.

    Options beyond the shared ones (defaults are those the benchmark in benchmarks/hpo ran):

    ``n_init``: space-filling trials before the model is used (default: dimension + 2, 5..10).
    ``leaf_size``: fewest completed trials a leaf keeps; ``max_leaves``: tree size cap.
    ``exploration``: UCB constant on goodness in [0, 1].
    ``virtual_loss``: weight of a pending trial as a zero-goodness visit.
    ``n_candidates``: local and uniform candidates per proposal; ``n_eda``: recombinations of
    the best ``eda_frac`` of trials.
    ``max_model_points``: most trials the GP conditions on; ``fit_points``: trials its
    hyperparameters are fitted on beyond that; ``gp_steps``: L-BFGS iterations.
    ``transform``: "power" (Yeo-Johnson), "standard" or "copula" (ranks) for the losses.
    ``min_ls``: lengthscale floor factor (times the data spacing ``n ** (-1/d)``).
    ``redundancy``: skip candidates whose predictive sd pending trials cut below this factor.
    ``min_gap``: smallest distance (unit cube) between a proposal and a pending trial.
    ``done_gap``: smallest distance to a finished trial once the objective looks noisy (fitted
    noise above ``noisy`` times the signal variance).
    """

    def __init__(
        self,
        space: Space,
        *,
        seed: int | None = None,
        direction: Direction = "minimize",
        n_init: int | None = None,
        leaf_size: int = 10,
        max_leaves: int = 16,
        exploration: float = 0.1,
        virtual_loss: float = 0.3,
        n_candidates: int = 384,
        max_model_points: int = 100,
        gp_steps: int = 50,
        transform: str = "power",
        min_ls: float = 0.5,
        n_eda: int = 96,
        eda_frac: float = 0.2,
        redundancy: float = 0.5,
        min_gap: float = 0.01,
        fit_points: int = 40,
        done_gap: float = 0.1,
        noisy: float = 0.1,
    ) -> None:
        super().__init__(space, seed=seed, direction=direction)
        d = len(space)
        self.n_init = int(n_init) if n_init is not None else int(min(10, max(5, d + 2)))
        self.leaf_size = max(2, int(leaf_size))
        self.max_leaves = max(1, int(max_leaves))
        self.exploration = float(exploration)
        self.virtual_loss = float(virtual_loss)
        self.n_candidates = max(16, int(n_candidates))
        self.max_model_points = max(8, int(max_model_points))
        self.gp_steps = int(gp_steps)
        if transform not in ("power", "standard", "copula"):
            raise ValueError(f"transform must be power, standard or copula, not {transform!r}")
        self._transform = getattr(_gpm, transform)
        self.min_ls = float(min_ls)
        self.n_eda, self.eda_frac = int(n_eda), float(eda_frac)
        self.redundancy = float(redundancy)
        self.min_gap = float(min_gap)
        self.fit_points = int(fit_points)
        self.done_gap, self.noisy = float(done_gap), float(noisy)
        self._enc: dict[int, np.ndarray] = {}
        self._held: dict[int, float] = {}  # trial id -> hash of its encoded point
        self._hash_w = np.random.default_rng(0x5EED).random(len(space)) + 0.5
        self._model_cache: tuple[int, _Model | None] | None = None
        self._tree_cache: tuple[tuple[int, ...], _Node] | None = None
        self._sobol_cache: tuple[tuple[int], np.ndarray] | None = None
        self._theta_cache: dict[tuple, np.ndarray] = {}  # memo of a pure function of records
        self._cat = space.is_categorical
        self._num_dims = np.flatnonzero(~self._cat)
        self._cat_dims = np.flatnonzero(self._cat)

    def ask(self, n: int = 1) -> list[Trial]:
        """Propose ``n`` trials (see ``Sampler.ask``); BLAS runs single-threaded meanwhile."""
        with _one_blas_thread():
            return super().ask(n)

    # ------------------------------------------------------------------------ bookkeeping
    def _on_register(self, rec: TrialRecord, *, proposed: bool) -> None:
        self._enc[rec.id] = self.space.encode(rec.params)
        self._held[rec.id] = float(self._hash(self._enc[rec.id][None, :])[0])

    # -------------------------------------------------------------------------- proposal
    def _propose(self, trial_id: int, rng: np.random.Generator) -> dict[str, Any]:
        model = self._model()
        pend = self._pending_matrix()
        if model is None or len(self._records) < self.n_init:
            return self.space.decode(self._space_filling(trial_id, rng))
        leaf = self._select(model, pend)
        x = self._local(model, leaf, pend, rng)
        return self.space.decode(x)

    def _pending_matrix(self) -> np.ndarray:
        ids = sorted(r.id for r in self._records.values() if r.state == "pending")
        if not ids:
            return np.empty((0, len(self.space)))
        return np.vstack([self._enc[i] for i in ids])

    def _all_matrix(self) -> np.ndarray:
        return np.vstack([self._enc[i] for i in sorted(self._records)])

    # ---------------------------------------------------------------------- space filling
    def _uniform(self, rng: np.random.Generator, m: int, node: _Node | None = None) -> np.ndarray:
        """``m`` uniform rows inside ``node`` (the whole space when None), canonical."""
        d = len(self.space)
        lo = np.zeros(d) if node is None else node.lo
        hi = np.ones(d) if node is None else node.hi
        x = lo + rng.random((m, d)) * (hi - lo)
        for j in map(int, self._cat_dims):  # int keys: node.allowed is keyed by int
            codes = np.arange(self.space.n_choices[j])
            if node is not None and j in node.allowed:
                codes = codes[node.allowed[j]]
            x[:, j] = codes[rng.integers(0, len(codes), m)]
        return self.space.canonical(x)

    def _space_filling(self, trial_id: int, rng: np.random.Generator) -> np.ndarray:
        """Point ``trial_id`` of a scrambled Sobol sequence (seeded by the sampler's seed).

        Low-discrepancy points cover the space evenly without the pull towards corners and
        edges that maximin designs have in many dimensions (where optima rarely sit). An
        exact repeat of a trial held (small discrete spaces) falls back to the random point
        farthest from every trial held.
        """
        x = self._sobol(trial_id)
        if not np.isin(self._hash(x[None, :]), list(self._held.values()))[0]:
            return x
        cands = self._drop_held(self._uniform(rng, 256))
        if len(cands) == 0:
            return self._uniform(rng, 1)[0]
        dist = self._min_dist(cands, self._all_matrix())
        return cands[int(np.argmax(dist))]

    def _sobol(self, index: int) -> np.ndarray:
        """The canonical point ``index`` of this sampler's scrambled Sobol sequence."""
        from scipy.stats import qmc

        m = max(4, int(math.ceil(math.log2(index + 1))))
        key = (m,)
        if self._sobol_cache is None or self._sobol_cache[0] != key:
            d = len(self.space)
            u = qmc.Sobol(d, scramble=True, seed=self.seed & (2**63 - 1)).random_base2(m)
            for j in self._cat_dims:
                nc = self.space.n_choices[j]
                u[:, j] = np.minimum(np.floor(u[:, j] * nc), nc - 1)
            self._sobol_cache = (key, self.space.canonical(u))
        return self._sobol_cache[1][index].copy()

    def _min_dist(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Distance from each row of ``a`` to its nearest row of ``b`` (categories: mismatch)."""
        an, ac = self._features(a)
        bn, bc = self._features(b)
        d2 = np.square(an[:, None, :] - bn[None, :, :]).sum(-1)
        d2 += (ac[:, None, :] != bc[None, :, :]).sum(-1)
        return np.sqrt(d2.min(axis=1))

    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GP inputs: numeric columns (inactive -> 0.5), category codes (inactive -> -1)."""
        xn = np.nan_to_num(x[:, self._num_dims], nan=0.5)
        xc = np.nan_to_num(x[:, self._cat_dims], nan=-1).astype(int)
        return xn, xc

    # ------------------------------------------------------------------------------ model
    def _model(self) -> _Model | None:
        if self._model_cache is not None and self._model_cache[0] == self._version:
            return self._model_cache[1]
        done = [r for r in self.records if r.state != "pending"]
        model = None
        if sum(r.state == "complete" for r in done) >= 2:
            x = np.vstack([self._enc[r.id] for r in done])
            loss = np.array([self._loss(r) for r in done])
            failed = np.isnan(loss)
            loss[failed] = np.nanmax(loss)
            good = self._goodness(loss, failed)
            # The cuts are learned from the first m results in id order, where m grows in
            # 10% steps beyond a hundred: the tree is then re-learned every ~10% of new
            # results instead of at every one (a pure function of the records all the same).
            m = self._tree_rows(len(done))
            key = tuple(r.id for r in done[:m])
            if self._tree_cache is None or self._tree_cache[0] != key:
                root = self._build(x[:m], self._goodness(loss[:m], failed[:m]))
                self._tree_cache = (key, root)
            root = self._tree_cache[1]
            self._assign(root, x, np.arange(len(done)))
            model = _Model(x, loss, failed, good, root)
        self._model_cache = (self._version, model)
        return model

    @staticmethod
    def _goodness(loss: np.ndarray, failed: np.ndarray) -> np.ndarray:
        """1 for the best trial, 0 for the worst, by rank; failures rank last."""
        ranks = np.argsort(np.argsort(np.where(failed, np.inf, loss), kind="stable"))
        good = 1.0 - ranks / max(1, len(loss) - 1)
        good[failed] = 0.0
        return good

    def _tree_rows(self, n: int) -> int:
        if n <= self.max_model_points:
            return n
        m = self.max_model_points
        while m * 11 // 10 <= n:
            m = m * 11 // 10
        return m

    def _assign(self, node: _Node, x: np.ndarray, rows: np.ndarray) -> None:
        """Route ``rows`` of ``x`` down the (cached) cuts, refreshing every node's members."""
        node.idx = rows
        if node.children:
            left = node.goes_left(x[rows])
            self._assign(node.children[0], x, rows[left])
            self._assign(node.children[1], x, rows[~left])

    def _build(self, x: np.ndarray, good: np.ndarray) -> _Node:
        """Grow the partition tree, best split first, up to ``max_leaves`` leaves."""
        d = len(self.space)
        min_leaf = max(self.leaf_size, math.ceil(len(x) / (2 * self.max_leaves)))
        root = _Node(np.zeros(d), np.ones(d), {}, np.arange(len(x)))
        frontier = [root]
        leaves = 1
        while frontier and leaves < self.max_leaves:
            node = frontier.pop(0)
            if len(node.idx) < 2 * min_leaf or not self._split(node, x, good, min_leaf):
                continue
            frontier.extend(node.children)
            leaves += 1
        return root

    def _split(self, node: _Node, x: np.ndarray, good: np.ndarray, min_leaf: int) -> bool:
        """Cut ``node`` where it best separates high from low goodness; False when it can't."""
        xs, g = x[node.idx], good[node.idx]
        m = len(g)
        usable = ~np.isnan(xs).any(axis=0)
        if not usable.any():
            return False
        dims = np.flatnonzero(usable)
        vals = xs[:, dims].copy()
        orders: dict[int, np.ndarray] = {}
        for c, j in enumerate(map(int, dims)):
            if self._cat[j]:
                # Order categories by their mean goodness; unseen ones sit at the node mean.
                nc = self.space.n_choices[j]
                codes = xs[:, j].astype(int)
                sums = np.bincount(codes, weights=g, minlength=nc)
                cnt = np.bincount(codes, minlength=nc)
                means = np.where(cnt > 0, sums / np.maximum(cnt, 1), g.mean())
                order = np.argsort(means, kind="stable")
                pos = np.empty(nc)
                pos[order] = np.arange(nc)
                vals[:, c] = pos[codes]
                orders[j] = pos
        srt = np.argsort(vals, axis=0, kind="stable")
        vs = np.take_along_axis(vals, srt, axis=0)
        gs = g[srt]
        c1, c2 = np.cumsum(gs, axis=0), np.cumsum(gs * gs, axis=0)
        k = np.arange(1, m + 1, dtype=float)[:, None]
        sse_l = c2 - c1 * c1 / k
        nr = np.maximum(m - k, 1)
        sse_r = (c2[-1] - c2) - (c1[-1] - c1) ** 2 / nr
        sse = (sse_l + sse_r)[:-1]
        valid = (vs[:-1] < vs[1:]) & (k[:-1] >= min_leaf) & (m - k[:-1] >= min_leaf)
        if not valid.any():
            return False
        sse = np.where(valid, sse, np.inf)
        pos_best, col = np.unravel_index(int(np.argmin(sse)), sse.shape)
        total = c2[-1, 0] - c1[-1, 0] ** 2 / m
        if not sse[pos_best, col] < total - 1e-12:
            return False
        j = int(dims[col])
        node.dim = j
        left_rows = srt[: pos_best + 1, col]
        in_left = np.zeros(m, dtype=bool)
        in_left[left_rows] = True
        node.nan_left = bool(in_left.sum() >= m - in_left.sum())
        lo_l, hi_l, lo_r, hi_r = node.lo.copy(), node.hi.copy(), node.lo.copy(), node.hi.copy()
        al_l, al_r = dict(node.allowed), dict(node.allowed)
        if self._cat[j]:
            cut = vs[pos_best, col]
            node.left_codes = orders[j] <= cut
            base = node.allowed.get(j, np.ones(self.space.n_choices[j], dtype=bool))
            al_l[j], al_r[j] = base & node.left_codes, base & ~node.left_codes
        else:
            node.thr = 0.5 * (vs[pos_best, col] + vs[pos_best + 1, col])
            hi_l[j] = lo_r[j] = node.thr
        node.children = [
            _Node(lo_l, hi_l, al_l, node.idx[in_left]),
            _Node(lo_r, hi_r, al_r, node.idx[~in_left]),
        ]
        return True

    # -------------------------------------------------------------------------- selection
    def _select(self, model: _Model, pend: np.ndarray) -> _Node:
        """UCB descent; pending trials are visits that scored zero (virtual loss)."""
        node = model.root
        prows = np.arange(len(pend))
        while node.children:
            left = node.goes_left(pend[prows]) if len(prows) else np.zeros(0, dtype=bool)
            parts = [prows[left], prows[~left]]
            n_parent = len(node.idx) + len(prows)
            best, best_score = 0, -math.inf
            for c, child in enumerate(node.children):
                n_done, n_pend = len(child.idx), len(parts[c])
                value = model.good[child.idx].sum() / (n_done + self.virtual_loss * n_pend)
                bonus = math.sqrt(2 * math.log(n_parent) / (n_done + n_pend))
                score = value + self.exploration * bonus
                if score > best_score:
                    best, best_score = c, score
            node, prows = node.children[best], parts[best]
        return node

    # ------------------------------------------------------------------------ local solver
    def _gp(self, model: _Model, leaf: _Node) -> tuple[GP, np.ndarray]:
        """The GP for ``leaf``: all trials, or the ``max_model_points`` nearest its best."""
        n = len(model.x)
        big = n > self.max_model_points
        rows = np.arange(n)
        if big:
            rows = np.sort(self._nearest(model, model.x[self._leaf_best(model, leaf)], n)[
                : self.max_model_points
            ])  # fmt: skip
        key = tuple(rows.tolist()) if big else ()
        gp = model.gps.get(key)
        if gp is None:
            xn, xc = self._features(model.x[rows])
            y = self._transform(model.loss[rows])
            # The model cannot resolve features finer than the spacing of its points: a floor
            # on lengthscales makes it treat such ruggedness as noise and follow the trend.
            floor = max(0.01, self.min_ls * len(rows) ** (-1.0 / max(1, len(self.space))))
            theta = self._local_theta(model, leaf, floor) if big else None
            gp = GP(xn, xc, y, steps=self.gp_steps, theta=theta, min_lengthscale=floor)
            model.gps[key] = gp
        return gp, rows

    def _nearest(self, model: _Model, centre: np.ndarray, m: int) -> np.ndarray:
        """Rows among the first ``m`` of the model, nearest ``centre`` first."""
        xn, xc = self._features(model.x[:m])
        cn, cc = self._features(centre[None, :])
        d2 = np.square(xn - cn).sum(1) + (xc != cc).sum(1)
        return np.argsort(d2, kind="stable")

    def _local_theta(self, model: _Model, leaf: _Node, floor: float) -> np.ndarray:
        """Hyperparameters for a local GP when trials are many.

        Fitted on the ``fit_points`` trials nearest the leaf's best among the results the tree
        was learned from, so the fit only changes when the tree is re-learned (every ~10% of
        new results) and is memoised in between; the GP then conditions on the newest points
        with these hyperparameters. This keeps ``ask`` within milliseconds at 1,000 trials.
        """
        m = self._tree_rows(len(model.x))
        frozen = leaf.idx[leaf.idx < m]
        if len(frozen) == 0:
            frozen = np.arange(m)
        loss = np.where(model.failed[frozen], np.inf, model.loss[frozen])
        centre = model.x[frozen[int(np.argmin(loss))]]
        few = np.sort(self._nearest(model, centre, m)[: self.fit_points])
        key = (tuple(few.tolist()), floor)
        theta = self._theta_cache.get(key)
        if theta is None:
            xn, xc = self._features(model.x[few])
            theta = GP(
                xn, xc, self._transform(model.loss[few]), steps=self.gp_steps,
                starts=(math.log(0.5),), min_lengthscale=floor,
            ).theta  # fmt: skip
            if len(self._theta_cache) >= 64:
                self._theta_cache.pop(next(iter(self._theta_cache)))
            self._theta_cache[key] = theta
        return theta

    @staticmethod
    def _leaf_best(model: _Model, leaf: _Node) -> int:
        loss = np.where(model.failed[leaf.idx], np.inf, model.loss[leaf.idx])
        return int(leaf.idx[int(np.argmin(loss))])

    def _local(
        self, model: _Model, leaf: _Node, pend: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        gp, rows = self._gp(model, leaf)
        base_gp = gp
        if len(pend):
            # Kriging believer: pending trials are fantasised at their predicted mean.
            pn, pc = self._features(pend)
            mu, _ = gp.predict(pn, pc)
            gp = gp.condition(pn, pc, mu)
        centre = model.x[self._leaf_best(model, leaf)]
        cands = self._candidates(leaf, centre, gp, rng)
        if self.n_eda:
            cands = np.vstack([cands, self._eda(model, self.n_eda, rng)])
        cands = self._drop_held(cands)
        if len(cands) == 0:
            cands = self._drop_held(self._uniform(rng, self.n_candidates))
            if len(cands) == 0:  # every point of a small discrete space is taken
                return self._uniform(rng, 1)[0]
        cn, cc = self._features(cands)
        mu, sd = gp.predict(cn, cc)
        held = model.x[rows] if not len(pend) else np.vstack([model.x[rows], pend])
        # The incumbent is the best posterior mean at the points held, fantasies included:
        # robust to a lucky noisy value, and the neighbourhood of a pending trial promises
        # no further improvement.
        best = float(np.min(gp.predict(*self._features(held))[0]))
        score = log_ei(mu, sd, best)
        if self.done_gap > 0 and gp.noise > self.noisy * gp.scale:
            # Noisy objective: re-measuring right next to a finished trial teaches little.
            far = self._min_dist(cands, model.x[rows]) >= self.done_gap
            if far.any():
                score = np.where(far, score, -np.inf)
        if len(pend):
            # A candidate whose uncertainty is mostly explained by pending trials would mostly
            # repeat them: skip it (this keeps a batch spread out once the model is sure).
            _, sd0 = base_gp.predict(cn, cc)
            redundant = sd < self.redundancy * sd0
            # And a resolution floor: nothing within ``min_gap`` of a pending trial.
            redundant |= self._min_dist(cands, pend) < self.min_gap
            if not redundant.all():
                score = np.where(redundant, -np.inf, score)
        return cands[int(np.argmax(score))]

    def _candidates(
        self, leaf: _Node, centre: np.ndarray, gp: GP, rng: np.random.Generator
    ) -> np.ndarray:
        """Perturbations of the leaf's best point at several scales, plus uniform leaf points."""
        d = len(self.space)
        m_local = (3 * self.n_candidates) // 4
        base = np.repeat(centre[None, :], m_local, axis=0)
        # Inactive parameters of the centre get random values, used if a switch activates them.
        filler = self._uniform(rng, m_local, leaf)
        holes = np.isnan(base)
        base[holes] = np.nan_to_num(filler, nan=0.5)[holes]
        # Which coordinates move: all of them for half the candidates, 1-3 for the rest.
        move = np.ones((m_local, d), dtype=bool)
        few = np.arange(m_local) % 2 == 1
        if d > 1:
            k = rng.integers(1, min(3, d) + 1, size=int(few.sum()))
            pick = rng.random((int(few.sum()), d)).argsort(axis=1) < k[:, None]
            move[few] = pick
        nd = self._num_dims
        if len(nd):
            ls = gp.lengthscales[: len(nd)]
            w = ls / math.exp(float(np.mean(np.log(ls))))
            w = np.clip(w, 0.1, 10.0)
            scale = np.exp(rng.uniform(math.log(0.003), math.log(0.4), size=(m_local, 1)))
            step = rng.standard_normal((m_local, len(nd))) * scale * w
            base[:, nd] += np.where(move[:, nd], step, 0.0)
            base[:, nd] = _reflect(base[:, nd], leaf.lo[nd], leaf.hi[nd])
        for j in self._cat_dims:
            switch = move[:, j] & (rng.random(m_local) < 0.5)
            base[switch, j] = filler[switch, j]
        # Uniform candidates: half in the leaf, half anywhere (EI may prefer unexplored space).
        m_uni = self.n_candidates - m_local
        uniform = np.vstack(
            [self._uniform(rng, m_uni // 2, leaf), self._uniform(rng, m_uni - m_uni // 2)]
        )
        return self.space.canonical(np.vstack([base, uniform]))

    def _eda(self, model: _Model, m: int, rng: np.random.Generator) -> np.ndarray:
        """Samples from a per-dimension fit to the top trials (recombination of good points)."""
        ok = np.flatnonzero(~model.failed)
        k = max(3, int(math.ceil(self.eda_frac * len(ok))))
        top = model.x[ok[np.argsort(model.loss[ok], kind="stable")[:k]]]
        d = len(self.space)
        out = np.empty((m, d))
        for j in range(d):
            col = top[:, j]
            col = col[~np.isnan(col)]
            if self._cat[j]:
                nc = self.space.n_choices[j]
                w = np.bincount(col.astype(int), minlength=nc) + 1.0 / nc
                out[:, j] = rng.choice(nc, size=m, p=w / w.sum())
            elif len(col) == 0:
                out[:, j] = rng.random(m)
            else:
                sd = max(float(np.std(col)), 0.01)
                out[:, j] = _reflect(float(np.mean(col)) + sd * rng.standard_normal(m), 0.0, 1.0)
        return self.space.canonical(out)

    def _drop_held(self, cands: np.ndarray) -> np.ndarray:
        """Candidates that are not an exact repeat of a trial held."""
        held = np.fromiter(self._held.values(), dtype=float, count=len(self._held))
        return cands[~np.isin(self._hash(cands), held)]

    def _hash(self, x: np.ndarray) -> np.ndarray:
        """One float per row identifying the (canonical) point; used to spot repeats."""
        return np.round(np.nan_to_num(x, nan=-1.0), 9) @ self._hash_w
