"""Static vs consolidating routing: what any scheme pays before anything is consolidated, and what
a static scheme pays at deployment, when the recurring pool was not known in advance.

The paper (arXiv 2602.12204) states that any static routing scheme needs Omega(f n) attention;
below is the form this project proves and brute-forces (RESULTS.md, "Theory").

Definitions (the instance is in instances.py).
  State C: the set of keys the learner has consolidated into semantic memory so far. C = {} before
    training has seen any recurrence; novel keys never enter C, because they never recur.
  Answer model: a query with key k is answered correctly if it is routed to attention (its binding
    is in the context and attention retrieves it) or if k is in C (semantic memory answers it).
    Otherwise it is right only by chance, with probability c (c = 1/V when guessing among V values;
    c = 0 reads "wrong").
  Routing scheme: a map rho(x, C) from a sequence x and the state C to the set A of positions
    sent to attention. Its attention count is |A|.
  Static: rho(x, C) = rho(x, {}) for every C, i.e. the decision is fixed before the data's
    recurrences are seen: fixed sparse patterns, fixed hybrid layouts, a gate learned then frozen, a
    router trained without the consolidation signal. It may look at anything in x (token types,
    positions, key ids, counters); it may not look at C.
  Consolidating: rho may depend on C, e.g. rho(x, C) = {queries of x whose key is not in C}.

Theorem 1 (before consolidation; any scheme). Let D be a distribution over length-n sequences with
exactly q = f n queries each. Any scheme that reaches expected accuracy >= 1 - delta on D in state
C = {} (as every scheme must at the start of training, and always on data whose keys are all
novel) pays there
    E |rho(x)|  >=  (1 - delta - c) / (1 - c) * f n,        which for c = 0 reads (1 - delta) f n,
and a static scheme pays the same in every later state.

Proof. Let a(x) = |rho(x) & Q(x)| count the queries of x routed to attention. In state C = {} no
key is consolidated, so each routed query is answered correctly and each of the q - a(x) others with
probability c; expected accuracy is
    acc = E[a(x) + c (q - a(x))] / q = c + (1 - c) E[a(x)] / q.
acc >= 1 - delta therefore gives E[a(x)] >= q (1 - delta - c) / (1 - c), and |rho(x)| >= a(x)
since routed queries are routed tokens. A static scheme's rho(x) is the same set in every state C:
what it pays at C = {} it pays at every training step, however much is consolidated. []

Remarks.
  * The inequality at C = {} holds for ANY scheme, even one that knows which keys recur (the
    brute force below includes such an oracle rule): in state C = {} the answer model leaves no
    other way to be right. It is an identity of the answer model, not a fact about static routing;
    Theorem 2 is that fact.
  * Tight up to rounding: "route the first ceil(B) queries" (B the bound) is static and reaches
    acc = c + (1 - c) ceil(B) / q >= 1 - delta with ceil(B) tokens; for delta = 0, "route every
    query" pays exactly f n.
  * Judged only after full consolidation, a static scheme with delta = 0 still pays f n if it
    cannot tell pool keys from novel ones: any query it leaves out may be novel.
  * A consolidating scheme escapes: rho(x, C) = {queries with key not in C} has accuracy 1 in every
    state and pays only the novel queries once the pool is consolidated, f (1 - r) n on average
    (consolidation.py derives the curve on the way there).

Theorem 2 (static, at deployment). Keys are exchangeable: the pool S is a uniformly random subset
of one key space K, a sequence's recurring queries ask keys of S and its novel ones keys of K - S,
values are drawn alike for both (instances.PoolDraws); each of the q = f n query slots recurs with
the same probability r (the recurring slots are a uniformly random set, as in SRCD). Without that,
a fixed slot rule can beat the bound: if recurring queries always came first, "route the last
slots" would reach accuracy 1 at (1 - r) q. A static scheme is fixed before S is drawn: rho(x) may
read positions, token types, key ids, values and counters of the sequence x, and may be
randomised, but not S. At deployment every key of S is consolidated (C = S). If rho reaches
expected accuracy >= 1 - delta there, averaged over the draws of S and x, then
    E |rho(x)|  >=  max(0, 1 - delta / ((1 - r)(1 - c))) * f n,
and this is tight. A consolidating scheme reaches accuracy 1 with f (1 - r) n, and for every delta
the best consolidating scheme pays exactly (1 - r) times the static bound.

Proof. Fix a query slot j. The sequence x is independent of whether slot j recurs: given which
slots recur, x's keys are distinct draws from S (recurring slots) and from K - S (novel ones) with
S uniform, so, marginally over S, they are distinct uniform draws from K whichever slots recur; the
values are uniform in both cases. Hence P(slot j novel | x) = P(slot j novel) = 1 - r_j, and a
static scheme's decision for j, a function of x and its own randomness, is independent of it. In
state C = S a routed query is right, an unrouted recurring one is right (semantic memory), an
unrouted novel one is right with probability c. So with rho_j = P(j routed),
    E[wrong] = sum_j (1 - rho_j)(1 - r_j)(1 - c),
and with every r_j = r (the recurring slots are a uniformly random set, as in SRCD) this is
E[wrong] = (q - E a(x))(1 - r)(1 - c). (With unequal r_j, a scheme skips the likeliest-recurring
slots first, and the bound holds with the largest r_j in place of r, a weaker bound.) Accuracy
>= 1 - delta means E[wrong] <= delta q, i.e.
E a(x) >= q (1 - delta / ((1 - r)(1 - c))), and |rho(x)| >= a(x). Tight: routing each query with
probability max(0, 1 - delta / ((1 - r)(1 - c))) meets it with equality (so does "route the first
j queries" when the bound is an integer j). The consolidating scheme routes the novel queries,
each with that same probability: accuracy 1 - delta with (1 - r) times the tokens. []

Since every static scheme's errors are exactly (q - E a(x))(1 - r)(1 - c), every one lies ON the
line attention = bound(1 - accuracy): the brute force below checks that identity, so it would catch
a generator whose sequences leak whether a query recurs.

What it does not cover: a router trained jointly with the model (router_mode "learned" and
"no_consolidation" in cram.py) is fixed only after it has seen the pool, so it is not static in
this sense; Theorem 2 says nothing about it. It covers fixed sparse patterns ("fixed"), "always"
and "never", and any rule decided before the pool is drawn.
"""
import itertools

