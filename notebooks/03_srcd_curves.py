# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 03 The measured SRCD attention curve against the theory
#
# Notebooks 01 and 02 derive what a router can do: a static one pays f n attention per sequence,
# a consolidating one falls to the floor f (1 - r) n, sharply for a uniform pool of recurring
# patterns, as a power law t^-gamma (gamma = 1 - 1/s) for a Zipf(s) pool. This notebook puts a
# real CRAM run next to that: the measured attention fraction per evaluation, overall and per
# token class (recurring queries, novel queries, everything else), the floor and the consolidating
# learner's expected curve with the run's own SRCD settings, and gamma fitted as the log-log slope
# of what the theory speaks about, the share of recurring queries still on attention (not the
# total, most of which early on is other tokens the theory does not model), with its interval,
# next to 1 - 1/s for the run's pool and the paper's 0.43.
#
# **Which run.** `CRAM_RUN` (default `out/srcd`). If its metrics.jsonl does not exist, or with
# `CRAM_NB_SMALL=1` (what the tests run), the notebook trains a tiny model for 60 steps itself.
# That tiny run only exercises the code: its numbers mean nothing, and so every assertion below
# holds for any run; the findings are printed, not asserted. The real curve:
#
#     python train.py --dataset srcd
#     CRAM_RUN=out/srcd python notebooks/03_srcd_curves.py

# %%
import contextlib
import io
import math
import os
import sys

import matplotlib.pyplot as plt
import numpy as np

# the repository root holds theory/ and train.py, whether we run from the root, from notebooks/ or
# in Jupyter
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import theory  # noqa: E402
from theory import srcd_fit  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
RUN = os.path.join(ROOT, os.environ.get("CRAM_RUN", "out/srcd"))  # relative paths: from the root
GAMMA_PAPER = 0.43
if SMALL or not os.path.exists(os.path.join(RUN, "metrics.jsonl")):
    import train
    RUN = os.path.join(ROOT, "out", "notebooks", "srcd_tiny")
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own log goes to RUN/log.txt
        train.main(["--srcd_len=64", "--batch_size=4", "--n_embd=16", "--n_head=2",
                    "--max_iters=60", "--eval_interval=10", "--log_interval=10", "--eval_batches=1",
                    "--srcd_pool=10", "--srcd_novel_keys=20", "--srcd_values=8", "--threads=1",
                    "--attn_warmup=0", "--overwrite=True", f"--out_dir={RUN}"])
    print("tiny run (exercises the code only; its numbers mean nothing):", RUN)
rows, run, summary = srcd_fit.read_run(RUN)
print(f"{RUN}: {len(rows)} evaluations, steps {rows[0]['step']} .. {rows[-1]['step']}",
      "" if summary else "(no summary.json: a run still going, settings from its checkpoint)")

# %% [markdown]
# ## The run's measurements and the theory's parameters
# One eval row per evaluation. The floor computed from the run's SRCD settings (the generator's
# rounded counts, `theory/srcd_fit.py`) must equal the floor the run itself reported.

# %%
col = lambda key: np.array([r.get(key, np.nan) for r in rows], float)
steps, attn = col("step"), col("attn_frac")
per_class = {c: col(f"attn_{c}") for c in ("recurring", "novel", "other")}
assert np.all(np.diff(steps) > 0) and np.all((attn >= 0) & (attn <= 1))
assert all(np.all(np.isnan(v) | ((v >= 0) & (v <= 1))) for v in per_class.values())
prm = srcd_fit.srcd_params(run)
floor = srcd_fit.floor(prm)
if summary:
    assert math.isclose(floor, summary["attn_floor"], rel_tol=1e-9), (floor, summary["attn_floor"])
warmup = run.get("attn_warmup", 0)  # before it, attention was forced on every training token
free = steps >= warmup
print(f"n={prm['n_']}  f={prm['f_']:.4f}  r={prm['r_']:.3f}  P={len(prm['p'])}  b={prm['b_']}  "
      f"attn_warmup={warmup}  floor f (1 - r) = {floor:.4f}")

# %% [markdown]
# ## The estimators, on the theory's own learner
# Before reading a run, the two fits must recover known answers: k from the simulated learner of
# notebook 02 (SRCD's default ratios, k = 10), and gamma from the expected curve of a Zipf pool
# whose s gives the paper's 0.43, over the steps where that pool shows its power law; and a
# wrong exponent (s = 3, gamma 0.67) must fall outside the interval fitted there.

