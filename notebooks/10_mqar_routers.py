# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 10 Routers on MQAR: can a router learn to put every query on attention?
#
# On MQAR no key recurs across examples, so nothing can be consolidated: the right router sends
# every query to attention and as little else as its budget allows. Notebook 09 measured why the
# paper's router leaves attention instead. Here the routers that cannot leave it, each a row of
# cram.ROUTER_MODES, beside the hybrid with attention everywhere and the paper's router:
#
# - `dense`: router_mode=always, attention on every token (what the budgeted rows are measured
#   against);
# - `the paper's router`: router_mode=learned with notebook 07's warm-up (a quarter of the run);
# - `capacity Nx`: Mixture-of-Depths' top-k, the score's sigmoid scaling attention's output, at N
#   times the query share (kv pairs / length) of each sequence;
# - `measured Nx`: the same top-k, its score regressed on the measured sensitivity of the loss to
#   attention's output where attention ran (cram.Sensitivity), a regression that also trains the
#   layers below the score, so the state can learn to say where attention will pay;
# - `gain Nx`: the same regression on the signed measurement, how much attention's output lowers
#   the loss (it also ranks low the tokens where attention's output is noise that raises it);
# - `controlled Nx`: the paper's router with its compute weight steered by dual ascent so that the
#   mean P(E) follows the share.
#
# The budgeted rows keep attention on every token for the first quarter of the run and then lower
# their share linearly to the budget over the next quarter (--attn_warmup, --attn_anneal). Every
# run notebook 07's schedule (2 layers, 2000 steps of 4096 tokens, one thread, JOBS at a time).
# Columns: each working memory at each size; per cell the accuracy over the queries at the end and
# the share of queries / other tokens on attention in evaluation (the top-k routers use their
# causal threshold there); a second table gives the shares in training (the top-k).
#
#     python notebooks/10_mqar_routers.py                      # trains what out/notebooks lacks
#     CRAM_ROUTERS_MEMORIES=gated CRAM_ROUTERS_ROWS="measured 2x" ...   # some cells
#     CRAM_ROUTERS_SIZES=128x8 ...                             # another size
#     CRAM_ROUTERS_FILLER=zeros ...   # filler 0 between the queries (Zoology's: random tokens)
#
# `CRAM_NB_SMALL=1` (the tests) runs every row a few steps on a tiny config: its numbers mean
# nothing, so the assertions on the findings run only at full size.

# %%
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "notebooks")]

import runs  # noqa: E402  (notebooks/runs.py)

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
STEPS = 8 if SMALL else 2000
OUT = os.path.join(ROOT, "out", "notebooks", "routers_small" if SMALL else "routers")
try:
    sizes = os.environ.get("CRAM_ROUTERS_SIZES", "64x4").split(",")
    SIZES = [(16, 2)] if SMALL else [tuple(int(n) for n in s.split("x")) for s in sizes]
    assert all(len(s) == 2 and s[0] > 2 * s[1] for s in SIZES)
except (ValueError, AssertionError):
    sys.exit("CRAM_ROUTERS_SIZES takes tokens x pairs, comma-separated (64x4,128x8)")
FILLER = os.environ.get("CRAM_ROUTERS_FILLER", "random")
if FILLER not in ("random", "zeros"):
    sys.exit("CRAM_ROUTERS_FILLER takes random (Zoology's) or zeros")
MEMORIES = os.environ.get("CRAM_ROUTERS_MEMORIES", "gated" if SMALL else "gated,mamba2,palimpsa"
                          ).split(",")
if set(MEMORIES) - {"gated", "mamba2", "palimpsa"}:
    sys.exit("CRAM_ROUTERS_MEMORIES takes gated, mamba2, palimpsa, comma-separated")
D, TOKENS, JOBS = (16, 64, 1) if SMALL else (64, 4096, 2)
QUARTER = STEPS // 4
CONFIG = ["--dataset=mqar", "--threads=1", f"--max_iters={STEPS}", "--emb_std=1.0",
          "--ckpt_interval=100", f"--eval_interval={2 if SMALL else 250}",
          f"--log_interval={2 if SMALL else 100}", f"--n_embd={D}"]
if FILLER == "zeros":
    CONFIG.append("--mqar_random_filler=False")
SCHEDULE = [f"--attn_warmup={QUARTER}", f"--attn_anneal={QUARTER}"]


