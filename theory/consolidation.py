"""A consolidating learner: the expected attention count per sequence, in closed form and simulated.

Model. Training step t = 0, 1, ... sees b sequences with q = f n queries each. A query is recurring
with probability r, its pattern then drawn from a pool with probabilities p_1..p_P (uniform:
p_i = 1/P), else novel. A pattern is consolidated once it has been seen k times in earlier steps,
and a query goes to attention iff it is novel or its pattern is not consolidated yet: the
consolidating scheme of lower_bound.py, C being the patterns seen >= k times.

Closed form. Before step t the learner has seen N_t = t b f n queries; each was pattern i with
probability r p_i independently, so pattern i has been seen Binomial(N_t, r p_i) times,
independently of the queries of step t. Linearity of expectation over the f n queries of a
sequence gives
    E[attn_t] = f n [ (1 - r) + r sum_i p_i P(Bin(N_t, r p_i) < k) ],
and for a uniform pool (closed_form)
    E[attn_t] = f n [ (1 - r) + r sum_{j<k} C(N_t, j) (r/P)^j (1 - r/P)^(N_t - j) ].
k = 1 is a geometric decay, f n [(1 - r) + r (1 - r/P)^(t b f n)]. For a large pool the count is
Poisson (poisson_form): P(Bin < k) ~ Q(k, r N_t / P), Q(k, x) = Gamma(k, x) / Gamma(k).
Limit (closed_form_limit): for each fixed j, C(N, j) pi^j (1 - pi)^(N - j) -> 0 as N -> oo (a
polynomial times a decaying exponential) and there are k such terms, so E[attn_t] -> f (1 - r) n.
A static scheme with delta = 0 pays f n at every step, so static / consolidating -> 1 / (1 - r).

Over a whole run (cumulative_excess, k = 1): the attention a consolidating learner spends beyond the
floor, summed over every step of b sequences, is a geometric series,
    sum_{t >= 0} b (E[attn_t] - f (1 - r) n) = b f n r / (1 - rho),   rho = (1 - r/P)^(b f n),
finite however long the run. Since 1 - (1 - x)^m <= m x it is at least P, and it tends to P when a
step sees a small share of the pool (r b f n / P -> 0): each pattern costs about one attended query
before it is consolidated (k in general: cumulative_attention sums the twin). A static scheme at
delta = 0 spends b f n r beyond the floor at every step: b f n r T over T steps, without bound.
"""
import functools

import numpy as np
import sympy as sp

n, f, r, P, b, t, N = sp.symbols("n f r P b t N", positive=True)
k = sp.Symbol("k", positive=True, integer=True)
j = sp.Symbol("j", nonnegative=True, integer=True)


def _pmf(N_, pi):
    return sp.binomial(N_, j) * pi**j * (1 - pi) ** (N_ - j)


def closed_form():
    """E[attn_t] for a uniform pool of P patterns, exact: sympy, in n, f, r, P, k, b, t."""
    return f * n * ((1 - r) + r * sp.Sum(_pmf(t * b * f * n, r / P), (j, 0, k - 1)))


def poisson_form():
    """The large-pool form: f n [(1 - r) + r Q(k, r t b f n / P)], Q the upper regularised gamma."""
    return f * n * ((1 - r) + r * sp.uppergamma(k, r * t * b * f * n / P) / sp.gamma(k))


@functools.lru_cache
def closed_form_limit():
    """lim_{t -> oo} closed_form(), one binomial term at a time (j and k stay symbolic)."""
    z = sp.Symbol("z", positive=True)  # pi = z / (1 + z) covers every pi in (0, 1) and lets sympy
    term = _pmf(N, z / (1 + z))        # see that (1 - pi)^N decays; N = t b f n -> oo with t
    term_limit = sp.limit(term, N, sp.oo)
    return sp.simplify(f * n * ((1 - r) + r * sp.Sum(term_limit, (j, 0, k - 1)).doit()))


def cumulative_excess():
    """The attention beyond the floor a consolidating learner (k = 1, uniform pool) spends over an
    unbounded run, in attended queries: b f n r / (1 - (1 - r/P)^(b f n)) (the module docstring)."""
    return b * f * n * r / (1 - (1 - r / P) ** (b * f * n))