import numpy as np

from .instances import BIND, QUERY, SIGNAL, TYPE_NAMES

TOL = 1e-9  # accuracies and bounds are ratios of small integers; this only absorbs float rounding


def before_consolidation_bound(n, f, delta, chance=0.0):
    """Theorem 1: what any scheme pays in state C = {} to reach accuracy 1 - delta, and a static
    scheme in every state: max(0, (1 - delta - c) / (1 - c)) * f n expected tokens per sequence."""
    return max(0.0, (1 - delta - chance) / (1 - chance)) * f * n


def deployment_bound(n, f, r, delta, chance=0.0):
    """Theorem 2: the least expected attention count per sequence of a static scheme with accuracy
    >= 1 - delta at deployment (pool consolidated, pool unknown when the scheme was fixed):
    max(0, 1 - delta / ((1 - r)(1 - c))) * f n. With nothing left to get wrong ((1 - r)(1 - c) = 0)
    it is 0."""
    wrong_if_skipped = (1 - r) * (1 - chance)
    if wrong_if_skipped <= 0:
        return 0.0
    return max(0.0, 1 - delta / wrong_if_skipped) * f * n


def consolidated_cost(n, f, r, delta=0.0, chance=0.0):
    """What the consolidating scheme pays at deployment for accuracy 1 - delta: the novel queries
    only, f (1 - r) n at delta = 0; (1 - r) times deployment_bound for every delta."""
    return (1 - r) * deployment_bound(n, f, r, delta, chance)


def evaluate(fam, routes, consolidated=(), chance=0.0):
    """Expected attention count per sequence and accuracy of each routing, under the answer model.

    routes: (S, m, n) or (m, n) bool, True = sent to attention. -> (attn, acc), each (S,) or ().
    """
    queries = fam.queries                                              # (m, n)
    known = queries & np.isin(fam.keys, list(consolidated))            # semantic memory answers
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


# ---- Theorem 2, by enumeration: every static scheme on every pool draw -------------------------

def deployment_evaluate(draws, routes, chance=0.0):
    """Exact expected attention count per sequence and accuracy at deployment (C = S) of a routing
    over all outcomes of `draws` (instances.PoolDraws). routes: (N, q), bool or the probability of
    routing each query (a randomised scheme). Returns (attn, acc), two floats."""
    routes = np.asarray(routes, float)
    answered = draws.recurring + ~draws.recurring * chance          # P(right | unrouted), (N, q)
    right = routes + (1 - routes) * answered                        # P(right), per query
    return float(routes.sum(-1).mean()), float(right.mean())


