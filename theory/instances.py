"""Task instances: SRCD (the paper's benchmark, arXiv 2602.12204; data.SRCD is the full generator)
cut down to sizes small enough to enumerate.

Family: m fixed sequences, for the bound before anything is consolidated. PoolDraws: every outcome
of a sequence whose recurring pool is drawn at random from one key space, for the bound at
deployment.

A sequence has n tokens of three types: SIGNAL (the continuous dynamics), BIND (shows a key and
its value) and QUERY (shows a key bound earlier in the same sequence and asks for its value).
Every sequence has exactly q queries, so the query frequency is f = q / n. Each binding's key is
*recurring* with probability r (drawn from a pool of P keys shared by all sequences, always with
the same value) or *novel* (fresh, never seen in any other sequence). A family is m equally likely
sequences; accuracies and attention counts are averages over it.
"""
import itertools
from dataclasses import dataclass

import numpy as np

SIGNAL, BIND, QUERY = 0, 1, 2
TYPE_NAMES = {SIGNAL: "signal", BIND: "bind", QUERY: "query"}


@dataclass(frozen=True)
class Family:
    types: np.ndarray      # (m, n) int: SIGNAL, BIND or QUERY
    keys: np.ndarray       # (m, n) int: key id on BIND and QUERY tokens, -1 on SIGNAL; pool: < P
    recurring: np.ndarray  # (m, n) bool: this token's key comes from the shared pool
    P: int                 # pool size

    @property
    def n(self): return self.types.shape[1]

    @property
    def q(self): return int((self.types[0] == QUERY).sum())  # the same in every sequence

    @property
    def f(self): return self.q / self.n

    @property
    def queries(self): return self.types == QUERY  # (m, n) bool

    @property
    def r(self):
        """Measured recurring share among the family's queries (the sampling probability is r)."""
        return float(self.recurring[self.queries].mean())


def sample_sequence(rng, n, q, r, P, novel_base):
    """One sequence: q bind/query pairs at random positions, every query after its own binding."""
    assert 2 * q <= n, f"q={q} bind/query pairs do not fit in n={n} tokens"
    pos = np.sort(rng.choice(n, 2 * q, replace=False))
    # a uniform ballot order (never more queries than bindings so far); accepts w.p. 1/(q+1)
    while True:
        order = rng.permutation([BIND] * q + [QUERY] * q)
        if (np.cumsum(np.where(order == BIND, 1, -1)) >= 0).all():
            break
    types, keys, rec = np.full(n, SIGNAL), np.full(n, -1), np.zeros(n, bool)
    unqueried = []  # bindings whose query has not come yet
    for i, kind in zip(pos, order):
        types[i] = kind
        if kind == BIND:
            rec[i] = rng.random() < r
            keys[i] = rng.integers(P) if rec[i] else novel_base + i  # unique in the family
            unqueried.append(i)
        else:
            j = unqueried.pop(rng.integers(len(unqueried)))
            keys[i], rec[i] = keys[j], rec[j]
    return types, keys, rec


def make_family(n, q, m, r=0.7, P=4, seed=0):
    """m sequences of n tokens, q queries each; keys recur from a pool of P with probability r."""
    rng = np.random.default_rng(seed)
    seqs = [sample_sequence(rng, n, q, r, P, novel_base=P + s * n) for s in range(m)]
    return Family(*(np.stack(a) for a in zip(*seqs)), P=P)


@dataclass(frozen=True)
class PoolDraws:
    """Every equally likely outcome of one deployed sequence when the pool is unknown in advance,
    enumerated (Theorem 2's setting, lower_bound.py), so expectations over pool draws are exact
    sums, not samples.

    Keys are exchangeable: the pool S is a uniformly random P-subset of one key space {0 .. K-1}. A
    sequence has q queries, exactly R of them recurring (a uniformly random set of the q query
    slots); recurring queries ask distinct keys of S, novel ones distinct keys of K minus S; every
    value is uniform over V values (a pool key keeps its value across sequences, but one sequence
    shows it once). The sequence also holds q bindings and n - 2q signal tokens, which a scheme
    gains nothing by routing. What a static scheme may read: keys and values, by query slot. What
    only a consolidating scheme (or an oracle) reads: S, hence which queries recur.
    """
    keys: np.ndarray       # (N, q) int: the key each query asks
    values: np.ndarray     # (N, q) int: the value bound to it in this sequence
    recurring: np.ndarray  # (N, q) bool: the key is in S
    n: int                 # tokens per sequence
    K: int                 # key space size
    P: int                 # pool size |S|
    V: int                 # value space size

    @property
    def q(self): return self.keys.shape[1]

    @property
    def f(self): return self.q / self.n

    @property
    def r(self): return float(self.recurring[0].sum()) / self.q  # exactly R / q in every outcome


def enumerate_pool_draws(K, P, q, R, V, n=None):
    """All outcomes of PoolDraws, each listed once (they are equally likely): pool S, recurring
    slots, the keys (ordered draws without replacement) and the values."""
    n = n or 2 * q
    assert R <= min(q, P) and q - R <= K - P and 2 * q <= n, "the instance does not fit"
    keys, recurring = [], []
    for S in itertools.combinations(range(K), P):
        rest = [k for k in range(K) if k not in S]
        for slots in itertools.combinations(range(q), R):
            rec = np.isin(np.arange(q), slots)
            for rk in itertools.permutations(S, R):
                for nk in itertools.permutations(rest, q - R):
                    row = np.empty(q, int)
                    row[rec], row[~rec] = rk, nk
                    keys.append(row)
                    recurring.append(rec)
    values = np.array(list(itertools.product(range(V), repeat=q)))          # (V^q, q)
    keys, recurring = np.array(keys), np.array(recurring)
    N = len(keys)
    return PoolDraws(keys=np.repeat(keys, len(values), 0), values=np.tile(values, (N, 1)),
                     recurring=np.repeat(recurring, len(values), 0), n=n, K=K, P=P, V=V)