def uniform_pool(P_):
    return np.full(P_, 1.0 / P_)


def binom_cdf_below(k_, N_, p):
    """P(Bin(N, p) < k) elementwise over broadcast arrays; summed in log space because the first
    term (1 - p)^N underflows long before the sum is negligible when k is large."""
    N_, p = np.asarray(N_, float), np.asarray(p, float)
    with np.errstate(divide="ignore"):  # log(0) = -inf is right: no term with j > N
        logpmf = N_ * np.log1p(-p)
        total = np.exp(logpmf)
        for j_ in range(1, k_):
            logpmf = logpmf + np.log(np.maximum(N_ - j_ + 1, 0) / j_) + np.log(p) - np.log1p(-p)
            total = total + np.exp(logpmf)
    return total


def expected_attention(steps, n_, f_, r_, p, k_, b_):
    """E[attn_t] per sequence at each step, for any pool p (closed_form's numpy twin). -> (T,)."""
    N_t = np.asarray(steps, float)[:, None] * b_ * f_ * n_      # (T, 1) queries seen before step t
    unconsolidated = (p * binom_cdf_below(k_, N_t, r_ * p)).sum(-1)  # (T,) sum_i p_i P(Bin < k)
    return f_ * n_ * ((1 - r_) + r_ * unconsolidated)


def cumulative_attention(T, n_, f_, r_, p, k_, b_):
    """Attended queries over steps 0 .. T-1 of b sequences each, sum_t b E[attn_t] (the twin of
    cumulative_excess plus the floor, for any pool and k). Returns (T,): the running total."""
    return b_ * np.cumsum(expected_attention(np.arange(T), n_, f_, r_, p, k_, b_))


def simulate(n_, f_, r_, p, k_, b_, steps, replicas=1, seed=0):
    """Run the learner and measure it at the given (increasing) steps.

    At a measured step the b sequences of that step are drawn and routed (query to attention iff
    novel or not consolidated), then their exposures are counted; the unmeasured steps in between
    only matter through their exposure totals, drawn in one multinomial. So any step can be
    reached cheaply and the measured law is exactly the model's.
    Returns (attn, unconsolidated), each (replicas, T): the mean attention count per sequence of
    the step's b sequences, and sum_i p_i [pattern i seen < k times] at the start of the step.
    """
    q = round(f_ * n_)
    assert abs(q - f_ * n_) < 1e-9, "f n must be an integer number of queries"
    rng = np.random.default_rng(seed)
    R, P_ = replicas, len(p)
    counts = np.zeros((R, P_), np.int64)
    attn, uncons, last = [], [], -1
    for step in steps:
        gap = (step - last - 1) * b_ * q  # queries of the unmeasured steps last+1 .. step-1
        counts += rng.multinomial(rng.binomial(gap, r_, size=R), p)
        recurring = rng.random((R, b_, q)) < r_
        pattern = rng.choice(P_, size=(R, b_, q), p=p)
        seen = np.take_along_axis(counts, pattern.reshape(R, -1), 1).reshape(R, b_, q)
        attn.append((~recurring | (seen < k_)).sum(-1).mean(-1))
        uncons.append((p * (counts < k_)).sum(-1))
        flat = (np.arange(R)[:, None, None] * P_ + pattern)[recurring]
        counts += np.bincount(flat, minlength=R * P_).reshape(R, P_)
        last = step
    return np.stack(attn, 1), np.stack(uncons, 1)


def z_scores(attn, expected, b_):
    """(measured mean - formula) / standard error, per step; attn is (replicas, T).

    Replicas are independent runs, so their spread gives the standard error. The 1 / (R b) term is
    the resolution of a mean over R b sequence counts: at early steps every replica may route all q
    queries while the formula says q - 1e-5, and a zero spread must not make that an infinite z.
    """
    R = attn.shape[0]
    se = np.sqrt(attn.var(0, ddof=1) / R + (1 / (R * b_)) ** 2)
    return (attn.mean(0) - expected) / se


def at(expr, **values):
    """Evaluate a sympy expression at numbers given by symbol name (each module has its symbols)."""
    return float(expr.subs({x: values[x.name] for x in expr.free_symbols}).doit())
