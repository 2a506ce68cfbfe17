# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 04 What makes attention fall on SRCD? The ablation table
#
# Each row is CRAM with one part taken away, or a baseline, trained with the same CPU config
# (N = 512, d = 64, 2 layers, batch 16) for STEPS steps and 3 seeds. The columns: retrieval
# (recurring and novel queries), the share of tokens on attention in any layer, overall and per
# class (recurring queries, novel queries, other tokens), the dynamics MSE, the consolidation step
# (the first evaluation with retrieval >= 99.5% and attention <= 1.25x the floor), the seeds that
# collapsed (retrieval < 90%) and the wall time. Mean over seeds, and the spread (min .. max).
# The last four rows are the budgeted routers of notebook 10 at 1.25x the floor.
#
#     python notebooks/04_srcd_ablations.py   # trains what out/notebooks/ablations lacks
#
# Finished runs are reused: delete out/notebooks/ablations/<row>/seed<s> to retrain one, or run one
# row by hand with the flags printed in the table's "flags" column (a few minutes each). CRAM_JOBS
# sets how many runs train side by side (default 2, each on one thread). `CRAM_NB_SMALL=1` (the
# tests) trains every row for a few steps on a tiny config in-process: its numbers mean nothing, so
# the assertions on the findings (RESULTS.md, "The ablation table" and after) run only at full size.

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

import data  # noqa: E402
import runs  # noqa: E402  (notebooks/runs.py)
import train  # noqa: E402
import theory  # noqa: E402
from theory.figures import save_figure  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
JOBS = int(os.environ.get("CRAM_JOBS", "2"))
SEEDS = [1337, 1] if SMALL else [1337, 1, 2]
STEPS = 12 if SMALL else 750
LEN = 48 if SMALL else 512
CONFIG = [f"--max_iters={STEPS}", f"--eval_interval={4 if SMALL else 125}",
          f"--log_interval={4 if SMALL else 50}", "--threads=1"]
if SMALL:
    CONFIG += [f"--srcd_len={LEN}", "--batch_size=4", "--n_embd=16", "--n_head=2",
               "--eval_batches=1", "--srcd_pool=10", "--srcd_novel_keys=20", "--srcd_values=8"]
OUT = os.path.join(ROOT, "out", "notebooks", "ablations_small" if SMALL else "ablations")
ROWS = {  # row name: its flags on top of CONFIG
    "CRAM (learned)": [],
    "flat penalty": ["--router_mode=flat_penalty"],
    "no consolidation loss": ["--w_consol=0.0"],
    "no q input": ["--router_mode=no_q"],
    "no semantic tier": ["--router_mode=no_semantic"],
    "no consolidation (the paper's w/o consolidation)": ["--router_mode=no_consolidation"],
    "no consolidation, penalty 0.02": ["--router_mode=no_consolidation", "--w_compute=0.02"],
    "fixed sparse (every 16th)": ["--router_mode=fixed"],
    "dense hybrid (always)": ["--router_mode=always"],
    "no attention (never)": ["--router_mode=never"],
    "transformer (same width)": ["--router_mode=always", "--wm_kind=none", f"--n_positions={LEN}"],
}
# Notebook 10's budgeted routers at 1.25x the floor in each layer (their top-k in training, their
# causal threshold in evaluation), with its schedule: a quarter of the run at share 1, a quarter
# down to the budget. Rows of the table, not of the findings asserted on ROWS below.
task = data.make(train.parse_args(CONFIG)[0])
FLOOR = task.floor
SCHEDULE = [f"--attn_warmup={STEPS // 4}", f"--attn_anneal={STEPS // 4}"]
BUDGETED = {f"{mode} (1.25x the floor)": [f"--router_mode={mode}",
                                          f"--attn_budget={1.25 * FLOOR}"] + SCHEDULE
            for mode in ("capacity", "measured", "gain", "controlled")}
# The penalty sweep: three routers at each compute-penalty weight. Their runs at the default weight
# (0.5) are the table's rows named beside them.
PENALTIES = [1.0] if SMALL else [0.01, 0.03, 0.1, 0.3, 1.0]
VARIANTS = {"CRAM": "CRAM (learned)", "flat penalty": "flat penalty",
            "no consolidation": "no consolidation (the paper's w/o consolidation)"}
SWEEP = {(variant, w): ROWS[row] + [f"--w_compute={w}"]
         for w in PENALTIES for variant, row in VARIANTS.items()}
