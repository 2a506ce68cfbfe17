# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 06 Transfer: does a trained router keep attention low on a task it has not seen?
#
# The paper reports 48-52% less attention on unseen tasks without retraining. Here: CRAM trained
# with the CPU default on SRCD (the source), then moved to a variant with other dynamics (mean gap
# 0.5 instead of 0.2, Pareto tail 1.5 instead of 2.5) and a pool that shares half its bindings with
# the source's (`--srcd_pool_new=50`: 50 of the 100 recurring keys get other values). Rows, each
# trained STEPS steps on the variant unless said otherwise, one seed:
#
# - the source model with no retraining (learning rate 0, one step: the evaluation only);
# - the source with only its output heads retrained (everything else frozen);
# - the source with semantic memory and the router (q-head included) frozen, the rest retrained
#   (the paper's transfer setting);
# - a fresh model trained on the variant from scratch.
#
#     python notebooks/06_srcd_transfer.py        # trains what out/notebooks/transfer lacks
#
# `CRAM_NB_SMALL=1` (the tests) runs every row for a few steps on a tiny config: its numbers mean
# nothing, so the assertions on the findings (RESULTS.md, "Transfer") run only at full size.

# %%
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "notebooks")]

import runs  # noqa: E402  (notebooks/runs.py)

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
OUT = os.path.join(ROOT, "out", "notebooks", "transfer_small" if SMALL else "transfer")
STEPS = 6 if SMALL else 750
CONFIG = ["--threads=1", "--eval_interval=125", "--log_interval=50"]
if SMALL:
    CONFIG = ["--threads=1", "--srcd_len=48", "--batch_size=4", "--n_embd=16", "--n_head=2",
              "--eval_batches=1", "--srcd_pool=10", "--srcd_novel_keys=20", "--srcd_values=8",
              "--eval_interval=3", "--log_interval=3"]
SOURCE = os.path.join(OUT, "source")
VARIANT = ["--srcd_gap=0.5", "--srcd_pareto=1.5", f"--srcd_pool_new={5 if SMALL else 50}"]
FROM = [f"--init_from={SOURCE}"]
ROWS = {
    "source, on its own task": None,
    "source, no retraining": FROM + ["--learning_rate=0.0", "--min_lr=0.0", "--max_iters=1",
                                     "--warmup_iters=1"],
    "source, output heads retrained": FROM + ["--freeze=blocks,tok_emb,cont_proj,ln_f"],
    "source, semantic + router frozen": FROM + ["--freeze=semantic,router"],
    "fresh model": [],
}

# %% [markdown]
# ## Train what is missing

# %%
source = runs.ensure(SOURCE, CONFIG + ["--max_iters=" + ("12" if SMALL else "1500")], SMALL,
                     "source")
summaries = {"source, on its own task": source}
for row, flags in ROWS.items():
    if flags is not None:
        argv = CONFIG + VARIANT + [f"--max_iters={STEPS}"] + flags
        path = os.path.join(OUT, row.replace(", ", "_").replace(" + ", "_").replace(" ", "_"))
        summaries[row] = runs.ensure(path, argv, SMALL, row)

# %% [markdown]
# ## The table
# Retrieval overall and per class, attention (share of tokens in any layer) overall and per class,
# dynamics MSE; the floor is the novel queries' share, the same on both tasks.

# %%
keys = [("retrieval_acc", "retrieval", 100), ("acc_recurring", "recurring", 100),
        ("acc_novel", "novel", 100), ("attn_frac", "attention", 100),
        ("attn_recurring", "attn recurring", 100), ("attn_novel", "attn novel", 100),
        ("attn_other", "attn other", 100), ("dynamics_mse", "dynamics MSE", 1)]
print(f"floor {100 * source['attn_floor']:.2f}%; transfer rows: {STEPS} steps on the variant, "
      "one seed\n")
print("| model | " + " | ".join(name for _, name, _ in keys) + " |")
print("|---|" + "---:|" * len(keys))
for row, s in summaries.items():
    assert s and all(s[k] is not None for k, _, _ in keys), row
    cells = [f"{100 * s[k]:.2f}%" if scale == 100 else f"{s[k]:.4f}" for k, _, scale in keys]
    print(f"| {row} | " + " | ".join(cells) + " |")
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "table.json"), "w") as fh:
    json.dump({row: {k: s[k] for k, _, _ in keys} for row, s in summaries.items()}, fh, indent=1)
fresh, frozen = summaries["fresh model"], summaries["source, semantic + router frozen"]
print(f"\nattention, frozen-router transfer against a fresh model after {STEPS} steps: "
      f"{100 * frozen['attn_frac']:.2f}% vs {100 * fresh['attn_frac']:.2f}%")

# %% [markdown]
# RESULTS.md: without retraining the router keeps attention at the floor and every pool key off
# it, so the changed bindings get their old values (about half the recurring queries wrong);
# retraining the heads recovers part, retraining all but semantic memory and the router recovers
# all, with a better dynamics MSE than a fresh model; and the transfer saves no attention that a
# fresh model's 750 steps do not (the paper: 48-52% less).

# %%
if not SMALL:
    floor = source["attn_floor"]
    as_is, heads = summaries["source, no retraining"], summaries["source, output heads retrained"]
    # 1.25x: what notebook 04 counts as "at the floor"
    assert as_is["attn_frac"] <= 1.25 * floor and as_is["attn_recurring"] < 1e-9, as_is
    assert 0.4 <= as_is["acc_recurring"] <= 0.6, as_is  # half the pool has new values: 47.7%
    assert as_is["acc_recurring"] < heads["acc_recurring"] < 0.99, heads  # part of it: 91.2%
    for s in (frozen, fresh):  # all of it, at the floor
        assert s["retrieval_acc"] >= 0.995 and s["attn_frac"] <= 1.25 * floor, s
    assert frozen["dynamics_mse"] < fresh["dynamics_mse"]  # 0.079 against 0.094
    # no saving: the paper's 48-52% would put the transfer near half the fresh model's attention;
    # here it is above it (1.63% against 1.60%), and 10% below would already be a saving
    assert frozen["attn_frac"] > 0.9 * fresh["attn_frac"], (frozen["attn_frac"], fresh["attn_frac"])

# %% [markdown]
# ## Plot: retrieval and attention per row

# %%
import matplotlib.pyplot as plt  # noqa: E402

from theory.figures import save_figure  # noqa: E402

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
labels = list(summaries)
ax0.barh(labels, [summaries[r]["retrieval_acc"] for r in labels], color="C0")
ax1.barh(labels, [100 * summaries[r]["attn_frac"] for r in labels], color="C3")
ax1.axvline(100 * source["attn_floor"], color="k", ls=":", label="floor (novel queries)")
ax0.set(xlabel="retrieval accuracy", xlim=(0, 1), title="retrieval")
ax1.set(xlabel="share of tokens on attention (%)", title="attention")
ax1.legend(fontsize=8)
ax1.set_yticks([])
fig.tight_layout()
save_figure(fig, "06_srcd_transfer")
