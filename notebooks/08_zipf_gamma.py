# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 08 gamma predicted, then measured: CRAM on Zipf pools
#
# The theory (theory/zipf.py, notebook 02): if pattern i recurs with p_i ~ i^-s and a pattern
# leaves attention after k exposures, the share U of recurring queries still on attention falls
# as M^-gamma, gamma = 1 - 1/s, with M the recurring exposures so far (M = t b n_recurring after t
# steps). It does so only inside a window (theory.power_law_window, the longest range of M where
# the exact expectation's local slope is within 0.05 of gamma): before it the first few patterns
# consolidate one by one, after it the pool's end is reached. This notebook sizes SRCD's Zipf pool
# for each s in ZIPF so that the window spans at least 1.5 decades, prints it before training, trains
# CRAM on each pool, fits k (how many exposures CRAM needs; the only free parameter) and then
# gamma over the evaluations inside the predicted window, next to 1 - 1/s.
#
# What is fitted is the *recurring* queries' share on attention (attn_recurring), as the theory
# speaks of nothing else; beside it open_recurring, the share not answered right without attention
# (on attention, or wrong), which is the theory's U whatever the router does. And beside both, the
# same estimator on the theory's own curve at the same evaluations: what a consolidating learner
# with the fitted k would give through the same finite window.
#
# gamma alone identifies neither s nor the learner: any pool whose frequencies fall as i^-s in the
# range being consolidated gives the same slope, and so do learners other than "k exposures" (a
# learner that needs k_i exposures with k_i ~ i^c changes the exponent, one with noisy k does not).
# A slope that matches says the run is consistent with the theory, not that the theory is why.
#
# The runs (SRCD with --srcd_shared_keys, so a key id says nothing of recurrence and the router
# must learn every pattern, N = 256, 26 queries a sequence of which 18 recurring, batch 16, a
# constant learning rate after the warm-up so that a step means the same learning throughout,
# STEPS steps, eval sets large enough to count the rare attended queries):
#
#     python notebooks/08_zipf_gamma.py       # trains what out/notebooks/zipf lacks (about 2 CPU hours)
#
# `CRAM_NB_SMALL=1` (the tests) trains tiny runs for a few steps: its numbers mean nothing.

# %%
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import matplotlib.pyplot as plt
import numpy as np

HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "notebooks")]

import runs  # noqa: E402  (notebooks/runs.py)
import theory  # noqa: E402
from theory import srcd_fit  # noqa: E402
from theory.figures import save_figure  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
OUT = os.path.join(ROOT, "out", "notebooks", "zipf_small" if SMALL else "zipf")
# s: (pool size P, eval batches, steps between evaluations). Each P gives a window of >= 1.5
# decades for every k in K_RANGE (asserted below). A steeper pool puts its window at smaller
# shares (s = 3: below 0.4% for k = 75), hence its larger eval set.
ZIPF = {1.5: (10_000, 16, 50), 2.0: (5_600, 16, 50), 3.0: (1_000, 64, 100)}
K_RANGE = (10, 100, 1000)   # exposures a pattern may need: the window is printed for each
MIN_COUNT = 10              # fit only evaluations with at least this many attended recurring queries
STEPS, JOBS = (8, 1) if SMALL else (3000, 2)
CONFIG = ["--dataset=srcd", "--threads=1", f"--max_iters={STEPS}", "--srcd_shared_keys=True",
          "--srcd_len=256", "--srcd_query=0.1", "--min_lr=3e-3", "--log_interval=50"]
if SMALL:
    ZIPF = {s: (40, 1, 2) for s in ZIPF}
    CONFIG = ["--dataset=srcd", "--threads=1", f"--max_iters={STEPS}", "--srcd_shared_keys=True", "--srcd_len=48",
              "--srcd_query=0.2", "--batch_size=4", "--n_embd=16", "--n_head=2", "--srcd_novel_keys=20",
              "--srcd_values=8", "--log_interval=2"]


def argv(s):
    P, batches, every = ZIPF[s]
    return CONFIG + [f"--srcd_zipf={s}", f"--srcd_pool={P}", f"--eval_batches={batches}", f"--eval_interval={every}"]