def router_args(row, T, kv):
    """A row's train.py settings at size (T, kv): its router, budget and schedule."""
    if row == "dense":
        return ["--router_mode=always"]
    if row == "the paper's router":
        return ["--router_mode=learned", f"--attn_warmup={QUARTER}"]
    mode, times = row.split()
    return [f"--router_mode={mode}", f"--attn_budget={int(times[:-1]) * kv / T}"] + SCHEDULE


ROWS = ["dense", "the paper's router"] + [
    f"{m} {n}x" for m in ("capacity", "measured", "gain", "controlled") for n in (2, 1)]
chosen = os.environ.get("CRAM_ROUTERS_ROWS", ",".join(ROWS)).split(",")
if set(chosen) - set(ROWS):
    sys.exit(f"CRAM_ROUTERS_ROWS takes names from: {','.join(ROWS)}")
ROWS = [r for r in ROWS if r in chosen]

# %% [markdown]
# ## Train what is missing

# %%
def argv(row, wm, T, kv):
    return CONFIG + router_args(row, T, kv) + [
        f"--wm_kind={wm}", f"--mqar_len={T}", f"--mqar_kv_pairs={kv}", f"--mqar_vocab={2 * T}",
        f"--window={T}", f"--batch_size={TOKENS // T}"] + (["--eval_batches=1"] if SMALL else [])


def run_dir(row, wm, T, kv):
    name = row.replace("the paper's router", "learned").replace(" ", "")
    filler = "_zeros" if FILLER == "zeros" else ""
    return os.path.join(OUT, f"{name}_{wm}_{T}_{kv}_d{D}{filler}")


def cell(key):
    return key, runs.ensure(run_dir(*key), argv(*key), SMALL, "{} {} ({}, {})".format(*key))


keys = [(row, wm, T, kv) for (T, kv) in SIZES for wm in MEMORIES for row in ROWS]
with ThreadPoolExecutor(JOBS) as pool:  # each run is its own process on one thread
    summaries = dict(pool.map(cell, keys))


def training_shares(key, last=5):
    """The share of queries / other tokens on attention in training (any layer), the mean of the
    run's last `last` log lines: the budgeted routers' top-k, before the causal threshold."""
    with open(os.path.join(run_dir(*key), "metrics.jsonl")) as fh:
        rows = [r for r in map(json.loads, filter(str.strip, fh)) if r["kind"] == "train"][-last:]
    return (sum(r["attn_query"] for r in rows) / len(rows),
            sum(r["attn_other"] for r in rows) / len(rows))


# %% [markdown]
# ## The tables

# %%
cols = [(wm, T, kv) for (T, kv) in SIZES for wm in MEMORIES]
head = "| router | " + " | ".join(f"{wm} ({T}, {kv})" for wm, T, kv in cols) + " |"
print(f"{STEPS} steps, d_model {D}, filler {FILLER}, one seed. Accuracy (queries / other tokens "
      "on attention, evaluation)\n")
print(head + "\n|---|" + "---:|" * len(cols))
for row in ROWS:
    s = [summaries[(row, *c)] for c in cols]
    print(f"| {row} | " + " | ".join(f"{x['accuracy']:.3f} ({100 * x['attn_query']:.0f}% / "
                                     f"{100 * x['attn_other']:.1f}%)" for x in s) + " |")
train_share = {key: training_shares(key) for key in summaries}
print("\nQueries / other tokens on attention in training, the last 5 log lines\n")
print(head + "\n|---|" + "---:|" * len(cols))
for row in ROWS:
    print(f"| {row} | " + " | ".join("{:.0f}% / {:.1f}%".format(*(100 * v for v in train_share[
        (row, *c)])) for c in cols) + " |")
os.makedirs(OUT, exist_ok=True)
table = {f"{row} | {wm} ({T}, {kv})": dict(
    {k: summaries[(row, wm, T, kv)][k] for k in ("accuracy", "attn_query", "attn_other")},
    train_query=train_share[(row, wm, T, kv)][0], train_other=train_share[(row, wm, T, kv)][1])
    for row, wm, T, kv in summaries}
with open(os.path.join(OUT, f"table_{FILLER}.json"), "w") as fh:
    json.dump(table, fh, indent=1)

# %% [markdown]
# ## Plot: accuracy against the share of queries on attention

# %%
import matplotlib.pyplot as plt  # noqa: E402

from theory.figures import save_figure  # noqa: E402

fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.6), sharey=True, squeeze=False)
for ax, (wm, T, kv) in zip(axes[0], cols):
    for i, row in enumerate(ROWS):
        s = summaries[(row, wm, T, kv)]
        ax.scatter(100 * s["attn_query"], s["accuracy"], color=f"C{i}", label=row)
    ax.set(xlim=(-5, 105), ylim=(0, 1.02), xlabel="queries on attention (%)",
           title=f"{wm} ({T}, {kv}), filler {FILLER}")
axes[0][0].set_ylabel("accuracy")
axes[0][-1].legend(fontsize=7, loc="lower right")
fig.tight_layout()
save_figure(fig, "10_mqar_routers")

# %% [markdown]
# ## Where the measured router's misses come from
#
# For each `measured` and `gain` run, on its first eval batch with every token on attention
# (share 1, the training forward): per layer, how well the target (log |dL/dh_t . r_E_t|, for
# gain its signed asinh) and the router's score single out the queries, as the AUC of queries
# against the other tokens (1: every query above every other token; 0.5: chance) and the share of
# the queries in each sequence's top-k at the run's budget. The target is read in the backward
# pass, where cram.Sensitivity measures it, by wrapping its backward.

# %%
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cram  # noqa: E402
import train  # noqa: E402


def auc(pos, neg):
    """P(a random positive scores above a random negative), ties counted half."""
    pos, neg = pos.flatten()[:, None], neg.flatten()[None, :]
    return float((pos > neg).float().mean() + 0.5 * (pos == neg).float().mean())


def separation(key):
    """[(layer, target AUC, score AUC, queries in the target's top-k, in the score's top-k)]."""
    run, task, model, _ = train.load_run(run_dir(*key))
    batch = train.eval_batch(task, run, 0)
    query = batch["targets"] >= 0
    scores, targets = [], []
    hooks = [b.router.register_forward_hook(lambda m, a, o: scores.append(o[0][..., cram.EPISODIC]))
             for b in model.blocks]
    backward = cram.Sensitivity.backward

    def spy(ctx, g):  # the measurement, as Sensitivity.backward makes it
        r_E, _, ran = ctx.saved_tensors
        targets.append(cram.Sensitivity.target(g, r_E, ran, ctx.signed))
        return backward(ctx, g)
    cram.Sensitivity.backward = staticmethod(spy)
    try:
        model.train()(**batch, share=1.0)["loss"].backward()
    finally:
        cram.Sensitivity.backward = staticmethod(backward)
        for h in hooks:
            h.remove()
    k = max(1, int(np.ceil(model.cfg.attn_budget * query.shape[1])))

    def top_share(s):
        top = torch.zeros_like(query).scatter_(1, s.topk(k, -1).indices, True)
        return float(top[query].float().mean())
    return [(i, auc(t[query], t[~query]), auc(s[query], s[~query]), top_share(t), top_share(s))
            for i, (t, s) in enumerate(zip(reversed(targets), [s.detach() for s in scores]))]


print("\n| run | layer | target AUC | score AUC | queries in the target's top-k | in the score's |")
print("|---|---:|---:|---:|---:|---:|")
sep = {}
for key in summaries:
    if key[0].startswith(("measured", "gain")):
        sep[key] = separation(key)
        for i, t_auc, s_auc, t_top, s_top in sep[key]:
            print(f"| {key[0]}, {key[1]} ({key[2]}, {key[3]}) | L{i} | {t_auc:.3f} | {s_auc:.3f} | "
                  f"{100 * t_top:.0f}% | {100 * s_top:.0f}% |")

# %% [markdown]
# The findings, as RESULTS.md states them ("Routers on MQAR"), asserted at full size on the cells
# this call ran: the measured target puts every query above every other token in the last layer;
# where the filler is zeros the measured router puts at least 95% of the queries on attention;
# the capacity router puts fewer queries on attention in training than a random pick of its
# budget in each of the two layers would (1 - (1 - budget)^2); the paper's router leaves them all.

# %%
if not SMALL:
    for key, layers in sep.items():
        assert not key[0].startswith("measured") or layers[-1][1] > 0.99, (key, layers[-1])
    for (row, wm, T, kv), s in summaries.items():
        if row.startswith("measured") and FILLER == "zeros":
            assert min(s["attn_query"], train_share[(row, wm, T, kv)][0]) >= 0.95, (row, wm)
        if row.startswith("capacity"):
            budget = int(row.split()[1][:-1]) * kv / T
            assert train_share[(row, wm, T, kv)][0] < 1 - (1 - budget) ** 2, (row, wm)
        if row == "the paper's router" and FILLER == "random" and wm == "gated":
            assert s["attn_query"] < 0.01
