# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 02 Consolidation escapes the bound: the expected attention curve, derived and simulated
#
# A learner that consolidates a recurring pattern after k exposures sends a query to attention
# only while its pattern is novel or not yet consolidated. This notebook derives its expected
# attention count per sequence at training step t in closed form (sympy), checks the formula
# against a simulation, takes its limit f (1 - r) n, and shows that the pool's pattern frequencies
# set the curve's shape: a uniform pool gives a sharp transition, a Zipf(s) pool a power law
# t^-gamma with gamma = 1 - 1/s. Run as a script: `python notebooks/02_consolidation.py`
# (`CRAM_NB_SMALL=1` for the quick version the tests run).

# %%
import math
import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import sympy as sp

# the repository root holds theory/, whether we run from the root, from notebooks/ or in Jupyter
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import theory  # noqa: E402
from theory import consolidation as cons  # noqa: E402
from theory import zipf  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
# SRCD's ratios (the paper's benchmark, arXiv 2602.12204): 5% queries, 70% recurring, a pool of
# 100 patterns
n, f, r, P_UNIFORM = 2000, 0.05, 0.7, 100
q = round(f * n)
b, k = 1, 10  # sequences per step, exposures to consolidate: knobs of the model, not the paper's
P_ZIPF = 10_000 if SMALL else 100_000  # a long pool: the power law needs room
R_UNIFORM, R_ZIPF = (200, 16) if SMALL else (1000, 32)  # independent replicas of each simulation
Z_MAX = 5.0  # standard errors: over a few hundred steps a Gaussian passes 5 with probability < 1e-3

# %% [markdown]
# ## The model and the closed form
# The derivation is the module docstring:

# %%
print(cons.__doc__)
E = theory.closed_form()
E  # noqa: B018  (Jupyter displays the expression)

# %% [markdown]
# k = 1 is a geometric decay; sympy agrees with the closed form specialised to k = 1.

# %%
N_t = cons.t * cons.b * cons.f * cons.n  # queries seen before step t
geometric = cons.f * cons.n * ((1 - cons.r) + cons.r * (1 - cons.r / cons.P) ** N_t)
assert sp.simplify(E.subs(cons.k, 1).doit() - geometric) == 0
print("k = 1:", geometric)

# %% [markdown]
# The numpy twin (`expected_attention`, used for every curve below) against sympy at a few points,
# and the Poisson / regularised-gamma form against the exact one for a large pool.

# %%
for t_ in [0, 3, 10, 40]:
    exact = theory.at(E, n=n, f=f, r=r, P=P_UNIFORM, k=k, b=b, t=t_)
    twin = theory.expected_attention([t_], n, f, r, theory.uniform_pool(P_UNIFORM), k, b)[0]
    assert math.isclose(exact, twin, rel_tol=1e-9), (t_, exact, twin)
    big = theory.uniform_pool(100 * P_UNIFORM)
    big_pool = theory.expected_attention([100 * t_], n, f, r, big, k, b)[0]
    poisson = theory.at(theory.poisson_form(), n=n, f=f, r=r, P=len(big), k=k, b=b, t=100 * t_)
    assert abs(poisson - big_pool) < 0.01 * q, (t_, poisson, big_pool)  # Bin(N, p) ~ Poisson(N p)
    print(f"t={t_:>3}: sympy {exact:8.4f}  numpy {twin:8.4f}   large pool: Poisson {poisson:8.4f} "
          f"exact {big_pool:8.4f}")

# %% [markdown]
# ## The limit, and static / consolidating -> 1 / (1 - r)

# %%
limit = theory.closed_form_limit()
assert sp.simplify(limit - cons.f * (1 - cons.r) * cons.n) == 0
ratio = sp.simplify(cons.f * cons.n / limit)  # a static scheme with delta = 0: f n at every step
assert sp.simplify(ratio - 1 / (1 - cons.r)) == 0
print("lim E[attn_t] =", limit, "  static / consolidating ->", ratio)
print(f"SRCD: static {f:.1%} of tokens, consolidated floor f (1 - r) = {f * (1 - r):.1%}, "
      f"ratio {1 / (1 - r):.2f}")

# %% [markdown]
# ## Over a whole run: the attention consolidation costs is bounded
# Summed over every step, what the consolidating learner spends beyond the floor is a geometric
# series (k = 1): b f n r / (1 - (1 - r/P)^(b f n)), at least P and about P when a step sees a small
# share of the pool: one attended query per pattern. A static scheme's excess, b f n r per step,
# grows without bound.

