# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 09 Why the paper's router leaves attention on MQAR
#
# MQAR (64, 4), d_model 64, the gated CRAM hybrid, the 2000-step schedule of notebook 07, once with
# attention forced on every token for the first 500 steps (notebook 07's row) and once without. A
# checkpoint is kept every 50 steps; at each one, on train.py's fixed eval batches, per layer:
#
# - `pE_query`, `pE_other`: the router's probability of E (softmax of its logits, no Gumbel noise)
#   on query tokens and on the rest;
# - `q_query`: the q-head's estimate q_hat on queries (what the q-weighted penalty charges);
# - `gain`: how useful attention is at that step, the query cross-entropy with attention removed
#   from every layer minus the one with attention on every token (router modes never and always);
# - `grad_ce`, `grad_pen`: the gradient of the task loss and of the compute penalty with respect to
#   the router's E logits, summed over the query tokens (`_other`: over the rest) of one eval batch,
#   in a training-mode forward (Gumbel noise, spot checks): negative raises P(E). The
#   straight-through estimator gives E a task gradient only where attention ran (routed or
#   spot-checked): r_E is zero elsewhere, so dL/dz_E = 0 there.
#
#     python notebooks/09_router_diagnosis.py  # trains what out/notebooks/diagnosis lacks (~15 min)
#
# `CRAM_NB_SMALL=1` (the tests) runs a few steps of a tiny config: its numbers mean nothing.

# %%
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "notebooks")]

import runs  # noqa: E402  (notebooks/runs.py)
import train  # noqa: E402
from cram import EPISODIC, router_tau  # noqa: E402
from probe import checkpoints  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
STEPS, EVERY = (8, 4) if SMALL else (2000, 50)
T, KV, D = (16, 2, 16) if SMALL else (64, 4, 64)
OUT = os.path.join(ROOT, "out", "notebooks", "diagnosis_small" if SMALL else "diagnosis")
CONFIG = ["--dataset=mqar", "--threads=1", f"--max_iters={STEPS}", "--emb_std=1.0",
          f"--ckpt_interval={EVERY}", "--keep_checkpoints", f"--eval_interval={EVERY * 5}",
          f"--log_interval={EVERY}", f"--mqar_len={T}", f"--mqar_kv_pairs={KV}",
          f"--mqar_vocab={2 * T}", f"--n_embd={D}", f"--window={T}",
          f"--batch_size={64 if not SMALL else 4}",
          "--wm_kind=gated"] + (["--eval_batches=1"] if SMALL else [])
RUNS = {"warm-up 500": [f"--attn_warmup={STEPS // 4}"], "no warm-up": ["--attn_warmup=0"]}

# %%
def router_logits(model):
    """Hooks that keep each layer's router logits (B, T, 3) from the last forward."""
    kept = {}
    for i, block in enumerate(model.blocks):
        block.router.logits.register_forward_hook(lambda m, a, out, i=i: kept.__setitem__(i, out))
    return kept


def query_ce(model, batches, mode):
    """Mean cross-entropy over query positions with the router in `mode` (evaluation)."""
    with torch.no_grad():
        return float(np.mean([model(**b, router_mode=mode)["terms"]["ce"].item() for b in batches]))


def diagnose(out_dir):
    """Per kept checkpoint of a run: its step, accuracy, attention's gain and, per layer, the
    quantities listed above."""
    rows = []
    for path in checkpoints(out_dir):
        run, task, model, step = train.load_run(out_dir, path=path)
        batches = [train.eval_batch(task, run, i) for i in range(run["eval_batches"])]
        logits = router_logits(model)
        row = dict(step=step,
                   gain=query_ce(model, batches, "never") - query_ce(model, batches, "always"))
        with torch.no_grad():
            outs = [model(**b) for b in batches]
        row["acc"] = float(np.mean([task.metrics(o, b)["acc"].item()
                                    for o, b in zip(outs, batches)]))
        b = batches[-1]  # routing and gradients on the last eval batch (64 examples, 256 queries)
        query = b["targets"] >= 0
        layers = [dict(pE_query=logits[i].softmax(-1)[..., EPISODIC][query].mean().item(),
                       pE_other=logits[i].softmax(-1)[..., EPISODIC][~query].mean().item(),
                       q_query=outs[-1]["routing"]["q_hat"][i][query].mean().item())
                  for i in logits]
        model.train()  # the router's gradient for E on queries, as a training step sees it
        tau = router_tau(model.cfg, (step - run["attn_warmup"])
                                    / max(1, run["max_iters"] - run["attn_warmup"]))
        grads = {}
        for name in ("total", "ce"):  # terms are detached: the task loss is recomputed from logits
            torch.manual_seed(step)  # the same Gumbel noise and spot checks for both
            out = model(**b, tau=tau)
            loss = out["loss"] if name == "total" else F.cross_entropy(
                out["logits"].flatten(0, 1), b["targets"].flatten(), ignore_index=-1)
            # summed over query tokens: what the step applies to the E logits of the queries
            grads[name] = [(g[..., EPISODIC][query].sum().item(),
                            g[..., EPISODIC][~query].sum().item())
                           for g in torch.autograd.grad(loss, list(logits.values()))]
        for i, layer in enumerate(layers):  # the rest of the loss reaches the logits
                                            # only by the penalty
            (ce_q, ce_o), (tot_q, tot_o) = grads["ce"][i], grads["total"][i]
            layer.update(grad_ce=ce_q, grad_pen=tot_q - ce_q, grad_ce_other=ce_o,
                         grad_pen_other=tot_o - ce_o)
        row["layers"] = layers
        rows.append(row)
    return rows


