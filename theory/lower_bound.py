"""Static vs consolidating routing, and the lower bound on what a static scheme pays.

Definitions (DESIGN.md section 7; the instance is in instances.py).
  State C: the set of keys the learner has consolidated into semantic memory so far. C = {} before
    training has seen any recurrence; novel keys never enter C, because they never recur.
  Answer model: a query with key k is answered correctly if it is routed to attention (its binding
    is in the context and attention retrieves it) or if k is in C (semantic memory answers it).
    Otherwise it is right only by chance, with probability c (c = 1/V when guessing among V values;
    c = 0 reads "wrong").
  Routing scheme: a map rho(x, C) from a sequence x and the state C to the set A of positions sent to
    attention. Its attention count is |A|.
  Static: rho(x, C) = rho(x, {}) for every C, i.e. the decision is fixed before the data's
    recurrences are seen: fixed sparse patterns, fixed hybrid layouts, a gate learned then frozen, a
    router trained without the consolidation signal. It may look at anything in x (token types,
    positions, key ids, counters); it may not look at C.
  Consolidating: rho may depend on C, e.g. rho(x, C) = {queries of x whose key is not in C}.

Theorem (static lower bound). Let D be a distribution over length-n sequences with exactly q = f n
queries each. If a static scheme reaches expected accuracy >= 1 - delta on D in state C = {} (as
every scheme must at the start of training, and always on data whose keys are all novel), then in
every state C
    E |rho(x)|  >=  (1 - delta - c) / (1 - c) * f n,        which for c = 0 reads (1 - delta) f n.

Proof. Let a(x) = |rho(x) & Q(x)| count the queries of x routed to attention. In state C = {} no
key is consolidated, so each routed query is answered correctly and each of the q - a(x) others with
probability c; expected accuracy is
    acc = E[a(x) + c (q - a(x))] / q = c + (1 - c) E[a(x)] / q.
acc >= 1 - delta therefore gives E[a(x)] >= q (1 - delta - c) / (1 - c), and |rho(x)| >= a(x)
since routed queries are routed tokens. The scheme is static, so rho(x) is the same set in every
state C: what it pays at C = {} it pays at every training step, however much is consolidated. []

Remarks.
  * The inequality at C = {} holds for ANY scheme, even one that knows which keys recur (the
    brute force below includes such an oracle rule). Static-ness is what carries it to later states.
  * Tight up to rounding: "route the first ceil(B) queries" (B the bound) is static and reaches
    acc = c + (1 - c) ceil(B) / q >= 1 - delta with ceil(B) tokens; for delta = 0, "route every
    query" pays exactly f n.
  * Judged only after full consolidation, a static scheme with delta = 0 still pays f n if it
    cannot tell pool keys from novel ones: any query it leaves out may be novel.
  * A consolidating scheme escapes: rho(x, C) = {queries with key not in C} has accuracy 1 in every
    state and pays only the novel queries once the pool is consolidated, f (1 - r) n on average
    (consolidation.py derives the curve on the way there).
"""
import itertools

import numpy as np

from .instances import BIND, QUERY, SIGNAL, TYPE_NAMES

TOL = 1e-9  # accuracies and bounds are ratios of small integers; this only absorbs float rounding


def static_bound(n, f, delta, chance=0.0):
    """The theorem's minimum expected attention count: max(0, (1 - delta - c) / (1 - c)) * f n."""
    return max(0.0, (1 - delta - chance) / (1 - chance)) * f * n


def evaluate(fam, routes, consolidated=(), chance=0.0):
    """Expected attention count per sequence and accuracy of each routing, under the answer model.

    routes: (S, m, n) or (m, n) bool, True = sent to attention. Returns (attn, acc), each (S,) or ().
    """
    queries = fam.queries                                              # (m, n)
    known = queries & np.isin(fam.keys, list(consolidated))            # semantic memory answers these
    right = (queries & (routes | known)).sum(-1)                       # (S, m) answered for sure
    expected_right = right + chance * (fam.q - right)                  # the others by chance
    return routes.sum(-1).mean(-1), expected_right.mean(-1) / fam.q


def static_schemes(fam):
    """Every static scheme we enumerate on a family, as (names, routes (S, m, n) bool).

    1. every subset of positions (2^n schemes): the fixed sparse patterns;
    2. token-feature rules: type in a set T, and position all / even / odd / < theta / >= theta;
    3. counters: the first j queries of the sequence, j = 0..q;
    4. an oracle that knows which keys recur (no static scheme has it): route the novel queries.
    """
    m, n = fam.types.shape
    bits = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)  # (2^n, n)
    names = ["positions {" + ",".join(map(str, np.flatnonzero(b))) + "}" for b in bits]
    routes = [np.broadcast_to(bits[:, None, :], (2 ** n, m, n))]

    pos = np.arange(n)
    preds = {"": pos >= 0, " at even pos": pos % 2 == 0, " at odd pos": pos % 2 == 1}
    preds |= {f" at pos<{th}": pos < th for th in range(1, n)}
    preds |= {f" at pos>={th}": pos >= th for th in range(1, n)}
    kinds = (SIGNAL, BIND, QUERY)
    for size in range(1, 4):
        for T in itertools.combinations(kinds, size):
            for pname, pred in preds.items():
                names.append("+".join(TYPE_NAMES[t] for t in T) + pname)
                routes.append((np.isin(fam.types, T) & pred)[None])
    for j in range(fam.q + 1):
        names.append(f"first {j} queries")
        routes.append((fam.queries & (np.cumsum(fam.queries, 1) <= j))[None])
    names.append("novel queries (oracle)")
    routes.append((fam.queries & ~fam.recurring)[None])
    return names, np.concatenate(routes)


def brute_force(fam, delta, chance=0.0):
    """Least expected attention count among the enumerated static schemes with accuracy >= 1 - delta
    at C = {}. Returns (min count, name of a scheme attaining it, number of schemes enumerated)."""
    names, routes = static_schemes(fam)
    attn, acc = evaluate(fam, routes, chance=chance)
    ok = np.flatnonzero(acc >= 1 - delta - TOL)  # never empty: routing every token has accuracy 1
    best = ok[np.argmin(attn[ok])]
    return float(attn[best]), names[best], len(names)


def consolidating_route(fam, consolidated):
    """The consolidating scheme: send a query to attention iff its key is not consolidated."""
    return fam.queries & ~np.isin(fam.keys, list(consolidated))