# %%
excess = theory.cumulative_excess()
assert sp.limit(excess / cons.P, cons.P, sp.oo) == 1
print("sum_t b (E[attn_t] - f (1 - r) n) =", excess)
for P_, b_ in [(100, 16), (10_000, 16), (100, 1)]:
    e = theory.at(excess, n=n, f=f, r=r, P=P_, b=b_)
    print(f"  n = {n}, f = {f}, r = {r}, P = {P_}, b = {b_}: {e:.0f} attended queries beyond the "
          f"floor in all ({e / P_:.2f} per pattern); static: {b_ * f * n * r:.0f} more every step")

# %% [markdown]
# ## Simulation against the formula (uniform pool)
# R independent runs of the learner; at each step the mean attention count of the step's
# sequences, against the formula, in standard errors.

# %%
steps_u = np.arange(0, 6 * k * P_UNIFORM // (r * b * q) + 1, dtype=int)  # to ~6x the transition
p_u = theory.uniform_pool(P_UNIFORM)
attn_u, uncons_u = theory.simulate(n, f, r, p_u, k, b, steps_u, replicas=R_UNIFORM, seed=0)
E_u = theory.expected_attention(steps_u, n, f, r, p_u, k, b)
z = theory.z_scores(attn_u, E_u, b)
assert np.abs(z).max() < Z_MAX, np.abs(z).max()
assert math.isclose(E_u[0], q) and abs(E_u[-1] - f * (1 - r) * n) < 0.01 * q  # f n to the floor
print(f"uniform pool: {len(steps_u)} steps, max |z| = {np.abs(z).max():.2f} < {Z_MAX}")

# %% [markdown]
# ## A Zipf pool: the power law and its exponent
# The derivation (module docstring) in sympy gives gamma and the constant C of
# U(M) ~ C M^-gamma, M = r t b f n the recurring exposures so far.

# %%
print(zipf.__doc__)
gamma_expr, C_expr = theory.derive_tail()
s_sym = next(x for x in gamma_expr.free_symbols if x.name == "s")
assert sp.simplify(gamma_expr - (1 - 1 / s_sym)) == 0
s_paper = sp.solve(sp.Eq(gamma_expr, sp.Rational(43, 100)), s_sym)[0]
assert math.isclose(float(s_paper), theory.s_of_gamma(0.43))
print(f"gamma = {gamma_expr},  C = {C_expr}")
print(f"paper's gamma = 0.43 +- 0.04  <->  s = {float(s_paper):.3f} "
      f"({theory.s_of_gamma(0.39):.2f} to {theory.s_of_gamma(0.47):.2f})")

# %% [markdown]
# Simulate the learner on a Zipf pool with s chosen to give the paper's gamma; fit the slope of
# the unconsolidated mass on a log-log plot over the steps where the consolidation frontier is
# inside the pool (10 <= i* <= P / 100), and compare with the derivation.

# %%
s = theory.s_of_gamma(0.43)
gamma = theory.gamma_of_s(s)
p_z = theory.zipf_pool(P_ZIPF, s)
Z = (np.arange(1, P_ZIPF + 1) ** -s).sum()
per_step = r * b * f * n  # recurring exposures per step
fit_steps = theory.power_law_steps(P_ZIPF, s, k, per_step)
steps_z = np.geomspace(1, 30 * fit_steps[-1], 40).round()
steps_z = np.unique(np.r_[0, steps_z, fit_steps]).astype(int)
attn_z, uncons_z = theory.simulate(n, f, r, p_z, k, b, steps_z, replicas=R_ZIPF, seed=1)
E_z = theory.expected_attention(steps_z, n, f, r, p_z, k, b)
z = theory.z_scores(attn_z, E_z, b)
assert np.abs(z).max() < Z_MAX, np.abs(z).max()

in_fit = np.isin(steps_z, fit_steps)
M = per_step * steps_z
gamma_fit = theory.fit_power_law(M[in_fit], uncons_z.mean(0)[in_fit])
# 0.03: the pool's finite end bends the tail (measured on the exact expectation: <= 0.025 at
# s = 1.5, 0.006 at s = 1.75) plus the sampling noise of the replicas
assert abs(gamma_fit - gamma) < 0.03, (gamma_fit, gamma)
U_exact = (E_z / q - (1 - r)) / r
ratio_asym = U_exact[in_fit] / theory.tail_asymptote(M[in_fit], s, k, Z)
assert np.all(np.abs(ratio_asym - 1) < 0.05)  # C M^-gamma is the formula's large-M form
print(f"Zipf s={s:.3f}: max |z| = {np.abs(z).max():.2f}; fitted gamma = {gamma_fit:.3f}, "
      f"derived 1 - 1/s = {gamma:.3f}")
print(f"exact / asymptote over the fit window: {ratio_asym.min():.3f} .. {ratio_asym.max():.3f}")

# %% [markdown]
# ## The curve's shape: sharp (uniform) vs spread (Zipf)
# How many decades of training steps the recurring part needs to fall tenfold, from 50% to 5% of
# the recurring queries still attended: a uniform pool does it at once, a Zipf pool takes about
# 1 / gamma decades.


# %%
def decades_to_fall_tenfold(steps, U, hi=0.5, lo=0.05):
    t = np.geomspace(max(steps[0], 1), steps[-1], 4000)
    U = np.interp(np.log(t), np.log(np.maximum(steps, 1)), U)
    return math.log10(t[np.argmax(U <= lo)] / t[np.argmax(U <= hi)])


fine = np.unique(np.geomspace(1, steps_z[-1], 400).round()).astype(int)
U_uni = (theory.expected_attention(fine, n, f, r, p_u, k, b) / q - (1 - r)) / r
U_zipf = (theory.expected_attention(fine, n, f, r, p_z, k, b) / q - (1 - r)) / r
d_uni, d_zipf = decades_to_fall_tenfold(fine, U_uni), decades_to_fall_tenfold(fine, U_zipf)
assert d_uni < 0.5 and d_zipf > 1.5
print(f"tenfold fall of the recurring part: uniform {d_uni:.2f} decades, Zipf {d_zipf:.2f} "
      f"(1/gamma = {1 / gamma:.2f})")

# %% [markdown]
# ## Plot
# Left: attention fraction per token against the training step, static vs consolidating.
# Middle: the unconsolidated mass of the Zipf pool on log-log axes, with the derived power law.
# Right: static / consolidating, tending to 1 / (1 - r).

# %%
fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(16, 4.5))
t_u, t_z = np.maximum(steps_u, 0.5), np.maximum(steps_z, 0.5)  # step 0 drawn at 0.5 on the log axis
ax0.axhline(f, color="r", label="static (delta = 0): f")
ax0.axhline(f * (1 - r), color="k", ls=":", label="floor f (1 - r)")
ax0.plot(t_u, E_u / n, "C0-", label=f"uniform pool P={P_UNIFORM}: formula")
ax0.plot(t_u, attn_u.mean(0) / n, "C0.", ms=4, label="uniform: simulation")
ax0.plot(t_z, E_z / n, "C1-", label=f"Zipf pool s={s:.2f}: formula")
ax0.plot(t_z, attn_z.mean(0) / n, "C1.", ms=4, label="Zipf: simulation")
ax0.set(xscale="log", xlabel="training step t", ylabel="attention fraction of tokens",
        title=f"n={n}, f={f}, r={r}, k={k}, b={b}")
