# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 01 What routing must pay: before consolidation, and at deployment
#
# Two statements: the paper's theorem (arXiv 2602.12204, the abstract's Omega(f n) bound for static
# routing), split into the form this project proves (RESULTS.md, "Theory"; definitions and proofs
# in `theory/lower_bound.py`):
#
# * **Theorem 1, before anything is consolidated** (state C = {}): any scheme that answers a share
#   1 - delta of the f n queries sends at least (1 - delta - c) / (1 - c) f n tokens to attention,
#   c being the chance that an unrouted query is right anyway. This holds for every scheme, static
#   or not: with nothing consolidated, only attention answers. It is an identity of the answer
#   model, checked below by brute force as such.
# * **Theorem 2, at deployment**, the claim about static routing: the recurring pool is drawn at
#   random from one key space, a *static* scheme is fixed before the draw, and accuracy is judged
#   after the whole pool is consolidated. Then it pays at least max(0, 1 - delta / ((1 - r)(1 - c)))
#   f n, tight, while the consolidating scheme pays (1 - r) times that (f (1 - r) n at delta = 0).
#
# Theorem 2 is checked by enumerating every pool draw of small instances (exact expectations, no
# sampling) against hundreds of static schemes, and three deliberately wrong bounds must be beaten
# by some of them. Run as a script: `python notebooks/01_lower_bound.py` (`CRAM_NB_SMALL=1` for the
# quick version the tests run).

# %%
import math
import os
import sys

import matplotlib.pyplot as plt
import numpy as np

# the repository root holds theory/, whether we run from the root, from notebooks/ or in Jupyter
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import theory  # noqa: E402
from theory import lower_bound as sb  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
SIZES = [(6, 2), (8, 3)] if SMALL else [(6, 2), (8, 3), (10, 4), (12, 5), (12, 6)]  # (n, q)
M_SEQS = 4 if SMALL else 8  # sequences per family
DELTAS = [0.0, 0.25, 0.5]
CHANCES = [0.0, 0.25]  # c = 0 (an unrouted query is wrong) and c = 1/4 (guessing among 4 values)

# %% [markdown]
# ## Definitions, theorem and proof
# The single source is the module docstring; printed here so the notebook reads on its own.

# %%
print(sb.__doc__)

# %% [markdown]
# ## One instance
# A family of m sequences; each has q bind/query pairs placed at random, every query after its
# binding. `R` marks a recurring key (from the shared pool), `N` a novel one.

# %%
fam = theory.make_family(n=12, q=5, m=M_SEQS, r=0.7, P=3, seed=0)
for s in range(min(3, M_SEQS)):
    row = []
    for ty, rec in zip(fam.types[s], fam.recurring[s]):
        kind = "b" if ty == theory.BIND else "Q"
        row.append("." if ty == theory.SIGNAL else kind + ("R" if rec else "N"))
    print(" ".join(f"{c:>3}" for c in row))
print(f"n={fam.n} q={fam.q} f={fam.f:.3f} measured r={fam.r:.2f}")

# %% [markdown]
# The answer model on this family. At C = {} a query is right only if routed (or by chance c);
# once the pool is consolidated (C = pool keys) semantic memory answers the recurring queries too.

# %%
c = 0.25
pool = range(fam.P)
everything, nothing = fam.queries, np.zeros_like(fam.queries)
attn, acc = sb.evaluate(fam, everything, chance=c)
assert attn == fam.q and acc == 1.0  # route every query: q tokens, all right
attn, acc = sb.evaluate(fam, nothing, chance=c)
assert attn == 0 and math.isclose(acc, c)  # route nothing before consolidation: chance only
attn, acc = sb.evaluate(fam, nothing, consolidated=pool, chance=c)
assert math.isclose(acc, fam.r + c * (1 - fam.r))  # after it: the recurring share plus chance
print("answer model checks pass")

# %% [markdown]
# ## Theorem 1 by brute force
# Every subset of positions (2^n fixed patterns), every token-feature rule (type set x position
# all / even / odd / below or above a threshold), the counters "first j queries", and an oracle
# that knows which keys recur. For each (instance, delta, c): the least mean attention count
# among schemes with accuracy >= 1 - delta at C = {}, next to the bound. The oracle never does
# better here: at C = {} knowing the pool is worth nothing.

