"""Why attention falls as a power law: the pool's pattern frequencies set the exponent gamma.

Uniform pool: every pattern reaches k exposures at about the same step (M = r N_t ~ k P recurring
exposures), so the recurring part of the attention count drops from r f n to 0 in one sharp step,
of relative width ~ 1 / sqrt(k) in t.

Zipf pool, p_i = i^-s / Z (s > 1; Z = zeta(s) for an unbounded pool): frequent patterns consolidate
early, rare ones late. With M = r t b f n recurring exposures so far, the unconsolidated mass is
    U(M) = sum_i p_i P(Poisson(M p_i) < k) = sum_i p_i Q(k, M p_i).
Derivation (derive_tail does each step in sympy). Replace the sum by an integral over x >= 1 and
substitute u = M p(x), i.e. x = (M / (Z u))^(1/s); x from 1 to oo is u from M/Z down to 0:
    U(M) = int_0^{M/Z} (u / M) Q(k, u) |dx/du| du
         = (1/s) Z^(-1/s) M^(1/s - 1) int_0^{M/Z} u^(-1/s) Q(k, u) du.
As M -> oo the upper limit goes to oo (the rest is exponentially small) and, since
Q(k, u) = sum_{j<k} e^-u u^j / j!, the integral is a sum of k Gamma integrals, each finite as s > 1:
    int_0^oo u^(-1/s) Q(k, u) du = sum_{j<k} Gamma(j + 1 - 1/s) / j!
                                 = Gamma(k + 1 - 1/s) / ((1 - 1/s) Gamma(k)).
Hence
    U(M) ~ C M^-gamma,   gamma = 1 - 1/s,   C = Gamma(k + 1 - 1/s) / ((s - 1) Gamma(k) Z^(1/s)),
so the recurring part of the attention count, r f n U, falls as t^-gamma, whatever k, b, r and n.
(The sum-to-integral error is relatively O(1 / i*), i* = (M / (k Z))^(1/s) the consolidation
frontier, since the summand varies on that scale.) Inverting, s = 1 / (1 - gamma): the paper's
gamma = 0.43 +- 0.04 matches s = 1.75 (1.64 to 1.89). A pool of P patterns follows the power law
only while i* is well inside it; once i* ~ P everything has consolidated. power_law_steps keeps
10 <= i* <= P / 100, where the pool's missing tail biases a fitted slope by at most 0.025 (s = 1.5;
less for larger s, measured on the exact expectation); power_law_window finds the whole range
where the exact expectation's local slope is gamma (a training run is read against it).
"""
import functools
import math

import numpy as np
import sympy as sp


def zipf_pool(P, s):
    p = np.arange(1, P + 1, dtype=float) ** -s
    return p / p.sum()


def gamma_of_s(s):
    return 1 - 1 / s


def s_of_gamma(gamma):
    return 1 / (1 - gamma)


@functools.lru_cache
def derive_tail():
    """The derivation above in sympy. Returns (gamma, C) as expressions in s, k and Z."""
    x, u, M, Z, w = sp.symbols("x u M Z w", positive=True)
    k = sp.Symbol("k", positive=True, integer=True)
    s = 1 + w  # s > 1, written so that sympy knows it
    x_of_u = (M / (Z * u)) ** (1 / s)
    assert sp.simplify(M * x_of_u**-s / Z - u) == 0  # it inverts u = M p(x)
    j = sp.Symbol("j", nonnegative=True, integer=True)
    factor = sp.simplify((u / M) * -sp.diff(x_of_u, u))  # the integrand is factor * Q(k, u)
    exponent = sp.simplify(M * sp.diff(sp.log(factor), M))  # d log U / d log M
    assert not exponent.has(u, Z, M)  # so factor = g(u) M^exponent: a pure power law in M
    # int_0^oo u^(-1/s) Q(k, u) du with Q(k, u) = sum_{j<k} e^-u u^j / j!: k Gamma integrals
    gamma_integral = sp.integrate(u ** (j - 1 / s) * sp.exp(-u) / sp.factorial(j), (u, 0, sp.oo),
                                  conds="none")
    inner = sp.summation(gamma_integral, (j, 0, k - 1))
    C = sp.gammasimp(factor / M**exponent / u ** (-1 / s) * inner)
    s_ = sp.Symbol("s", positive=True)
    return sp.simplify(-exponent.subs(w, s_ - 1)), sp.simplify(C.subs(w, s_ - 1))