# The recurring-share sweep: CRAM at other shares of recurring bindings (0.7 is the default, the
# table's CRAM row), one seed. And the paper's layer, without the MLP, for the semantic tier.
RECURRING = [0.3, 0.5, 0.9]
ONE_SEED = {f"CRAM, recurring {r}": [f"--srcd_recurring={r}"] for r in RECURRING} | {
    "CRAM, no MLP (the paper's layer)": ["--mlp=False"]}
RUNS = (ROWS | BUDGETED | ONE_SEED
        | {f"{variant}, penalty {w}": flags for (variant, w), flags in SWEEP.items()})
SWEEP_SEEDS = SEEDS  # the penalty sweep's seeds


def seeds_of(row):
    return SEEDS[:1] if row in ONE_SEED else SEEDS if row in ROWS | BUDGETED else SWEEP_SEEDS

# %% [markdown]
# ## Train what is missing
# A run is reused when its summary.json holds the settings asked for; otherwise it is trained
# (in a subprocess, CRAM_JOBS at a time; in-process in the small mode).

# %%
def run_dir(row, seed):
    return os.path.join(OUT, row.split(" (")[0].replace(" ", "_").replace(",", ""), f"seed{seed}")


def train_one(job):
    row, seed = job
    runs.ensure(run_dir(row, seed), CONFIG + RUNS[row] + [f"--seed={seed}"], SMALL,
                f"{row}, seed {seed}")


# seed by seed, so that a stopped regeneration has every row and penalty for the first seeds
jobs = [(row, seed) for seed in SEEDS for row in RUNS if seed in seeds_of(row)]
with ThreadPoolExecutor(1 if SMALL else JOBS) as pool:
    list(pool.map(train_one, jobs))

# %% [markdown]
# ## The table
# From each run's summary.json (the final evaluation on the fixed eval set, 64 sequences) and its
# metrics.jsonl (the evaluations along the way, for the consolidation step).

# %%
def measure(row, seed):
    path = run_dir(row, seed)
    summary = runs.finished(path, CONFIG + RUNS[row] + [f"--seed={seed}", f"--out_dir={path}"])
    assert summary, f"{path}: no finished run"
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        evals = [r for r in map(json.loads, fh) if r["kind"] == "eval"]
    floor = summary["attn_floor"]
    hit = [r["step"] for r in evals if r["acc"] >= 0.995 and r["attn_frac"] <= 1.25 * floor]
    return dict(retrieval=summary["retrieval_acc"], recurring=summary["acc_recurring"],
                novel=summary["acc_novel"],
                attn=summary["attn_frac"], attn_recurring=summary["attn_recurring"],
                attn_novel=summary["attn_novel"], attn_other=summary["attn_other"],
                dynamics_mse=summary["dynamics_mse"], consolidation_step=hit[0] if hit else None,
                collapsed=summary["retrieval_acc"] < 0.9, wall_seconds=summary["wall_seconds"],
                floor=floor)


results = {row: [measure(row, seed) for seed in seeds_of(row)] for row in RUNS}
for row, ms in results.items():
    for m in ms:
        assert 0 <= m["retrieval"] <= 1 and 0 <= m["attn"] <= 1, (row, m)
        assert np.isfinite(m["dynamics_mse"]), (row, m)
floor = results["CRAM (learned)"][0]["floor"]
query_rate = task.n_query / task.len


def cell(values, pct=False, digits=3):
    v = np.array([np.nan if x is None else x for x in values], float)
    scale, unit = (100, "%") if pct else (1, "")
    if np.isnan(v).all():
        return "-"
    mean, lo, hi = scale * np.nanmean(v), scale * np.nanmin(v), scale * np.nanmax(v)
    fmt = f"{{:.{digits}f}}"
    return fmt.format(mean) + unit + (f" ({fmt.format(lo)}-{fmt.format(hi)})" if hi > lo else "")


columns = [("retrieval", True, 1), ("recurring", True, 1), ("novel", True, 1), ("attn", True, 2),
           ("attn_recurring", True, 1), ("attn_novel", True, 1), ("attn_other", True, 2),
           ("dynamics_mse", False, 4)]
print(f"{STEPS} steps, seeds {SEEDS}, attention floor {100 * floor:.2f}%; "
      "mean (min-max) over seeds\n")
print("| row | " + " | ".join(c for c, _, _ in columns)
      + " | consolidation step | collapsed | wall s | flags |")