# %%
rows = []
print(f"{'n':>3} {'q':>2} {'delta':>5} {'c':>5} {'bound':>6} {'min':>6} {'schemes':>7}"
      "  attained by")
for n, q in SIZES:
    fam = theory.make_family(n, q, m=M_SEQS, r=0.7, P=3, seed=n + q)
    for delta in DELTAS:
        for c in CHANCES:
            bound = theory.before_consolidation_bound(n, fam.f, delta, c)
            least, name, count = theory.brute_force(fam, delta, c)
            assert least >= bound - sb.TOL, (n, q, delta, c, least, bound)  # never below the bound
            # met up to rounding ("first ceil(B) queries")
            assert least <= math.ceil(bound - sb.TOL)
            rows.append((n, q, delta, c, bound, least))
            print(f"{n:>3} {q:>2} {delta:>5.2f} {c:>5.2f} {bound:>6.3f} {least:>6.3f} {count:>7}"
                  f"  {name}")
print(f"{len(rows)} cases: the brute-force minimum is never below the bound and never above its "
      "ceiling")

# %% [markdown]
# Static schemes pay the same at every training step; the consolidating scheme (route a query iff
# its key is not consolidated) pays q before consolidation and only the novel queries after it,
# f (1 - r) n on average.

# %%
n, q = SIZES[-1]
fam = theory.make_family(n, q, m=M_SEQS, r=0.7, P=3, seed=1)
static_least, _, _ = theory.brute_force(fam, 0.0)
for C, label in [((), "C = {}"), (range(fam.P), "C = pool")]:
    attn, acc = sb.evaluate(fam, theory.consolidating_route(fam, C), consolidated=C)
    assert acc == 1.0
    print(f"{label:9}: consolidating pays {attn:.2f}, static pays {static_least:.2f} (delta = 0)")
assert math.isclose(attn, q * (1 - fam.r))  # after consolidation: the novel queries only
assert static_least == q == theory.before_consolidation_bound(n, fam.f, 0.0)

# %% [markdown]
# ## Plot: every static scheme against the bound
# Left: each enumerated scheme of one instance as a point (attention count, accuracy at C = {});
# Theorem 1 says no point lies left of the line attention = q (acc - c) / (1 - c).
# Right: the brute-force minimum against the bound over all cases of the table.

# %%
n, q = SIZES[-1]
fam, c = theory.make_family(n, q, m=M_SEQS, r=0.7, P=3, seed=n + q), 0.25
_, routes = sb.static_schemes(fam)
attn, acc = sb.evaluate(fam, routes, chance=c)
assert (attn >= q * (acc - c) / (1 - c) - sb.TOL).all()  # Theorem 1, scheme by scheme

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
ax0.scatter(attn, acc, s=6, alpha=0.3, label=f"{len(attn)} static schemes")
a = np.linspace(0, q, 50)
ax0.plot(a, c + (1 - c) * a / q, "r-", label="bound: acc = c + (1-c) attn / q")
ax0.set(xlabel="attention count per sequence", ylabel="accuracy at C = {}",
        title=f"n={n}, q={q}, c={c}: no scheme above the line")
ax0.legend(loc="lower right")
b, least = np.array([r[4] for r in rows]), np.array([r[5] for r in rows])
ax1.plot([0, b.max()], [0, b.max()], "r-", label="min = bound")
ax1.plot(np.sort(b), np.ceil(np.sort(b) - sb.TOL), "k:", label="min = ceil(bound)")
ax1.scatter(b, least, zorder=3, label="brute-force minimum")
ax1.set(xlabel="bound (1-delta-c)/(1-c) f n", ylabel="least attention count reaching 1-delta",
        title="bound <= brute-force min <= ceil(bound)")
ax1.legend()
fig.tight_layout()
from theory.figures import save_figure  # noqa: E402

save_figure(fig, "01_lower_bound")