def tail_asymptote(M, s, k, Z):
    """C M^-gamma, the large-M form of the unconsolidated mass (numpy twin of derive_tail)."""
    C = math.gamma(k + 1 - 1 / s) / ((s - 1) * math.gamma(k) * Z ** (1 / s))
    return C * np.asarray(M, float) ** -gamma_of_s(s)


def frontier(M, s, k, Z):
    """i* = (M / (k Z))^(1/s): patterns more frequent than this have (about) consolidated."""
    return (np.asarray(M, float) / (k * Z)) ** (1 / s)


def fit_power_law(x, y):
    """gamma from a least-squares line through (log x, log y): y ~ x^-gamma."""
    slope, _ = np.polyfit(np.log(x), np.log(y), 1)
    return -slope


def power_law_steps(P, s, k, per_step, num=25):
    """Steps at which the frontier i* runs from 10 to P / 100: the range where a pool of P patterns
    shows the power law (earlier, the few top patterns consolidate one by one; later, the pool's
    end is near). per_step = r b f n, the recurring exposures per step. Returns distinct ints."""
    Z = (np.arange(1, P + 1, dtype=float) ** -s).sum()
    M = k * Z * np.geomspace(10.0, P / 100, num) ** s  # invert i* = (M / (k Z))^(1/s)
    return np.unique(np.maximum(1, np.round(M / per_step))).astype(int)


def unconsolidated_mass(M, p, k):
    """U(M) = sum_i p_i P(Poisson(M p_i) < k) for each M: the share of recurring queries whose
    pattern has had fewer than k of the M recurring exposures so far (any pool p, any k: the
    regularised upper incomplete gamma Q(k, x) = P(Poisson(x) < k) costs the same for k = 10^6)."""
    import torch  # for its gammaincc; theory/ needs torch nowhere else
    lam = torch.as_tensor(np.outer(np.asarray(M, float), p), dtype=torch.float64)
    return (torch.special.gammaincc(torch.full_like(lam, float(k)), lam).numpy() * p).sum(-1)


def power_law_window(p, s, k, tol=0.05, M_max=1e12, num=600):
    """Where the exact expectation U(M) of a pool p follows M^-gamma, gamma = 1 - 1/s: the longest
    range of recurring exposures M over which the local slope -dlog U / dlog M stays within tol of
    gamma. Before it the first few patterns consolidate one by one; after it the pool's end is
    reached. -> (M_lo, M_hi, U(M_lo), U(M_hi)), or None where no point is within tol. M_lo grows
    faster than k, the shares at the two ends much less (s = 2, P = 5600, k = 10, 100, 1000:
    M_lo = 133, 9.7e3, 5.2e5; the window starts at U = 0.21, 0.079, 0.034 and ends at U = 0.0011
    for all three): the shares a run must resolve to see the power law are set mostly by the
    pool."""
    M = np.geomspace(max(k, 1) * 1e-2, M_max, num)
    U = unconsolidated_mass(M, p, k)
    M, U = M[U > 1e-300], U[U > 1e-300]  # past the pool's end U underflows, and log needs U > 0
    slope = -np.gradient(np.log(U), np.log(M))
    inside = np.abs(slope - gamma_of_s(s)) <= tol
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside, [0]]).astype(int)))
    starts, ends = edges[::2], edges[1::2]  # each run of points inside is [start, end)
    if not len(starts):
        return None
    j = np.argmax(ends - starts)
    lo, hi = starts[j], ends[j] - 1
    return float(M[lo]), float(M[hi]), float(U[lo]), float(U[hi])