print("|---|" + "---:|" * (len(columns) + 3) + "---|")
table = []
for row in ROWS | BUDGETED:
    ms = results[row]
    steps = [m["consolidation_step"] for m in ms]
    reached = [s for s in steps if s is not None]
    spread = f" ({min(reached)}-{max(reached)})" if len(set(reached)) > 1 else ""
    never = "" if len(reached) == len(ms) else f", {len(ms) - len(reached)} of {len(ms)} never"
    step_cell = f"{int(np.mean(reached))}{spread}{never}" if reached else "never"
    cells = [cell([m[c] for m in ms], pct, d) for c, pct, d in columns]
    collapsed = sum(m["collapsed"] for m in ms)
    wall = cell([m["wall_seconds"] for m in ms], digits=0)
    flags = " ".join(RUNS[row]) or "(default)"
    print(f"| {row} | " + " | ".join(cells)
          + f" | {step_cell} | {collapsed} of {len(ms)} | {wall} | `{flags}` |")
    table.append(dict(row=row, flags=RUNS[row], seeds=SEEDS, steps=STEPS, runs=ms))
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "table.json"), "w") as fh:
    json.dump(table, fh, indent=1)
print(f"\nrows as JSON: {os.path.relpath(os.path.join(OUT, 'table.json'), ROOT)}")

# %% [markdown]
# The findings, as RESULTS.md states them: attention falls near the floor without any
# consolidation signal (every novel query on attention, every recurring one off); a flat penalty
# of 0.5 collapses, consolidation or not; fixed sparse routing and no attention fail; the
# same-width transformer's dynamics MSE is above every CRAM variant's.

# %%
FREE = ["CRAM (learned)", "no consolidation loss", "no q input", "no semantic tier",
        "no consolidation, penalty 0.02"]
FLAT = ["flat penalty", "no consolidation (the paper's w/o consolidation)"]
if not SMALL:
    for row in FREE:
        # 1.5x for CRAM, 1.9x for all five, as RESULTS.md rounds them (largest seeds: 1.46x, 1.93x)
        most = 1.5 if row == "CRAM (learned)" else 1.95
        for m in results[row]:
            assert m["retrieval"] >= 0.995 and m["attn"] <= most * m["floor"], (row, m)
            # exact (1e-9: float sums): one query of the 1,664 would print as 0.1% at least
            assert m["attn_novel"] > 1 - 1e-9 and m["attn_recurring"] < 1e-9, (row, m)
    for row in FLAT + ["fixed sparse (every 16th)", "no attention (never)"]:
        assert all(m["collapsed"] for m in results[row]), row  # every seed below 90% retrieval
    for row in FLAT:  # attention shut off (under a tenth of the floor), novel queries at chance
        assert all(m["attn"] < 0.1 * floor and m["novel"] < 0.05 for m in results[row]), row
    others = [m["dynamics_mse"] for row in ROWS if row != "transformer (same width)"
              for m in results[row]]
    assert min(m["dynamics_mse"] for m in results["transformer (same width)"]) > max(others)

# %% [markdown]
# ## Attention spent over the run
# The compute a run actually pays is attention summed over its training steps, not the share at
# the end. Per row: the router's attention share averaged over training (trapezoid over the step-0
# evaluation and the training steps logged every log_interval; the training spot checks, 3% of the
# other tokens, are not counted), against the floor. theory.cumulative_excess gives what the
# theory's consolidating learner (k = 1) spends beyond the floor over an unbounded run.

# %%
def spent(row, seed):
    """The router's attention share over the run: a trapezoid over the step-0 evaluation and the
    one training batch logged every log_interval steps."""
    with open(os.path.join(run_dir(row, seed), "metrics.jsonl")) as fh:
        rows = [r for r in map(json.loads, fh) if r["kind"] == "train" or r["step"] == 0]
    steps, attn = zip(*sorted({r["step"]: r["attn_frac"] for r in rows}.items()))
    return np.trapezoid(attn, steps) / (steps[-1] - steps[0])


b_, n_ = train.parse_args(CONFIG)[0]["batch_size"], task.len
ideal = theory.at(theory.cumulative_excess(), n=n_, f=query_rate, r=task.n_recurring / task.n_query,
                  P=task.pool, b=b_)
print(f"theory, consolidating learner (k = 1): at most {ideal:.0f} attended queries beyond the "
      f"floor over any run, {100 * ideal / (b_ * n_ * STEPS):.4f}% of the {b_ * n_ * STEPS} tokens "
      f"of {STEPS} steps\n")