def deployment_schemes(draws, tables=300, seed=0):
    """Static schemes on a PoolDraws instance, as (name, routes (N, q) bool or float) pairs, one at
    a time: each reads only what a sequence shows (query slot, keys, values) and never S.

    1. every set of query slots (the counters "first j queries" and every fixed pattern);
    2. every key-id set A (route iff key in A: thresholds, parity and every other id rule);
    3. every slot set crossed with every key-id set (route iff both hold);
    4. every value set; rank rules (route the j smallest / largest keys of the sequence);
    5. `tables` random lookup tables over the whole sequence (any function of x, densities spread);
    6. randomised rules: route every query with probability p, p in 0, 0.1, .., 1.
    """
    N, q = draws.keys.shape
    label = lambda bits: "{" + ",".join(map(str, np.flatnonzero(bits))) + "}"
    slot_sets = [np.array([(s >> j) & 1 for j in range(q)], bool) for s in range(2 ** q)]
    key_sets = [np.array([(a >> k) & 1 for k in range(draws.K)], bool) for a in range(2 ** draws.K)]
    for s in slot_sets:
        yield f"slots {label(s)}", np.broadcast_to(s, (N, q))
    for a in key_sets:
        yield f"keys in {label(a)}", a[draws.keys]
    for s in slot_sets[1:-1]:
        for a in key_sets[1:-1]:
            yield f"slots {label(s)} and keys in {label(a)}", s & a[draws.keys]
    for b in range(1, 2 ** draws.V - 1):
        in_set = ((b >> draws.values) & 1).astype(bool)
        yield f"values in {label((b >> np.arange(draws.V)) & 1)}", in_set
    rank = draws.keys.argsort(1).argsort(1)                                  # 0 = smallest key
    for j in range(1, q):
        yield f"{j} smallest keys", rank < j
        yield f"{j} largest keys", rank >= q - j
    _, obs = np.unique(np.concatenate([draws.keys, draws.values], 1), axis=0, return_inverse=True)
    obs = obs.ravel()                                                        # (N,) which sequence x
    rng = np.random.default_rng(seed)
    for i in range(tables):  # any function of the sequence: a random decision per (x, slot)
        density = rng.random()
        table = rng.random((obs.max() + 1, q)) < density
        yield f"random table {i} (density {density:.2f})", table[obs]
    for p in np.linspace(0, 1, 11):
        yield f"each query with probability {p:.1f}", np.full((N, q), p)


def deployment_table(draws, chance=0.0, **kw):
    """(names, attn, acc) of every scheme of deployment_schemes: exact expectations over every
    draw."""
    names, rows = [], []
    for name, routes in deployment_schemes(draws, **kw):
        names.append(name)
        rows.append(deployment_evaluate(draws, routes, chance))
    attn, acc = np.array(rows).T
    return names, attn, acc


def deployment_violations(draws, bound, chance=0.0, table=None, **kw):
    """The enumerated static schemes that pay less than bound(n, f, r, delta, chance) for the
    accuracy 1 - delta they reach: their names. Empty for Theorem 2's deployment_bound; a bound
    stronger than the truth must show violators here. table: deployment_table's result, to reuse
    it."""
    names, attn, acc = table or deployment_table(draws, chance, **kw)
    claimed = np.array([bound(draws.n, draws.f, draws.r, 1 - a, chance) for a in acc])
    return [names[i] for i in np.flatnonzero(attn < claimed - TOL)]


WRONG_BOUNDS = {  # what a careless derivation might claim; each must be caught by the brute force
    "one token too strong": lambda n, f, r, delta, c: deployment_bound(n, f, r, delta, c) + 1,
    "ignores r": lambda n, f, r, delta, c: max(0.0, 1 - delta / (1 - c)) * f * n,
    "ignores c": lambda n, f, r, delta, c: max(0.0, 1 - delta / (1 - r)) * f * n if r < 1 else 0.0,
}


def deployment_brute_force(draws, delta, chance=0.0, table=None, **kw):
    """Least exact expected attention count among deployment_schemes with accuracy >= 1 - delta at
    deployment. Returns (min count, name of a scheme attaining it, number of schemes)."""
    names, attn, acc = table or deployment_table(draws, chance, **kw)
    ok = np.flatnonzero(acc >= 1 - delta - TOL)  # never empty: routing every query has accuracy 1
    best = ok[np.argmin(attn[ok])]
    return float(attn[best]), names[best], len(names)