# %% [markdown]
# ## Theorem 2: at deployment, with a pool that was not known in advance
# Every outcome of one instance, enumerated: the pool S (a random P-subset of K keys), which query
# slots recur, the keys and the values. The proof's one step first: whatever a sequence shows, the
# chance that a query recurs stays r, for every key id and every value.

# %%
K, P, q, R, V = (5, 2, 2, 1, 2) if SMALL else (6, 3, 3, 2, 2)
draws = theory.enumerate_pool_draws(K, P, q, R, V, n=3 * q)
print(f"K={K} keys, pool P={P}, q={q} queries ({R} recurring), V={V} values: "
      f"{len(draws.keys)} equally likely outcomes")
for k in range(K):
    assert math.isclose(draws.recurring[draws.keys == k].mean(), draws.r)  # the key id says nothing
for v in range(V):
    assert math.isclose(draws.recurring[draws.values == v].mean(), draws.r)  # nor the value

# %% [markdown]
# Every enumerated static scheme (slot sets, key-id sets, both, value sets, key ranks, random
# lookup tables over the whole sequence, randomised rules) against the bound, for c = 0 and 1/V;
# then the three wrong bounds of `theory.lower_bound.WRONG_BOUNDS`, each of which some static
# scheme must beat. The consolidating scheme (route the novel queries, i.e. read S) beats the
# true bound: it is what the theorem excludes.

# %%
print(f"{'c':>5} {'delta':>6} {'bound':>6} {'least':>6} {'consolidating':>13}  attained by")
tables = {}
for c in (0.0, 1 / V):
    tables[c] = table = sb.deployment_table(draws, c, tables=100 if SMALL else 300)
    assert sb.deployment_violations(draws, theory.deployment_bound, c, table=table) == []
    for delta in (0.0, 0.05, 0.1, 0.2):
        bound = theory.deployment_bound(draws.n, draws.f, draws.r, delta, c)
        least, name, count = theory.deployment_brute_force(draws, delta, c, table=table)
        assert least >= bound - 1e-9  # never below the bound
        cons = theory.consolidated_cost(draws.n, draws.f, draws.r, delta, c)
        print(f"{c:>5.2f} {delta:>6.2f} {bound:>6.3f} {least:>6.3f} {cons:>13.3f}  {name}")
    for wrong, claim in sb.WRONG_BOUNDS.items():
        beaten = sb.deployment_violations(draws, claim, c, table=table)
        assert beaten or (wrong == "ignores c" and c == 0), wrong  # with c = 0 it is no error
        print(f"  wrong bound '{wrong}': beaten by {len(beaten)} of {count} static schemes" +
              (f", e.g. '{beaten[0]}'" if beaten else ""))
oracle_attn, oracle_acc = theory.deployment_evaluate(draws, ~draws.recurring, 0.0)
assert oracle_acc == 1 and math.isclose(oracle_attn, q * (1 - draws.r))
print(f"consolidating scheme: {oracle_attn:.2f} tokens at accuracy 1; static bound {q} (delta = 0)")

# %% [markdown]
# Every static scheme lies on the line attention = q (1 - (1 - acc) / ((1 - r)(1 - c))): at
# deployment a static scheme's errors are exactly its unrouted queries times (1 - r)(1 - c), so the
# only choice it has is how many queries to route. The consolidating scheme sits left of the line.

# %%
c = 1 / V
names, attn, acc = tables[c]
fig, ax = plt.subplots(figsize=(6, 4.2))
ax.scatter(attn, acc, s=8, alpha=0.3, label=f"{len(names)} static schemes")
a = np.linspace(0, q, 50)
ax.plot(a, 1 - (1 - a / q) * (1 - draws.r) * (1 - c), "r-", label="Theorem 2's bound")
ax.scatter([q * (1 - draws.r)], [1.0], marker="*", s=150, c="k", zorder=3,
           label="consolidating (reads S)")
ax.set(xlabel="attention count per sequence", ylabel="accuracy at deployment (pool consolidated)",
       title=f"K={K}, P={P}, q={q}, r={draws.r:.2f}, c={c:.2f}: every pool draw")
ax.legend(loc="lower right")
fig.tight_layout()
save_figure(fig, "01_deployment_bound")