# %%
k_true, sim = 10, dict(n_=512, f_=26 / 512, r_=18 / 26, p=theory.uniform_pool(100), b_=16)
t_sim = np.arange(0, 60)
_, uncons_sim = theory.simulate(**sim, k_=k_true, steps=t_sim, replicas=32, seed=0)
k_sim, _, _ = srcd_fit.fit_k(t_sim, uncons_sim.mean(0), sim)
assert abs(k_sim - k_true) <= 1, k_sim  # 32 replicas: the mean curve pins k to the grid step
s = theory.s_of_gamma(GAMMA_PAPER)
zipf_prm = dict(sim, p=theory.zipf_pool(10_000, s))
t_zipf = theory.power_law_steps(10_000, s, k_true, sim["r_"] * sim["b_"] * sim["f_"] * sim["n_"])
# one noisy run
_, uncons_zipf = theory.simulate(**zipf_prm, k_=k_true, steps=t_zipf, replicas=1, seed=1)
g_zipf, (g_lo, g_hi), _ = srcd_fit.fit_gamma(t_zipf, uncons_zipf[0])
assert abs(g_zipf - GAMMA_PAPER) < 0.03, g_zipf  # the pool's finite end (notebook 02)
assert g_lo < GAMMA_PAPER + 0.03 and g_hi > GAMMA_PAPER - 0.03, (g_lo, g_hi)
assert g_hi < theory.gamma_of_s(3), g_hi  # the wrong exponent falls outside
print(f"fit_k on the simulated learner: {k_sim} (true {k_true});  fit_gamma on a simulated Zipf "
      f"s={s:.2f} pool: {g_zipf:.3f} (95% {g_lo:.3f} .. {g_hi:.3f}; true {GAMMA_PAPER})")

# %% [markdown]
# ## The consolidating learner with the run's settings
# The theory's learner sends a recurring query to attention until its pattern has been seen k
# times; k is not a setting of the run but a property of how fast CRAM consolidates, so it is
# fitted: least squares of the theory's share of recurring queries still attended against the
# measured `attn_recurring`, over the evaluations with a free router (during the warm-up attention
# is forced in training, so the router's choices there say nothing about consolidation). The
# theory routes novel queries always and other tokens never; CRAM's router may spend attention on
# other tokens too, which is why `attn_other` is plotted.

# %%
use = free & np.isfinite(per_class["recurring"])
k, k_lo, k_hi = (srcd_fit.fit_k(steps[use], per_class["recurring"][use], prm) if use.any()
                 else (1, 1, 1))
t_fine = np.unique(np.linspace(0, steps[-1], 400).round())  # whole steps: N_t is a count
theory_attn = srcd_fit.attention(t_fine, k, prm)
theory_at_steps = srcd_fit.attention(steps, k, prm)
# notebook 02's formula
assert np.allclose(theory_at_steps, theory.expected_attention(steps, k_=k, **prm) / prm["n_"])
assert np.all(np.diff(theory_attn) <= 1e-12)  # never rises, from f n to the floor
assert math.isclose(theory_attn[0], prm["f_"]) and theory_attn[-1] >= floor - 1e-12
t_star = k * len(prm["p"]) / (prm["r_"] * prm["b_"] * prm["f_"] * prm["n_"])  # mean exposures = k
print(f"k = {k}" + (f" (fitted; grid values {k_lo} .. {k_hi} fit within 10%)" if use.any() else
                    " (not fitted: no free evaluation with recurring queries)"),
      f"-> the uniform pool consolidates at about step {t_star:.0f}")

# %% [markdown]
# ## gamma: the log-log slope of the recurring queries' share on attention
# Over the evaluations with a free router where the share is above 0. With a Zipf pool
# (`--srcd_zipf=s`, s > 1) the theory predicts gamma = 1 - 1/s inside the window of steps where the
# consolidation frontier is well inside the pool (theory.power_law_steps); with SRCD's default
# uniform pool it predicts a sharp step near the step above, no power law. The same estimator on the
# theory's curve at the run's evaluation steps shows what slope the consolidating learner would
# give.

# %%
recurring = per_class["recurring"]
gamma, (lo, hi), fit_mask = srcd_fit.fit_gamma(steps, recurring, warmup)
if fit_mask.sum() >= 4:
    assert np.isfinite(gamma) and lo <= gamma <= hi
gamma_theory, _, theory_mask = srcd_fit.fit_gamma(steps, srcd_fit.unconsolidated(steps, k, prm),
                                                  warmup)