# %% [markdown]
# ## The prediction, before any training
# For each s, the window of the exact expectation in recurring exposures M, in training steps
# (M / (b n_recurring)) and in the share U at its two ends, for k across K_RANGE. The slope inside
# is 1 - 1/s by construction; what the run must do is reach the window and resolve those shares.

# %%
per_step = {}
for s in ZIPF:
    prm = srcd_fit.srcd_params(runs.train.parse_args(argv(s))[0])
    per_step[s] = prm["r_"] * prm["b_"] * prm["f_"] * prm["n_"]  # b n_recurring
    print(f"s = {s}: gamma = 1 - 1/s = {theory.gamma_of_s(s):.3f}, pool P = {len(prm['p'])}, "
          f"{per_step[s]:.0f} recurring exposures a step")
    for k in K_RANGE:
        M_lo, M_hi, U_lo, U_hi = theory.power_law_window(prm["p"], s, k)
        print(f"   k = {k:>4}: M {M_lo:9.3g} .. {M_hi:9.3g} ({np.log10(M_hi / M_lo):.2f} decades), steps "
              f"{M_lo / per_step[s]:8.3g} .. {M_hi / per_step[s]:8.3g}, share U {U_lo:.4f} .. {U_hi:.6f}")
        assert SMALL or np.log10(M_hi / M_lo) >= 1.5

# %% [markdown]
# ## Train what is missing

# %%
def train_one(s):
    return s, runs.ensure(os.path.join(OUT, f"s{s:g}"), argv(s), SMALL, f"CRAM, Zipf s = {s}")


with ThreadPoolExecutor(JOBS) as pool:  # each run is its own process on one thread
    summaries = dict(pool.map(train_one, ZIPF))

# %% [markdown]
# ## k, the window in steps, and gamma
# Per run: k fitted to the measured attn_recurring over the evaluations with at least MIN_COUNT
# attended recurring queries (log least squares, theory.srcd_fit.fit_k_log); the predicted window
# in steps for that k; gamma over the evaluations inside it (95% interval of the fit), for the
# routed share and for open_recurring; and the same estimator on the theory's curve at the same
# steps.

# %%
results = {}
for s in ZIPF:
    rows, run, summary = srcd_fit.read_run(os.path.join(OUT, f"s{s:g}"))
    prm = srcd_fit.srcd_params(run)
    col = lambda key: np.array([r.get(key, np.nan) for r in rows], float)
    steps, attn_rec, open_rec = col("step"), col("attn_recurring"), col("open_recurring")
    n_eval = run["eval_batches"] * run["batch_size"] * round(prm["r_"] * prm["f_"] * prm["n_"])
    counted = (steps > 0) & (attn_rec * n_eval >= MIN_COUNT)
    M = steps * per_step[s]
    if counted.sum() >= 2:
        k, k_lo, k_hi = srcd_fit.fit_k_log(M[counted], attn_rec[counted], prm["p"])
    else:
        k, k_lo, k_hi = 1, 1, 1
    M_lo, M_hi, U_lo, U_hi = theory.power_law_window(prm["p"], s, k)
    inside = counted & (M >= M_lo) & (M <= M_hi)
    g, (g_lo, g_hi), _ = srcd_fit.fit_gamma(steps[inside], attn_rec[inside])
    go, (go_lo, go_hi), _ = srcd_fit.fit_gamma(steps[inside], open_rec[inside])
    gt, _, _ = srcd_fit.fit_gamma(steps[inside], theory.unconsolidated_mass(M[inside], prm["p"], k))
    if inside.sum() >= 4:
        assert g_lo <= g <= g_hi and np.isfinite(gt)
    results[s] = dict(P=len(prm["p"]), k=k, k_range=[k_lo, k_hi], window_steps=[M_lo / per_step[s], M_hi / per_step[s]],
                      window_share=[U_lo, U_hi], points=int(inside.sum()),
                      fitted_steps=[float(steps[inside].min()), float(steps[inside].max())] if inside.any() else None,
                      gamma_routed=[g, g_lo, g_hi], gamma_open=[go, go_lo, go_hi], gamma_theory_same_steps=gt,
                      gamma_predicted=theory.gamma_of_s(s), retrieval=summary["retrieval_acc"] if summary else None,
                      attn_frac=summary["attn_frac"] if summary else None,
                      curve=dict(steps=steps.tolist(), attn_recurring=attn_rec.tolist(), open_recurring=open_rec.tolist()))