print("| row | attention over training | x floor | attention at the end |")
print("|---|---:|---:|---:|")
spent_means = {}
for row in ROWS:
    means = spent_means[row] = [spent(row, seed) for seed in SEEDS]
    print(f"| {row} | {cell(means, True, 2)} | {np.mean(means) / floor:.1f}x | "
          f"{cell([m['attn'] for m in results[row]], True, 2)} |")

# %% [markdown]
# RESULTS.md: the theory's learner spends 0.005% of the run's tokens beyond the floor; the trained
# routers about 7x the floor; the collapsed flat routers least; a consolidation-free router with a
# small penalty about what CRAM spends.

# %%
if not SMALL:
    assert ideal / (b_ * n_ * STEPS) < 1e-4  # printed as 0.0050%: under a ten-thousandth
    for row in FREE:  # "7x the floor": the five rows measured 7.0x to 8.1x
        times = np.mean(spent_means[row]) / floor
        assert 6.5 <= times <= 8.5, (row, times)
    spend = {row: np.mean(means) for row, means in spent_means.items()}
    assert max(spend[row] for row in FLAT) < min(spend[row] for row in FREE)
    # "about what CRAM does": within CRAM's own spread over seeds (10.26% to 11.66%: 13%)
    assert abs(spend["no consolidation, penalty 0.02"] / spend["CRAM (learned)"] - 1) < 0.15

# %% [markdown]
# ## Retrieval against attention, every run
# Each point is one seed's final evaluation. The floor (novel queries only) and the query rate
# ("route every query") are the lines; CRAM's claim is the top left corner, at the floor.

# %%
fig, ax = plt.subplots(figsize=(8, 5))
markers = "os^vD<>pPX*hH8d"
for (row, marker) in zip(ROWS | BUDGETED, markers):
    ms = results[row]
    ax.scatter([max(m["attn"], 1e-4) for m in ms], [m["retrieval"] for m in ms], marker=marker,
               s=45, label=row, alpha=0.8)
ax.axvline(floor, color="k", ls=":", label="floor (novel queries)")
ax.axvline(query_rate, color="gray", ls="--", label="every query")
ax.set(xscale="log", xlabel="share of tokens on attention (any layer), final eval",
       ylabel="retrieval accuracy",
       title=f"SRCD ablations: {STEPS} steps, {len(SEEDS)} seeds per row")
ax.legend(fontsize=7, loc="lower right")
fig.tight_layout()
save_figure(fig, "04_srcd_ablations")

# %% [markdown]
# ## The penalty sweep
# CRAM, the flat-penalty router and no consolidation at each compute-penalty weight (0.5 is the
# default, the table's rows). Each cell: mean retrieval, mean attention as a multiple of the floor,
# and how many seeds hold retrieval >= 99.5% at attention <= 1.25x the floor (final evaluation).
# The plot is the Pareto picture: one point per seed, retrieval against attention, the penalty
# written beside it.

# %%
weights = sorted(PENALTIES + [0.5])


def sweep_runs(variant, w):
    if w == 0.5:  # the table's rows
        return results[VARIANTS[variant]][:len(SWEEP_SEEDS)]
    return results[f"{variant}, penalty {w}"]


def holds(m):
    return m["retrieval"] >= 0.995 and m["attn"] <= 1.25 * floor


print(f"\n{STEPS} steps, seeds {SWEEP_SEEDS}; mean retrieval, mean attention / floor, "
      "seeds at >= 99.5% and <= 1.25x\n")
print("| router | " + " | ".join(f"penalty {w}" for w in weights) + " |")
print("|---|" + "---:|" * len(weights))
sweep = []
for variant in VARIANTS:
    cells = []
    for w in weights:
        ms = sweep_runs(variant, w)
        ret, attn = np.mean([m["retrieval"] for m in ms]), np.mean([m["attn"] for m in ms])
        cells.append(f"{100 * ret:.1f}%, {attn / floor:.2f}x, {sum(map(holds, ms))} of {len(ms)}")
        sweep.append(dict(router=variant, w_compute=w, runs=ms))
    print(f"| {variant} | " + " | ".join(cells) + " |")
with open(os.path.join(OUT, "sweep.json"), "w") as fh:
    json.dump(sweep, fh, indent=1)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