say = lambda g, m: (f"{g:.3f} ({m.sum()} points)" if np.isfinite(g)
                    else f"none: {m.sum()} usable points, 4 needed")
s_run = run.get("srcd_zipf", 0.0)
print(f"gamma measured (recurring share): {say(gamma, fit_mask)}"
      + (f", 95% {lo:.3f} .. {hi:.3f}" if np.isfinite(gamma) else ""))
print("gamma predicted:                  "
      + (f"1 - 1/s = {theory.gamma_of_s(s_run):.3f} (s = {s_run})" if s_run > 1
         else "no power law: the pool is not Zipf with s > 1"))
print(f"gamma paper:                      {GAMMA_PAPER}")
print("the same estimator on the consolidating learner's curve at these steps:",
      say(gamma_theory, theory_mask))
peak = attn[free].max() if free.any() else float("nan")
print(f"findings (not asserted): free-router peak {peak:.4f}, last {attn[-1]:.4f}, "
      f"floor {floor:.4f}; " + ", ".join(f"{c} {v[-1]:.3f}" for c, v in per_class.items())
      + " at the last evaluation")

# %% [markdown]
# ## Plot
# Left: the attention fraction against the step, with the static cost f, the floor and the
# consolidating learner's curve (fitted k). Middle: per class, against the theory (recurring: the
# unconsolidated share; novel: always; other: never). Right: the recurring queries' share on
# log-log axes, the fitted slope and the paper's.

# %%
fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(16, 4.5))
for ax in (ax0, ax1):
    if warmup > 0:
        ax.axvspan(0, min(warmup, steps[-1]), color="0.92",
                   label="attention warm-up" if ax is ax0 else None)
ax0.plot(steps, attn, "ko-", ms=4, label="measured attn_frac")
ax0.axhline(prm["f_"], color="r", lw=1, label=f"static: f = {prm['f_']:.3f}")
ax0.axhline(floor, color="k", ls=":", label=f"floor f (1 - r) = {floor:.4f}")
ax0.plot(t_fine, theory_attn, "C0-", label=f"consolidating learner, k = {k}")
ax0.set_yscale("symlog", linthresh=min(floor, 0.01) / 2)  # linear near 0, so the floor shows
ax0.set(xlabel="training step", ylabel="share of tokens on attention", ylim=(0, 1.05),
        title=os.path.relpath(RUN, ROOT))
ax0.legend(fontsize=8)

for (c, v), colour, th in zip(per_class.items(), ("C1", "C2", "C7"),
                              (srcd_fit.unconsolidated(t_fine, k, prm), np.ones_like(t_fine),
                               np.zeros_like(t_fine))):
    ax1.plot(steps, v, "o-", color=colour, ms=4, label=f"attn_{c}")
    ax1.plot(t_fine, th, "--", color=colour, alpha=0.7, label=f"theory ({c})")
ax1.set(xlabel="training step", ylabel="share of the class on attention", ylim=(-0.03, 1.03))
ax1.legend(fontsize=8, ncol=2)

pos = (steps > 0) & (recurring > 0)
ax2.loglog(steps[pos], recurring[pos], "ko", ms=4, mfc="none", label="measured attn_recurring")
ax2.loglog(steps[fit_mask], recurring[fit_mask], "ko", ms=4, label="usable for the fit")
if np.isfinite(gamma):
    e0 = np.exp(np.log(recurring[fit_mask]).mean() + gamma * np.log(steps[fit_mask]).mean())
    ts = steps[fit_mask]
    ax2.loglog(ts, e0 * ts**-gamma, "C3-", label=f"fit: gamma = {gamma:.2f} ({lo:.2f} .. {hi:.2f})")
    ax2.loglog(ts, e0 * ts[0] ** -gamma * (ts / ts[0]) ** -GAMMA_PAPER, "C3:",
               label=f"paper: gamma = {GAMMA_PAPER}")
th = srcd_fit.unconsolidated(steps, k, prm)
shown = (th > 0) & (steps > 0)
ax2.loglog(steps[shown], th[shown], "C0.-", label="consolidating learner")
ax2.set(xlabel="training step", ylabel="share of recurring queries on attention",
        title="gamma: " + (f"{gamma:.2f}" if np.isfinite(gamma) else "too few points"))
ax2.legend(fontsize=8)
fig.tight_layout()
from theory.figures import save_figure  # noqa: E402

save_figure(fig, "03_srcd_curves")