fmt = lambda v: f"{v[0]:.3f} ({v[1]:.3f} .. {v[2]:.3f})" if np.isfinite(v[0]) else "too few points"
print(f"{STEPS} steps, one seed; gamma over the evaluations inside the predicted window with >= {MIN_COUNT} "
      "attended recurring queries\n")
print("| s | pool | k fitted | window (steps) | its shares | evaluations fitted | gamma, routed | gamma, open "
      "| theory's curve, same steps | 1 - 1/s | retrieval |")
print("|---|---:|---:|---|---|---|---|---|---:|---:|---:|")
for s, r in results.items():
    ws, wu, fs = r["window_steps"], r["window_share"], r["fitted_steps"]
    print(f"| {s:g} | {r['P']} | {r['k']} ({r['k_range'][0]} .. {r['k_range'][1]}) | {ws[0]:.0f} .. {ws[1]:.3g} "
          f"| {wu[0]:.4f} .. {wu[1]:.2g} | {r['points']}" + (f" (steps {fs[0]:.0f} .. {fs[1]:.0f})" if fs else "")
          + f" | {fmt(r['gamma_routed'])} | {fmt(r['gamma_open'])} | {r['gamma_theory_same_steps']:.3f} "
          f"| {r['gamma_predicted']:.3f} | {r['retrieval'] if r['retrieval'] is None else round(r['retrieval'], 4)} |")
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "table.json"), "w") as fh:
    json.dump({str(s): r for s, r in results.items()}, fh, indent=1)

# %% [markdown]
# ## Plot: the recurring share against the step, log-log
# Measured routed share (dots; filled where fitted) and open share (crosses), the theory's
# expectation with the fitted k (line), the predicted window (shaded), the fitted slope and 1 - 1/s.

# %%
fig, axes = plt.subplots(1, len(ZIPF), figsize=(5 * len(ZIPF), 4.2), squeeze=False)
for ax, (s, r) in zip(axes[0], results.items()):
    steps, attn_rec, open_rec = (np.array(r["curve"][k]) for k in ("steps", "attn_recurring", "open_recurring"))
    pos = (steps > 0) & (attn_rec > 0)
    ax.loglog(steps[pos], attn_rec[pos], "ko", ms=4, mfc="none", label="attn_recurring")
    ax.loglog(steps[(steps > 0) & (open_rec > 0)], open_rec[(steps > 0) & (open_rec > 0)], "C1x", ms=4,
              label="open_recurring")
    t = np.geomspace(max(1, steps[steps > 0].min() if (steps > 0).any() else 1), max(steps.max(), 2), 200)
    prm_p = theory.zipf_pool(r["P"], s)
    ax.loglog(t, theory.unconsolidated_mass(t * per_step[s], prm_p, r["k"]), "C0-", label=f"theory, k = {r['k']}")
    ax.axvspan(*r["window_steps"], color="C0", alpha=0.08, label="predicted window")
    g = r["gamma_routed"][0]
    if np.isfinite(g):
        lo, hi = r["fitted_steps"]
        mid = np.sqrt(lo * hi)
        y_mid = np.exp(np.interp(np.log(mid), np.log(steps[pos]), np.log(attn_rec[pos])))
        ts = np.geomspace(lo, hi, 20)
        ax.loglog(ts, y_mid * (ts / mid) ** -g, "C3-", label=f"fit: gamma = {g:.2f}")
        ax.loglog(ts, y_mid * (ts / mid) ** -r["gamma_predicted"], "C3:", label=f"1 - 1/s = {r['gamma_predicted']:.2f}")
    ax.set(xlabel="training step", ylabel="share of recurring queries", title=f"Zipf s = {s:g}, pool {r['P']}")
    ax.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, "08_zipf_gamma")