for variant, color in zip(VARIANTS, ["C0", "C3", "C2"]):
    for w in weights:
        ms = sweep_runs(variant, w)
        xs, ys = [m["attn"] / floor for m in ms], [m["retrieval"] for m in ms]
        ax0.scatter(xs, ys, color=color, s=15 + 25 * weights.index(w), alpha=0.6,
                    label=variant if w == weights[0] else None)
        ax0.annotate(f"{w:g}", (np.median(xs), np.median(ys)), fontsize=7, color=color,
                     xytext=(3, 3), textcoords="offset points")
    means = [np.mean([m["attn"] / floor for m in sweep_runs(variant, w)]) for w in weights]
    ax1.plot(weights, means, "o-", color=color, label=variant)
    for w in weights:
        ms = sweep_runs(variant, w)
        ax1.scatter([w] * len(ms), [m["attn"] / floor for m in ms], color=color, s=10, alpha=0.5)
ax0.axvline(1, color="k", ls=":", label="floor (novel queries)")
ax0.axvline(1.25, color="k", ls="--", lw=0.8, label="1.25x the floor")
ax0.set(xlabel="attention / floor (final eval; 0 = collapsed)", ylabel="retrieval accuracy",
        title=f"Retrieval against attention, {len(SWEEP_SEEDS)} seeds; labels: w_compute")
ax0.legend(fontsize=7, loc="center right")
ax1.axhline(1, color="k", ls=":")
ax1.axhline(1.25, color="k", ls="--", lw=0.8)
ax1.set(xscale="log", xlabel="compute-penalty weight w_compute",
        ylabel="attention / floor (0 = collapsed)", title="Attention against the penalty weight")
ax1.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "04_penalty_sweep")

# %% [markdown]
# RESULTS.md: CRAM's q-weighted penalty never collapses and is within 1.25x of the floor in every
# seed only at weight 1.0; the flat routers reach the floor exactly at 0.1, lose one seed at 0.3
# and collapse at 0.5 and 1.0.

# %%
if not SMALL:
    for w in weights:
        assert all(m["retrieval"] >= 0.995 for m in sweep_runs("CRAM", w)), w
        assert (sum(map(holds, sweep_runs("CRAM", w))) == len(SWEEP_SEEDS)) == (w == 1.0), w
    for variant in ("flat penalty", "no consolidation"):
        at = {w: sweep_runs(variant, w) for w in weights}
        # "exactly": the table prints 1.00x, so the mean is under 1.005x the floor
        assert all(map(holds, at[0.1])), variant
        assert np.mean([m["attn"] for m in at[0.1]]) < 1.005 * floor, variant
        assert sum(m["collapsed"] for m in at[0.3]) == 1, variant
        off = [m["collapsed"] and m["attn"] < 0.1 * floor for w in (0.5, 1.0) for m in at[w]]
        assert all(off), variant  # attention shut off, as in the table's flat rows

# %% [markdown]
# ## The recurring-share sweep
# CRAM at recurring shares r of 0.3, 0.5, 0.7 (the default) and 0.9, one seed each. If consolidation
# takes the recurring queries off attention, attention tracks the floor f (1 - r), the novel
# queries; a router that routes every query pays f whatever r is. The paper says consolidation
# needs at least 50% recurrence.

# %%
default_r = train.parse_args(CONFIG)[0]["srcd_recurring"]  # the table's CRAM row
shares = sorted(RECURRING + [default_r])
recurring_runs = {r: results["CRAM (learned)" if r == default_r else f"CRAM, recurring {r}"][0]
                  for r in shares}
print(f"{STEPS} steps, seed {SEEDS[0]}; every query: {100 * query_rate:.2f}% of tokens\n")
print("| r | floor f (1 - r) | attention | attention / floor | retrieval | recurring | novel | "
      "attn recurring | attn novel | attn other | consolidation step |")
print("|---:|" + "---:|" * 10)
for r, m in recurring_runs.items():
    ratio = f"{m['attn'] / m['floor']:.2f}x" if m["floor"] else "-"  # no novel query (small mode)
    keys = ("attn", "retrieval", "recurring", "novel", "attn_recurring", "attn_novel", "attn_other")
    share = {k: cell([m[k]], True, 2 if k in ("attn", "attn_other") else 1) for k in keys}
    print(" | ".join(["", str(r), f"{100 * m['floor']:.2f}%", share.pop("attn"), ratio,
                      *share.values(), str(m["consolidation_step"] or "never"), ""]).strip())
