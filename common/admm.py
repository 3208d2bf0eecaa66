"""Pure numerics of the consensus ADMM for the full P2P market (Sousa et al. 2019; Baroche et al.
2019): the peers' local update (``peer_node.engine``) and the residuals and rho policy of the
coordinator's loop (``coordinator.clearing``).

Each peer n owns its trades x = p_nm with its M partners (matrix (M, H)). One iteration:

1. local update, with tau_m = (p_nm^k - p_mn^k)/2 + lambda_nm^k / rho:
      x^{k+1} = argmin  C_n(sum_m x_m) + sum_m [ w_m x_m + rho/2 (x_m - tau_m)^2 ]
                s.t.    p_min <= sum_m x_m <= p_max,   sign * x_m >= 0
   (``solve_local``: exact, by a breakpoint search on the multiplier of sum_m x_m = P_n);
2. exchange of the new trades with the partners;
3. price update  lambda_nm^{k+1} = lambda_nm^k - rho/2 (p_nm^{k+1} + p_mn^{k+1})  (both sides
   compute the same number, so prices stay private to the pair).

Residuals (Boyd et al. 2011, sec. 3.3): primal r = ||p_nm + p_mn|| (MW, over all ordered trades
and hours), dual s = rho ||x^{k+1} - x^k|| (EUR/MWh). Residual balancing (Boyd 3.4.1) scales
rho by tau when r > mu s and divides it when s > mu r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LocalP2P:
    """One peer's private data and its ADMM state. Arrays over hours have shape (H,), trade
    arrays (M, H)."""

    p_min_mw: np.ndarray
    p_max_mw: np.ndarray
    cost_a: np.ndarray
    cost_b: np.ndarray
    sign: float  # +1 producer, -1 consumer, 0 both ways (prosumer: trades of either sign)
    weights: np.ndarray  # (M, H) differentiation cost per MWh of each trade
    x: np.ndarray = field(default=None)  # own trades p_nm (M, H)
    y: np.ndarray = field(default=None)  # partners' trades p_mn (M, H)
    lam: np.ndarray = field(default=None)  # prices lambda_nm (M, H)
    cost_b_neg: np.ndarray | None = None  # slope where the injection is negative (two-slope cost), two-way peers

    def __post_init__(self):
        shape = self.weights.shape
        self._set_problem(shape[1])
        if self.x is None:
            self.x = np.zeros(shape)
        if self.y is None:
            self.y = np.zeros(shape)
        if self.lam is None:
            self.lam = np.zeros(shape)

    def _set_problem(self, H: int) -> None:
        """The local problem in producer form (consumers mirrored), arrays of shape (H,)."""
        a, b, lo, hi = (np.broadcast_to(np.asarray(v, dtype=float), (H,)).copy()
                        for v in (self.cost_a, self.cost_b, self.p_min_mw, self.p_max_mw))
        if self.sign == 0:
            b_neg = b if self.cost_b_neg is None else np.broadcast_to(np.asarray(self.cost_b_neg, dtype=float), (H,)).copy()
            self._prod = (a, b, b_neg, lo, hi)
            return
        self._prod = (a, b, lo, hi) if self.sign > 0 else (a, -b, -hi, -lo)

    def retune(self, p_min_mw, p_max_mw, cost_a, cost_b, weights=None) -> None:
        """New bounds, cost or differentiation weights between two clearings (outer loop); the
        ADMM state (trades, partners' trades, prices) is kept, so the next clearing is warm."""
        self.p_min_mw, self.p_max_mw, self.cost_a, self.cost_b = p_min_mw, p_max_mw, cost_a, cost_b
        if weights is not None:
            self.weights = np.asarray(weights, dtype=float).reshape(self.x.shape)
        self._set_problem(self.x.shape[1])

    def step(self, rho: float, hours: np.ndarray | None = None, prox: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Local update of the given hours (all by default: the hours are independent problems);
        returns the new trades of those hours (M, h) and the squared change per hour (h,) (for the
        dual residual). ``prox`` > 0 adds the proximal term prox/2 ||x - x_current||^2 (the
        asynchronous ADMM's damping: the same problem with rho + prox and beta + prox x)."""
        if hours is None:
            beta = 0.5 * rho * (self.x - self.y) + self.lam - self.weights  # rho tau - w
            prod = self._prod
            if prox:
                beta = beta + prox * self.x
                rho = rho + prox
        else:
            beta = 0.5 * rho * (self.x[:, hours] - self.y[:, hours]) + self.lam[:, hours] - self.weights[:, hours]
            prod = tuple(v[hours] for v in self._prod)
        if self.sign > 0:
            x_new = _solve_producer(beta, rho, *prod)
        elif self.sign == 0:
            x_new = _solve_free(beta, rho, *prod)
        else:
            x_new = -_solve_producer(-beta, rho, *prod)
        if hours is None:
            dx = np.sum((x_new - self.x) ** 2, axis=0)
            self.x = x_new
        else:
            dx = np.sum((x_new - self.x[:, hours]) ** 2, axis=0)
            self.x[:, hours] = x_new
        return x_new, dx

    def receive(self, y: np.ndarray, rho: float, hours: np.ndarray | None = None) -> np.ndarray:
        """Partners' new trades of the given hours (all by default) arrive: price update; returns
        the squared primal mismatch per hour."""
        if hours is None:
            self.y = y
            mismatch = self.x + y
            self.lam = self.lam - 0.5 * rho * mismatch
        else:
            self.y[:, hours] = y
            mismatch = self.x[:, hours] + y
            self.lam[:, hours] -= 0.5 * rho * mismatch
        return np.sum(mismatch**2, axis=0)

    @property
    def p_mw(self) -> np.ndarray:
        return self.x.sum(axis=0)


def best_response(a, b, lo, hi, price, b_neg=None) -> tuple[np.ndarray, np.ndarray]:
    """The net injections p in [lo, hi] that maximise price p - (a p^2/2 + b p), per hour, as an
    interval (q_low, q_high): one point where a > 0, the whole [lo, hi] where a = 0 and the price
    equals b (a linear cost is indifferent there). The answer to a pool-price probe.
    ``b_neg``: the slope where p < 0 of a two-slope cost (not above b); between the two slopes
    the answer is p = 0 (clipped to the bounds)."""
    if b_neg is not None:
        return _best_response_kinked(*(np.asarray(v, dtype=float) for v in (a, b, b_neg, lo, hi, price)))
    a, b, lo, hi, price = (np.asarray(v, dtype=float) for v in (a, b, lo, hi, price))
    with np.errstate(divide="ignore", invalid="ignore"):
        interior = np.clip((price - b) / np.where(a > 0, a, 1.0), lo, hi)
    flat = np.where(price > b, hi, lo)
    q_low = np.where(a > 0, interior, flat)
    q_high = np.where(a > 0, interior, np.where(price >= b, hi, lo))
    return q_low, q_high


def _best_response_kinked(a, b, b_neg, lo, hi, price):
    zero = np.clip(0.0, lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(a > 0, a, 1.0)
        interior = np.clip(np.where(price > b, (price - b) / safe, np.where(price < b_neg, (price - b_neg) / safe, 0.0)),
                           lo, hi)
    q_high = np.where(price >= b, hi, np.where(price >= b_neg, zero, lo))
    q_low = np.where(price <= b_neg, lo, np.where(price <= b, zero, hi))
    return np.where(a > 0, interior, q_low), np.where(a > 0, interior, q_high)


def pool_start(q_mw: np.ndarray, price_eur_per_mwh: np.ndarray, graph) -> tuple[np.ndarray, np.ndarray]:
    """The ADMM's starting point from a uniform (pool) price: trades (K, H) that split each
    producer's injection over the consumers in proportion to their consumption (reciprocal, and
    summing to every peer's injection when supply and demand balance), and every trade's price at
    the hour's pool price. ``q_mw`` (N, H): the peers' injections at that price.

    With restricted partners (``common.partners``) the proportional split is then balanced on the
    graph's pairs by iterative proportional fitting (Sinkhorn): each producer's trades scaled to
    its injection, each consumer's to its consumption, in turn, until both hold (a no-op on the
    full market, where the proportional split already balances)."""
    q = np.asarray(q_mw, dtype=float)
    supply = np.clip(q, 0.0, None)
    demand = np.clip(-q, 0.0, None)
    total = 0.5 * (supply.sum(axis=0) + demand.sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, 1.0 / total, 0.0)
    if np.all(graph.sign != 0):
        seller = np.where(graph.sign > 0, graph.owner, graph.partner)
        buyer = np.where(graph.sign > 0, graph.partner, graph.owner)
        volume = supply[seller] * demand[buyer] * share  # (K, H) what the seller sells to the buyer
        volume = _balance(volume, seller, buyer, supply, demand, graph.sign > 0, graph.reverse)
        trades = graph.sign[:, None] * volume
    else:  # two-way peers: who sells is decided per hour by the sign of the injection
        trades = (supply[graph.owner] * demand[graph.partner] - demand[graph.owner] * supply[graph.partner]) * share
    prices = np.broadcast_to(np.asarray(price_eur_per_mwh, dtype=float), trades.shape).copy()
    return trades, prices


def _balance(volume, seller, buyer, supply, demand, own, reverse, iterations: int = 200, tol_mw: float = 1e-9):
    """Scale the volumes of the pairs so that every seller's sum is its supply and every buyer's its
    demand, per hour (each pair appears twice, once per owner: ``own`` marks the seller-owned rows,
    ``reverse`` the other row of each pair). Where the pairs cannot carry the injections (a
    producer whose partners cannot take its output), the buyers' sums hold and the sellers' are
    as close as the iterations got."""
    import scipy.sparse as sp

    k_own = np.flatnonzero(own)
    v = volume[k_own].copy()
    n, K = supply.shape[0], len(k_own)
    S = sp.csr_matrix((np.ones(K), (seller[k_own], np.arange(K))), shape=(n, K))
    B = sp.csr_matrix((np.ones(K), (buyer[k_own], np.arange(K))), shape=(n, K))
    St, Bt = S.T.tocsr(), B.T.tocsr()
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(iterations):
            rows = S @ v
            v *= St @ np.where(rows > 0, supply / rows, 0.0)
            cols = B @ v
            v *= Bt @ np.where(cols > 0, demand / cols, 0.0)
            if np.max(np.abs(S @ v - supply)) <= tol_mw:
                break
    out = np.zeros_like(volume)
    out[k_own] = v
    out[reverse[k_own]] = v
    return out


def solve_local(tau, w, rho, a, b, lo, hi, sign):
    """argmin_x  a/2 s^2 + b s + sum_m [w_m x_m + rho/2 (x_m - tau_m)^2],  s = sum_m x_m,
    lo <= s <= hi, sign*x_m >= 0; vectorised over hours (columns).

    A consumer (sign -1) is mirrored into a producer (x -> -x, b -> -b, bounds -> -bounds).
    For a producer, with nu the multiplier of s = sum x, x_m = max(0, (beta_m - nu)/rho) where
    beta = rho tau - w. If exactly the k largest beta are active, sum x = (S_k - k nu)/rho with
    S_k their sum, and the one-dimensional problem in s gives s = clip((S_k - k b)/(rho + k a),
    lo, hi) and nu = (S_k - rho s)/k. The right k is the one whose nu falls between the k-th and
    (k+1)-th largest beta; k = 0 (no trade) is right when lo = 0 and max beta <= b.
    """
    H = tau.shape[1]
    a, b, lo, hi = (np.broadcast_to(np.asarray(v, dtype=float), (H,)) for v in (a, b, lo, hi))
    beta = rho * tau - w
    if sign == 0:
        return _solve_free(beta, rho, a, b, b, lo, hi)
    if sign < 0:
        return -_solve_producer(-beta, rho, a, -b, -hi, -lo)
    return _solve_producer(beta, rho, a, b, lo, hi)


def _solve_producer(beta, rho, a, b, lo, hi):
    """The producer case of ``solve_local`` with beta = rho tau - w; a, b, lo, hi of shape (H,)."""
    M, H = beta.shape
    srt = np.sort(beta, axis=0)[::-1]  # descending, (M, H)
    k = _K[:M] if M <= len(_K) else np.arange(1, M + 1, dtype=float)[:, None]
    S = np.cumsum(srt, axis=0)
    s_k = np.clip((S - k * b) / (rho + k * a), lo, hi)
    nu_k = (S - rho * s_k) / k
    tol = 1e-12 * (1.0 + np.abs(srt))
    valid = nu_k <= srt + tol
    valid[:-1] &= nu_k[:-1] >= srt[1:] - tol[1:]
    first = np.argmax(valid, axis=0)
    nu = nu_k[first, np.arange(H)]
    none = (lo <= 0) & (srt[0] <= b)  # k = 0: no trade at all
    nu = np.where(none | ~valid.any(axis=0), np.maximum(srt[0], b), nu)
    x = beta - nu
    np.maximum(x, 0.0, out=x)
    x /= rho
    return x


_K = np.arange(1, 257, dtype=float)[:, None]


def _solve_free(beta, rho, a, b, b_neg, lo, hi):
    """``solve_local`` for a two-way peer (no sign constraint on its trades), with a cost whose
    linear slope is b for s > 0 and b_neg (<= b) for s < 0. With the sum s fixed, x_m = beta_m/rho
    + (s - S/rho)/M (S = sum beta); the one-dimensional problem min C(s) + rho/(2M) (s - S/rho)^2
    has the closed form below (the kink at 0 keeps s = 0 for S/M between b_neg and b)."""
    M = beta.shape[0]
    S = beta.sum(axis=0)
    c = rho / M
    pos = (S / M - b) / (a + c)
    neg = (S / M - b_neg) / (a + c)
    s = np.clip(np.where(pos > 0, pos, np.where(neg < 0, neg, 0.0)), lo, hi)
    return beta / rho + (s - S / rho) / M


def residual_balance(rho: float, primal: float, dual: float, mu: float = 10.0, tau: float = 2.0) -> float:
    """Boyd et al. 2011, eq. 3.13: keep the primal and dual residuals within a factor mu."""
    if primal > mu * dual:
        return rho * tau
    if dual > mu * primal:
        return rho / tau
    return rho


@dataclass
class RhoPolicy:
    """Residual balancing with a cadence: rho may change only every ``every`` iterations and not
    after ``until`` iterations. Changing rho at every iteration can lock ADMM into a limit cycle
    on degenerate markets (prices sitting on a kink of several cost curves); Boyd et al. (3.4.1)
    note that convergence is only guaranteed once rho stops changing."""

    rho: float
    enabled: bool = True
    mu: float = 10.0
    tau: float = 2.0
    every: int = 10
    until: int = 2000

    def update(self, iteration: int, primal: float, dual: float) -> float:
        if self.enabled and iteration % self.every == 0 and iteration <= self.until:
            self.rho = residual_balance(self.rho, primal, dual, self.mu, self.tau)
        return self.rho


class InfeasibilityWatch:
    """Tells an infeasible market from a slow one while the ADMM runs (Boyd et al. 2011, sec.
    3.3: on an infeasible problem the primal residual converges to a nonzero vector, the gap
    between the two constraint sets, while the iterates settle and the duals, the prices, grow
    without bound).

    ``observe(primal, move, rho)`` once per iteration, with the primal residual [MW], how far the
    iterates moved [MW] (the dual residual divided by rho) and rho. The market is stalled when,
    over the last ``window`` iterations (and not before ``min_iterations``), the primal residual
    stayed above ``floor`` times the tolerance and within ``flat`` of its last value while the
    iterates moved less than ``settled`` times the primal residual per iteration: reciprocity (or
    the network's copy) is missed by a steady amount. A feasible market can sit on such a plateau
    for a while (until a price crosses some peer's kink), so the watch fires only once the prices
    have moved by ``price_span_eur_per_mwh`` in total during the stall (each iteration moves them
    by about rho times the primal residual) with no response: no cost curve of a market reaches
    that far.
    """

    def __init__(self, tolerance: float, window: int = 50, min_iterations: int = 100, flat: float = 0.01,
                 settled: float = 0.01, floor: float = 100.0, price_span_eur_per_mwh: float = 1000.0):
        self.tolerance, self.window, self.min_iterations = tolerance, window, min_iterations
        self.flat, self.settled, self.floor, self.span = flat, settled, floor, price_span_eur_per_mwh
        self._primal: list[float] = []
        self._move: list[float] = []
        self.seen = 0
        self.drift = 0.0  # how far the prices moved during the current stall [EUR/MWh]
        self.fired = False

    def observe(self, primal: float, move_mw: float, rho: float = 1.0) -> bool:
        if self.window <= 0:
            return False
        self._primal.append(float(primal))
        self._move.append(float(move_mw))
        if len(self._primal) > self.window + 1:
            del self._primal[0], self._move[0]
        self.seen += 1
        r = self._primal[-1]
        stalled = (self.seen >= max(self.min_iterations, self.window + 1) and np.isfinite(r)
                   and r > self.floor * self.tolerance
                   and max(self._primal) - min(self._primal) <= self.flat * r and max(self._move) <= self.settled * r)
        self.drift = self.drift + rho * r if stalled else 0.0
        if stalled and self.drift >= self.span:
            self.fired = True
        return self.fired


def infeasible_hours(residual_by_hour: np.ndarray, tolerance: float) -> list[int]:
    """The hours (1-based) whose own primal residual stays above ten times the tolerance."""
    r = np.asarray(residual_by_hour, dtype=float)
    return [int(t) + 1 for t in np.flatnonzero(r > 10.0 * tolerance)]


def converged(primal: float, dual: float, tolerance: float) -> bool:
    return primal <= tolerance and dual <= tolerance


class DriftSteps:
    """Longer steps where the fixed-point map is (nearly) a translation. When a block's fixed-point
    residual f = T(z) - z stays the same from one step to the next (its trades sit on their bounds
    and only some prices move, by rho/2 times a small mismatch per iteration: a small peer whose
    prices must travel far after a differentiation change), Anderson's differences vanish and it
    cannot extrapolate. A block whose newest difference of f is below ``flat`` times f steps to
    z + m f instead. The step is judged by Anderson's safeguard like an extrapolated one, against
    the lowest residual norm at which such steps began (a translation keeps the norm; ``slack``
    allows for the trades' small response, and the lowest norm keeps repeated runs of steps from
    ratcheting it up); m doubles after each step taken (up to ``m_max``) and a rejected step
    halves the m that failed (m >= 2). Works on the sums the coefficients see (the newest
    difference's and the residual's squared norms), so that relay and mesh take the same steps."""

    def __init__(self, flat: float = 0.003, slack: float = 0.05, m_max: float = 1024.0):
        self.flat, self.slack, self.m_max = flat, slack, m_max
        self.m = None
        self.jumps = 0

    def keep(self, mask: np.ndarray) -> None:
        if self.m is not None:
            self.m, self.jumped, self.base = self.m[mask], self.jumped[mask], self.base[mask]

    def step(self, coef: AndersonCoefficients, newest_sq: np.ndarray, f_sq: np.ndarray,
             reject: np.ndarray) -> np.ndarray | None:
        """The multiplier m of each block that steps to z + m f (0: none), or None when none does;
        marks those blocks as accelerated for the safeguard."""
        B = len(f_sq)
        if self.m is None or len(self.m) != B:
            self.m, self.jumped, self.base = np.full(B, 2.0), np.zeros(B, dtype=bool), np.zeros(B)
        failed = reject & self.jumped  # m was doubled after the step that failed
        self.m[failed] = np.maximum(2.0, self.m[failed] / 4)
        jump = (newest_sq <= self.flat**2 * f_sq) & (f_sq > 0) & ~reject
        start = jump & ~self.jumped
        norm = np.sqrt(f_sq[start])
        self.base[start] = np.where(self.base[start] > 0, np.minimum(self.base[start], norm), norm)
        self.jumped = jump
        if not jump.any():
            return None
        coef.accelerated[jump] = True
        coef.last_norm[jump] = (1 + self.slack) * self.base[jump]
        out = np.where(jump, self.m, 0.0)
        self.m[jump] = np.minimum(2 * self.m[jump], self.m_max)
        self.jumps += int(jump.sum())
        return out


class AndersonMemory:
    """The local half of :class:`BlockAnderson`: the last ``memory`` differences of one slice of
    the state of every block, and what the coefficients need from them. The Gram column, the
    right-hand side and the squared residual are sums over the state's entries, so the slices of
    several holders add up (mesh topology: each peer host holds its own peers' trades and prices and
    the coordinator only sees the sums). Only the first ``counted`` entries of a block enter the
    sums (the rest, e.g. partners' trades a peer mirrors, are extrapolated alongside)."""

    def __init__(self, memory: int = 20):
        self.memory = memory
        self.DZ = None

    def _allocate(self, B: int, n: int) -> None:
        m = self.memory
        self.DZ = np.zeros((B, m, n))
        self.DF = np.zeros((B, m, n))
        self.last_z = np.zeros((B, n))
        self.last_f = np.zeros((B, n))
        self.fallback = np.zeros((B, n))
        self.head = 0

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the blocks where ``mask`` is true (in order)."""
        if self.DZ is None:
            return
        for name in ("DZ", "DF", "last_z", "last_f", "fallback", "_z", "_t", "_f"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[mask])

    def record(self, z: np.ndarray, t: np.ndarray, counted: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map took ``z`` (blocks, n) to ``t``: store the differences; returns this slice's Gram
        column (blocks, memory), right-hand side (blocks, memory) and squared residual (blocks,)."""
        B, n = z.shape
        if self.DZ is None or self.DZ.shape[0] != B or self.DZ.shape[2] != n:
            self._allocate(B, n)
        f = t - z
        j = self.head
        self.DZ[:, j] = z - self.last_z
        self.DF[:, j] = f - self.last_f
        self.head = (j + 1) % self.memory
        self._z, self._t, self._f = z, t, f
        c = slice(None) if counted is None else slice(0, counted)
        DF, fc = self.DF[:, :, c], f[:, c]
        return (np.einsum("bmn,bn->bm", DF, self.DF[:, j, c]), np.einsum("bmn,bn->bm", DF, fc),
                np.einsum("bn,bn->b", fc, fc))

    def extrapolate(self, gamma: np.ndarray, reject: np.ndarray, drift: np.ndarray | None = None) -> np.ndarray:
        """The next point of every block from the coefficients (a rejected block: the plain step
        from its last accepted point; a block with ``drift`` m > 0: z + m f, ``DriftSteps``)."""
        out = self._t - np.einsum("bm,bmn->bn", gamma, self.DZ) - np.einsum("bm,bmn->bn", gamma, self.DF)
        out[reject] = self.fallback[reject]
        if drift is not None:
            jump = drift > 0
            out[jump] = self._t[jump] + (drift[jump, None] - 1) * self._f[jump]
        accepted = ~reject
        self.last_z[accepted], self.last_f[accepted] = self._z[accepted], self._f[accepted]
        self.fallback[accepted] = self._t[accepted]
        return out


class AndersonCoefficients:
    """The global half of :class:`BlockAnderson`: from the summed Gram columns, right-hand sides
    and squared residuals, which differences are valid, the safeguard and the coefficients."""

    def __init__(self, memory: int = 20, safeguard: float = 1.0, regularization: float = 1e-10, drift: bool = True):
        self.memory, self.safeguard, self.reg = memory, safeguard, regularization
        self.rejected = 0
        self.accepted = 0
        self.gram = None
        self.drift = DriftSteps() if drift else None
        self.drift_m: np.ndarray | None = None  # the last step's DriftSteps multipliers (None: no block)

    def _allocate(self, B: int) -> None:
        m = self.memory
        self.gram = np.zeros((B, m, m))
        self.valid = np.zeros((B, m), dtype=bool)  # columns written since the block's last reset
        self.has_last = np.zeros(B, dtype=bool)
        self.accelerated = np.zeros(B, dtype=bool)
        self.last_norm = np.zeros(B)
        self.head = 0

    def keep(self, mask: np.ndarray) -> None:
        if self.gram is None:
            return
        for name in ("gram", "valid", "has_last", "accelerated", "last_norm"):
            setattr(self, name, getattr(self, name)[mask])
        if self.drift is not None:
            self.drift.keep(mask)

    def step(self, col: np.ndarray, rhs: np.ndarray, f_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(gamma (blocks, memory), reject (blocks,))`` for the newest differences."""
        B = len(f_sq)
        if self.gram is None or self.gram.shape[0] != B:
            self._allocate(B)
        norm = np.sqrt(f_sq)
        reject = self.accelerated & self.has_last & (norm > self.safeguard * self.last_norm)
        j = self.head
        self.valid[:, j] = self.has_last & ~reject
        self.head = (j + 1) % self.memory
        self.gram[:, j, :] = col
        self.gram[:, :, j] = col
        # blocks whose accelerated point was rejected forget their differences
        self.valid[reject] = False
        pair = self.valid[:, :, None] & self.valid[:, None, :]
        G = np.where(pair, self.gram, 0.0)
        count = self.valid.sum(axis=1)
        scale = np.einsum("bii->b", G) / np.maximum(count, 1) + 1e-300
        eye = np.eye(self.memory)[None]
        G = G + eye * np.where(self.valid, self.reg * scale[:, None], 1.0)[:, :, None]
        gamma = np.linalg.solve(G, np.where(self.valid, rhs, 0.0)[:, :, None])[:, :, 0]
        self.rejected += int(reject.sum())
        accepted = ~reject
        self.accepted += int((accepted & (count > 0)).sum())
        self.last_norm[accepted] = norm[accepted]
        self.has_last = accepted.copy()
        self.accelerated = accepted & (count > 0)
        self.drift_m = None if self.drift is None else self.drift.step(self, col[:, j], f_sq, reject)
        return gamma, reject


class BlockAnderson:
    """Anderson acceleration of independent blocks at once (the hours of the full P2P market are
    independent problems): each block extrapolates with its own coefficients from its own last
    ``memory`` differences, and the safeguard rejects and resets one block without touching the
    others. ``step(z, t)`` with arrays (blocks, n); ``keep(mask)`` drops blocks (closed hours).
    The memory of the differences and the coefficients are separate halves
    (:class:`AndersonMemory`, :class:`AndersonCoefficients`), so that the state may be spread over
    several holders whose sums meet in one place (mesh topology)."""

    def __init__(self, memory: int = 20, safeguard: float = 1.0, regularization: float = 1e-10, drift: bool = True):
        self.mem = AndersonMemory(memory)
        self.coef = AndersonCoefficients(memory, safeguard, regularization, drift)

    @property
    def rejected(self) -> int:
        return self.coef.rejected

    @property
    def accepted(self) -> int:
        return self.coef.accepted

    def keep(self, mask: np.ndarray) -> None:
        self.mem.keep(mask)
        self.coef.keep(mask)

    def step(self, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        gamma, reject = self.coef.step(*self.mem.record(z, t))
        return self.mem.extrapolate(gamma, reject, self.coef.drift_m)


class Anderson(BlockAnderson):
    """Anderson acceleration (type II, Walker & Ni 2011) of one fixed-point map z -> T(z), with a
    safeguard: an accelerated point whose fixed-point residual grows by more than ``safeguard``
    times the last accepted one is rejected, the memory cleared and the plain iterate from the
    last accepted point taken instead. ``step(z, t)``: given the point the map was applied to and
    its image T(z), the next point (``t`` itself when there is nothing to extrapolate from). One
    block of ``BlockAnderson``."""

    def step(self, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        return super().step(z[None, :], t[None, :])[0]