ax0.legend(fontsize=8)

pos = M > 0
ax1.loglog(M[pos], uncons_z.mean(0)[pos], "C1.", label="simulation")
ax1.loglog(M[pos], U_exact[pos], "C1-", alpha=0.5, label="formula (exact sum)")
ax1.loglog(M[pos], theory.tail_asymptote(M[pos], s, k, Z), "k--",
           label=f"C M^-gamma, gamma = 1 - 1/s = {gamma:.3f}")
ax1.axvspan(M[in_fit][0], M[in_fit][-1], color="0.9", label=f"fit window: gamma = {gamma_fit:.3f}")
ax1.set(xlabel="recurring exposures M = r t b f n", ylabel="unconsolidated mass U",
        title=f"Zipf pool, P={P_ZIPF}", ylim=(max(U_exact.min(), 1e-6), 1.5))
ax1.legend(fontsize=8)

ax2.plot(t_u, f * n / E_u, "C0-", label="uniform")
ax2.plot(t_z, f * n / E_z, "C1-", label="Zipf")
ax2.axhline(1 / (1 - r), color="k", ls=":", label=f"1 / (1 - r) = {1 / (1 - r):.2f}")
ax2.set(xscale="log", xlabel="training step t", ylabel="static / consolidating attention")
ax2.legend(fontsize=8)
fig.tight_layout()
from theory.figures import save_figure  # noqa: E402

save_figure(fig, "02_consolidation")