with open(os.path.join(OUT, "recurring.json"), "w") as fh:
    json.dump({str(r): m for r, m in recurring_runs.items()}, fh, indent=1)

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(shares, [100 * recurring_runs[r]["attn"] for r in shares], "o-", label="CRAM, final eval")
ax.plot(shares, [100 * recurring_runs[r]["floor"] for r in shares], "k:", label="floor f (1 - r)")
ax.axhline(100 * query_rate, color="gray", ls="--", label="every query (f)")
ax.set(xlabel="recurring share r", ylabel="share of tokens on attention (%)", ylim=(0, None),
       title=f"Attention against the recurring share ({STEPS} steps, one seed)")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "04_recurring_sweep")

# %% [markdown]
# RESULTS.md: 100% retrieval at every share, no recurring query on attention in any run, the
# floor at r = 0.3 and 0.5, and r = 0.3 reaching it soonest: consolidation does not need 50%.

# %%
if not SMALL:
    for r, m in recurring_runs.items():
        assert m["retrieval"] >= 0.995, (r, m)
        assert m["attn_recurring"] < 1e-9 and m["attn_novel"] > 1 - 1e-9, (r, m)
    for r in (0.3, 0.5):  # printed as 1.00x and 1.01x: within one percent and a rounding
        assert recurring_runs[r]["attn"] <= 1.015 * recurring_runs[r]["floor"], r
    reached = {r: m["consolidation_step"] for r, m in recurring_runs.items()
               if m["consolidation_step"]}
    assert min(reached, key=reached.get) == 0.3, reached

# %% [markdown]
# ## Does semantic memory answer the recurring queries?
# The paper's story: consolidated recurring queries are routed to S and answered by f_sem. Here,
# for CRAM as in the table and for the paper's layer (no MLP), one seed each: the share of
# recurring queries' (token, layer) pairs the router sends to S, and retrieval per class when each
# layer's f_sem, its MLP, or both are replaced by zeros at evaluation (the router still decides; a
# token sent to S then gets nothing from it).

# %%
import contextlib  # noqa: E402

import torch  # noqa: E402


def evaluate_without(path, parts):
    """Evaluate a run's checkpoint on its eval batches with every layer's parts (of semantic, mlp)
    answering zeros."""
    run, task, model, _ = train.load_run(path)
    zero = lambda mod, inp, out: torch.zeros_like(out)
    hooks = [getattr(b, p).register_forward_hook(zero) for b in model.blocks for p in parts]
    try:
        with torch.no_grad():
            batches = [train.eval_batch(task, run, i) for i in range(run["eval_batches"])]
            return train.evaluate(model, task, batches, contextlib.nullcontext())
    finally:
        for h in hooks:
            h.remove()


print("| model | zeroed at evaluation | retrieval | recurring | novel | recurring on S "
      "| recurring on attention |")
print("|---|---|---:|---:|---:|---:|---:|")
semantic = []
for row in ["CRAM (learned)", "CRAM, no MLP (the paper's layer)"]:
    for parts in [(), ("semantic",), ("mlp",), ("semantic", "mlp")]:
        if "mlp" in parts and "--mlp=False" in RUNS[row]:
            continue
        m = evaluate_without(run_dir(row, SEEDS[0]), parts)
        if not parts:  # the hooks' evaluation is the run's own final one
            assert abs(m["acc"] - results[row][0]["retrieval"]) < 1e-6, (row, m["acc"])
        semantic.append(dict(row=row, zeroed=parts, **m))
        keys = ("acc", "acc_recurring", "acc_novel", "sem_recurring", "attn_recurring")
        print(f"| {row} | {' and '.join(parts) or '-'} | "
              + " | ".join(cell([m.get(k)], True, 1) for k in keys) + " |")
with open(os.path.join(OUT, "semantic.json"), "w") as fh:
    json.dump(semantic, fh, indent=1)

# %% [markdown]
# RESULTS.md: nothing reaches semantic memory in either model (no recurring query routed to S,
# zeroing f_sem changes nothing), and zeroing the MLPs too leaves recurring retrieval at 99-100%.

# %%
if not SMALL:
    for e in semantic:
        assert e["sem_recurring"] < 1e-9 and e["attn_recurring"] < 1e-9, e
        # 99% as RESULTS.md rounds it: the run with the MLPs zeroed keeps 98.9%
        assert e["acc_recurring"] >= (0.985 if "mlp" in e["zeroed"] else 1.0), e