# %%
results = {}
for name, flags in RUNS.items():
    path = os.path.join(OUT, name.replace(" ", "_"))
    runs.ensure(path, CONFIG + flags, SMALL, name)
    results[name] = diagnose(path)

for name, rows in results.items():
    print(f"\n{name}: per layer L0 / L1\n")
    print("| step | acc | gain (nats) | P(E) query | P(E) other | q_hat query | grad CE query "
          "| grad penalty query | grad CE other | grad penalty other |")
    print("|---:|---:|---:|---|---|---|---|---|---|---|")
    for r in rows:
        if SMALL or r["step"] <= 1000 and r["step"] % 100 == 0 or r["step"] % 500 == 0:
            f = lambda k, fmt, r=r: " / ".join(fmt.format(layer[k]) for layer in r["layers"])
            print(f"| {r['step']} | {r['acc']:.3f} | {r['gain']:.3f} | {f('pE_query', '{:.2f}')} | "
                  f"{f('pE_other', '{:.2f}')} | {f('q_query', '{:.2f}')} | "
                  f"{f('grad_ce', '{:+.1e}')} | {f('grad_pen', '{:+.1e}')} | "
                  f"{f('grad_ce_other', '{:+.1e}')} | {f('grad_pen_other', '{:+.1e}')} |")

# %% [markdown]
# ## The claims, checked on these runs (RESULTS.md, "Why the router leaves attention")

# %%
if not SMALL:
    at = {name: {r["step"]: r for r in rows} for name, rows in results.items()}
    warm, cold = at["warm-up 500"], at["no warm-up"]
    # released at step 500 with attention already worth something, the router leaves within
    # 100 steps on queries and other tokens alike (0.05: "left", well below the 0.9 it starts at)
    assert warm[500]["gain"] > 0.1 and all(layer["pE_query"] > 0.8 for layer in warm[500]["layers"])
    assert all(max(layer["pE_query"], layer["pE_other"]) < 0.05 for layer in warm[600]["layers"])
    # at release the penalty pushes E down on the other tokens harder than the task pulls it up on
    # the queries, in every layer
    assert all(layer["grad_pen_other"] > abs(layer["grad_ce"]) for layer in warm[500]["layers"])
    # once it has left, the task gradient on the queries' E logits is orders of magnitude smaller
    # than at release, and forcing attention back costs query loss
    assert all(abs(layer["grad_ce"]) < 1e-3 * 4e-3 for layer in warm[1500]["layers"])
    assert max(warm[s]["gain"] for s in (600, 700, 800, 900, 1000, 1500, 2000)) < 0
    # without a warm-up it leaves before attention is worth anything
    assert all(layer["pE_query"] < 0.05 for layer in cold[100]["layers"])
    assert abs(cold[100]["gain"]) < 0.01

# %% [markdown]
# ## Plot: the router's P(E) on queries and what attention is worth, step by step

# %%
import matplotlib.pyplot as plt  # noqa: E402

from theory.figures import save_figure  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (name, rows) in zip(axes, results.items()):
    steps = [r["step"] for r in rows]
    for i in range(len(rows[0]["layers"])):
        ax.plot(steps, [r["layers"][i]["pE_query"] for r in rows],
                label=f"P(E) on queries, layer {i}")
    ax.plot(steps, [r["gain"] for r in rows], "k--", label="attention's worth (nats of query loss)")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set(title=name, xlabel="step")
axes[0].legend(fontsize=7)
fig.tight_layout()
save_figure(fig, "09_router_diagnosis")
