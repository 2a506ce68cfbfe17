# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 11 Routers on language: what attention is worth, and how much of it a router keeps
#
# The question of notebook 10 on text: can a router keep most of what attention adds while
# running it on a small share of the tokens? It can only be asked where attention adds something,
# so first the gap: the hybrid with attention on every token (`dense`) against the same model with
# none (`recurrent only`), on CPython's standard library source, one token per byte (`python
# data.py prepare --source=stdlib --encoding=bytes`, which this notebook runs when data/stdlib is
# missing), context 512, on two seeds. Then the Pareto, validation loss against the share of
# tokens on attention, for:
#
# - `every kth`: router_mode=fixed, attention on every k-th token (the static baseline);
# - `the paper's router (w)`: router_mode=learned at compute weight w (the default 0.5);
# - `capacity 1/k`, `measured 1/k`, `gain 1/k`, `controlled 1/k`: notebook 10's routers at a
#   budget of 1/k of the tokens, with its schedule: a quarter of the run at share 1, a quarter
#   down to the budget.
#
# The goal set for a learned router: at <= 1/8 of the tokens on attention, it closes at
# least 75% of the gap between recurrent only and dense, and beats every 8th on both seeds. Then
# whether a router that misses it chooses badly or has too small a share (each trained model with
# its choice replaced by others); last, which tokens a router picks: one validation sequence
# drawn with its tokens on attention, and the share on attention by kind of byte.
#
#     python notebooks/11_language_routers.py                 # trains what out/notebooks lacks
#     CRAM_LANG_ROWS="dense,recurrent only" ...              # some rows
#     CRAM_LANG_SEEDS=1337 ...                               # some seeds
#
# `CRAM_NB_SMALL=1` (the tests) runs every row a few steps on a tiny corpus (the json package's
# source): its numbers mean nothing, so the assertions run only at full size.

# %%
import contextlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(globals().get("__file__", os.path.join(os.getcwd(), "nb"))))
ROOT = HERE if os.path.isdir(os.path.join(HERE, "theory")) else os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "notebooks")]

import data  # noqa: E402
import runs  # noqa: E402  (notebooks/runs.py)
import train  # noqa: E402

SMALL = os.environ.get("CRAM_NB_SMALL") == "1"
OUT = os.path.join(ROOT, "out", "notebooks", "language_small" if SMALL else "language")
JOBS = 1 if SMALL else 2
KS = (8,) if SMALL else (4, 8, 16, 32)           # the small mode: one row of each kind
PENALTIES = (0.5,) if SMALL else (0.0, 0.05, 0.5)
ROWS = (["recurrent only", "dense"] + [f"every {k}{'nd' if k == 32 else 'th'}" for k in KS]
        + [f"the paper's router (w {w})" for w in PENALTIES]
        + [f"{m} 1/{k}" for m in ("capacity", "measured", "gain", "controlled") for k in KS])
chosen = os.environ.get("CRAM_LANG_ROWS", ",".join(ROWS)).split(",")
if set(chosen) - set(ROWS):
    sys.exit(f"CRAM_LANG_ROWS takes names from: {','.join(ROWS)}")
ROWS = [r for r in ROWS if r in chosen]
SEED_ORDER = [1337, 7]   # the default seeds, first in every table
DEFAULT_SEEDS = ",".join(map(str, SEED_ORDER))
try:
    SEEDS = [int(s) for s in os.environ.get("CRAM_LANG_SEEDS", DEFAULT_SEEDS).split(",")]
except ValueError:
    sys.exit(f"CRAM_LANG_SEEDS takes integers, comma-separated ({DEFAULT_SEEDS})")
SEEDS = SEEDS[:1] if SMALL else SEEDS

# %% [markdown]
# ## The corpus

# %%
if SMALL:  # a few files of one package: seconds to prepare, no 12 MB
    DATA = os.path.join(OUT, "data")
    lib = os.path.dirname(json.__file__)
    data.prepare(os.path.join(lib, "*.py"), DATA, "bytes")
else:
    os.chdir(ROOT)  # the runs record data_dir as written: the path train.py's examples use
    DATA = os.path.join("data", "stdlib")
    if not os.path.exists(os.path.join(DATA, "meta.json")):
        meta = data.prepare("stdlib", DATA, "bytes")
        print(f"prepared {DATA}: {meta['train_tokens']:,} train bytes")
CONFIG = [os.path.join(ROOT, "configs", "text_stdlib.py"), "--threads=1"]   # the regime
if SMALL:
    CONFIG += [f"--data_dir={DATA}", "--data_len=32", "--n_embd=16", "--max_iters=8",
               "--eval_interval=4", "--eval_batches=1", "--log_interval=2", "--ckpt_interval=4"]
RUN, MODEL = train.parse_args(CONFIG)
STEPS, T, D = RUN["max_iters"], RUN["data_len"], MODEL["n_embd"]
QUARTER = STEPS // 4

# %% [markdown]
# ## Train what is missing

# %%
def router_args(row):
    """A row's train.py settings: its router, and the budget and schedule of the budgeted ones."""
    if row in ("recurrent only", "dense"):
        return ["--router_mode=" + ("never" if row == "recurrent only" else "always")]
    if row.startswith("every"):
        return ["--router_mode=fixed", f"--fixed_every={row.split()[1][:-2]}"]
    if row.startswith("the paper's"):
        return ["--router_mode=learned", f"--w_compute={row.split()[-1][:-1]}"]
    mode, share = row.split()
    return [f"--router_mode={mode}", f"--attn_budget={1 / int(share[2:])}",
            f"--attn_warmup={QUARTER}", f"--attn_anneal={QUARTER}"]


def run_dir(row, seed):
    name = re.sub(r"[^a-z0-9]+", "_", row.replace("the paper's router", "learned")).strip("_")
    return os.path.join(OUT, f"{name}_d{D}_T{T}_s{seed}")


def cell(key):
    row, seed = key
    argv = CONFIG + router_args(row) + [f"--seed={seed}"]
    return key, runs.ensure(run_dir(row, seed), argv, SMALL, f"{row}, seed {seed}")


keys = [(row, seed) for seed in SEEDS for row in ROWS]
with ThreadPoolExecutor(JOBS) as pool:  # each run is its own process on one thread
    summaries = dict(pool.map(cell, keys))


def share(s):
    """The share of tokens on attention in evaluation, over the layers (of a run's summary or its
    recorded entry)."""
    return sum(s["attn_per_layer"].values()) / len(s["attn_per_layer"])


# %% [markdown]
# ## The gap, and the Pareto
#
# Validation loss in nats per byte (the last evaluation: eval_batches x 16 windows of 512 bytes,
# the same windows for every run), the share of tokens on attention in evaluation (the budgeted
# routers decide there by their causal threshold, so their share is measured, not set), and the
# share of the gap between recurrent only and dense that a row closes; what attention is worth
# inside each trained model: how much its loss rises when attention is removed at evaluation,
# every other decision as trained (a router that keeps little of the gap may still lean on its
# attention, or may have learned nothing there).
#
# Fifty runs take longer than a session on a laptop, so each finished run's numbers are recorded
# in the repository, a file a run in assets/language_runs/, and the tables and the Pareto cover
# every run recorded in this regime, those trained by earlier calls on other machines included.
# A retrained run replaces its file; runs recorded before this record existed carry a `source`:
# their numbers were copied from RESULTS.md's tables, at the precision printed there.

# %%
RECORD = os.path.join(OUT if SMALL else os.path.join(ROOT, "assets"), "language_runs")
# what makes two runs' numbers comparable: the rows differ in their router alone
REGIME = (f"{STEPS} steps of {RUN['batch_size']} x {T} bytes of {RUN['data_dir']}, d_model {D}, "
          f"{MODEL['n_layer']} layers, the {MODEL.get('wm_kind', runs.MODEL_DEFAULTS['wm_kind'])} "
          "working memory")
BASE = ["recurrent only", "dense"] + [f"the paper's router (w {w})" for w in PENALTIES]
PRINTED = ["every", "capacity", "controlled", "gain", "measured"]   # at each share, by name


def order(e):
    """Recorded runs by seed (the default seeds first), then the baselines, then by the k of
    their share (1/k, every k-th) and family; a row this notebook no longer has goes last."""
    row, seed, k = e["row"], e["seed"], re.findall(r"\d+", e["row"])
    family = row.split()[0]
    rank = ((BASE.index(row),) if row in BASE else
            (len(BASE), int(k[-1]) if k else 0,
             PRINTED.index(family) if family in PRINTED else len(PRINTED), row))
    return (SEED_ORDER.index(seed),) if seed in SEED_ORDER else (len(SEED_ORDER), seed), rank


def read(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as err:
        sys.exit(f"{path} is not a run's record ({err}): repair or delete it, then rerun")


def remember(entries):
    """Write entries {(row, seed): {...}} into RECORD, a file a run, each written whole and then
    renamed (no reader sees half); an entry with the loss already recorded keeps what else its
    file held (a call stopped before its last pass) -> this regime's recorded runs, in order."""
    os.makedirs(RECORD, exist_ok=True)
    for (row, seed), e in entries.items():
        path = os.path.join(RECORD, os.path.basename(run_dir(row, seed)) + ".json")
        old = read(path) if os.path.exists(path) else {}
        e = dict(old, **e) if old.get("val_loss") == e["val_loss"] else e
        with open(f"{path}.{os.getpid()}.tmp", "w") as fh:
            json.dump(dict(e, row=row, seed=seed, regime=REGIME), fh, indent=1)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    recorded = [read(os.path.join(RECORD, name)) for name in os.listdir(RECORD)
                if name.endswith(".json")]
    return {(e["row"], e["seed"]): e
            for e in sorted((e for e in recorded if e.get("regime") == REGIME), key=order)}


def gap_closed(record, e):
    """The share of the gap between recurrent only and dense of its seed that a run closes."""
    lo, hi = (record.get((r, e["seed"]), {}).get("val_loss") for r in ("dense", "recurrent only"))
    if lo is None or hi is None or hi == lo:
        return None
    return (hi - e["val_loss"]) / (hi - lo)


def pct(x, digits=0):
    """A share as a percentage, with no minus sign on a zero."""
    return f"{round(100 * x, digits) + 0.0:.{digits}f}%"


def evals(row, seed):
    """{step: validation loss} from the run's metrics.jsonl."""
    with open(os.path.join(run_dir(row, seed), "metrics.jsonl")) as fh:
        return {r["step"]: r["ce"] for r in map(json.loads, filter(str.strip, fh))
                if r["kind"] == "eval"}


# the gap opens late: validation loss at steps 1/16, 1/8, 1/4, 3/8, 1/2, 3/4 and 1 of this
# call's runs (the record keeps the last three)
curves = {key: evals(*key) for key in summaries}
marks = sorted({STEPS * i // 16 for i in (1, 2, 4, 6, 8, 12, 16)} & set.intersection(
    *(set(c) for c in curves.values())))
print("\nValidation loss along the run\n\n| row | seed | " + " | ".join(map(str, marks)) + " |")
print("|---|---:|" + "---:|" * len(marks))
for (row, seed), c in curves.items():
    print(f"| {row} | {seed} | " + " | ".join(f"{c[m]:.3f}" for m in marks) + " |")


PASSES = os.path.join(OUT, "passes.json")   # the evaluation passes below, kept between calls


def read_passes():
    with contextlib.suppress(OSError, ValueError), open(PASSES) as fh:
        return json.load(fh)
    return {}


kept = read_passes()


def kept_pass(what, row, seed, measure):
    """measure(run, task, model) for the trained run, kept in PASSES under what, the run's name
    and its final loss (a retrained run has another)."""
    key = f"{what} {os.path.basename(run_dir(row, seed))} {summaries[(row, seed)]['val_loss']!r}"
    kept.update(read_passes())  # another call of this notebook may have added some since
    if key not in kept:
        value = measure(*train.load_run(run_dir(row, seed))[:3])
        kept.update(read_passes())
        kept[key] = value
        part = f"{PASSES}.{os.getpid()}"  # written whole, then renamed: no reader sees half
        with open(part, "w") as fh:
            json.dump(kept, fh, indent=1)
        os.replace(part, PASSES)
    return kept[key]


def without_attention(run, task, model):
    """The validation loss with attention removed at evaluation (router_mode "never": every other
    decision as trained)."""
    batches = [train.eval_batch(task, run, i) for i in range(run["eval_batches"])]
    return train.evaluate(model, task, batches, contextlib.nullcontext(), "never")["ce"]


def entry(row, seed, s):
    """What the record keeps of a finished run."""
    c = curves[(row, seed)]
    off = None if row == "recurrent only" else kept_pass("without attention", row, seed,
                                                         without_attention)
    return dict(val_loss=s["val_loss"], attn_per_layer=s["attn_per_layer"],
                loss_at={str(m): c[m] for m in (STEPS // 2, 3 * STEPS // 4, STEPS) if m in c},
                worth=None if off is None else off - s["val_loss"])


record = remember({key: entry(*key, s) for key, s in summaries.items()})
# the pass really ran without attention: the dense model's loss moved, at any size
assert all(record[key]["worth"] for key in summaries if key[0] == "dense"), \
    "router_mode='never' left attention on"

print(f"\nEvery run recorded in {os.path.relpath(RECORD, ROOT)}, {REGIME}: validation loss along "
      "the run, the share of tokens on attention per layer, the gap closed, and attention's worth "
      "(the loss with attention removed at evaluation, every other decision as trained, minus the "
      "loss with it)\n")
marks_kept = sorted({int(m) for e in record.values() for m in e["loss_at"]})
print("| row | seed | " + " | ".join(f"step {m}" for m in marks_kept) + " | attention "
      + " / ".join(next(iter(record.values()))["attn_per_layer"]) + " | gap closed | "
      "attention's worth |")
print("|---|---:|" + "---:|" * (len(marks_kept) + 3))
for e in record.values():
    attn = (pct(share(e)) if e["row"] in ("recurrent only", "dense")
            else " / ".join(pct(v, 1) for v in e["attn_per_layer"].values()))
    g = gap_closed(record, e)
    worth = "-" if e["worth"] is None else f"{round(e['worth'], 3) + 0.0:.3f}"
    losses = [e["loss_at"].get(str(m)) for m in marks_kept]
    print(f"| {e['row']} | {e['seed']} | " + " | ".join("-" if v is None else f"{v:.3f}"
                                                        for v in losses)
          + f" | {attn} | {'-' if g is None else pct(g)} | {worth} |")

# %% [markdown]
# ## The choice, or the share?
#
# A router that keeps little of the gap at 1/8 may choose badly, or 1/8 of the bytes may be too
# few for attention to pay. To tell them apart, each trained model's choice is replaced by others
# at the same share (a row's budget or 1/k, else 1/8), every other decision as trained: `random`
# bytes; the top bytes of each window and layer by the two measured targets, in a training
# forward with attention on every byte (`measured`'s, |dL/dh_t . r_E_t|, and `gain`'s,
# -dL/dh_t . r_E_t); and `in hindsight` the bytes where attention lowers the loss most (d_t, the
# loss at byte t without attention minus with attention on every byte). The last three read the
# targets, so no causal router can make them: they say what a score that predicted them would be
# worth. Reading the targets also finds the bytes where attention's output helps by chance: in
# recurrent only, whose attention never trained, that is all it finds. The capacity rows are left
# out: their score also scales attention's output.

# %%
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cram  # noqa: E402


def byte_losses(model, batch, mode, keep=None):
    """The loss at each byte (B, T) under router_mode mode; keep: (L, B, T) bool, attention on
    those bytes alone in each layer (its EPISODIC logit overridden, its other choices as
    trained)."""
    def force(layer):
        def hook(module, args, out):
            logits = out[0].clone()
            logits[..., cram.EPISODIC] = torch.where(keep[layer], 1e4, -1e4)
            return logits, out[1]
        return hook

    hooks = [] if keep is None else [b.router.register_forward_hook(force(i))
                                     for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            out = model(batch["tokens"], router_mode=mode)
    finally:
        for hook in hooks:
            hook.remove()
    # the override took: attention ran on exactly those bytes
    assert keep is None or torch.equal(out["routing"]["z"][..., cram.EPISODIC] > 0, keep)
    return F.cross_entropy(out["logits"].transpose(1, 2).float(), batch["targets"],
                           reduction="none")


def first_order(model, batch):
    """(L, B, T): dL/dh_t . r_E_t in each layer, attention on every byte (what Sensitivity
    measures; with attention's output added whole, dL/dr_E_t is dL/dh_t)."""
    r_E = []

    def keep(module, args, out):
        out.retain_grad()
        r_E.append(out)

    hooks = [b.episodic.register_forward_hook(keep) for b in model.blocks]
    try:
        logits = model(batch["tokens"], router_mode="always")["logits"]
        F.cross_entropy(logits.transpose(1, 2), batch["targets"]).backward()
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    return torch.stack([(r.grad * r).sum(-1) for r in r_E])


CHOICES = ["random", "|dL/dh . r_E|", "-dL/dh . r_E", "in hindsight"]


def saved(model, batch):
    """(B, T): d_t, the loss at byte t without attention minus with attention on every byte."""
    return byte_losses(model, batch, "never") - byte_losses(model, batch, "always")


def top(score, k):
    """(..., T) -> bool, the top T / k of each window (in each layer)."""
    n = max(1, score.shape[-1] // k)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(n).indices, 1)


def other_choices(k):
    """-> measure(run, task, model): {choice: the validation loss with attention on 1/k of each
    window's bytes, so chosen}."""
    def measure(run, task, model):
        draw = torch.Generator().manual_seed(0)
        sums = dict.fromkeys(CHOICES, 0.0)
        for i in range(run["eval_batches"]):
            batch = train.eval_batch(task, run, i)
            dot = first_order(model, batch)
            d = saved(model, batch)
            scores = (torch.rand(d.shape, generator=draw).expand_as(dot), dot.abs(), -dot,
                      d.expand_as(dot))
            for name, score in zip(CHOICES, scores):
                sums[name] += byte_losses(model, batch, "learned", top(score, k)).mean().item()
        return {name: v / run["eval_batches"] for name, v in sums.items()}
    return measure


HEADS = ["random", "by size", "by sign", "in hindsight"]   # CHOICES, as the table heads them
chosen_otherwise = {}
for (row, seed), s in summaries.items():
    if not row.startswith("capacity"):
        k = int(row.split("/")[1]) if "/" in row else 8   # every kth: its k
        k = int(row.split()[1][:-2]) if row.startswith("every") else k
        other = kept_pass(f"1/{k} chosen otherwise", row, seed, other_choices(k))
        off = s["val_loss"] if row == "recurrent only" else kept_pass(
            "without attention", row, seed, without_attention)
        chosen_otherwise[(row, seed)] = dict(record[(row, seed)], choice={
            "k": k, "no attention": off, **dict(zip(HEADS, map(other.get, CHOICES)))})
record = remember(chosen_otherwise)

for seed in dict.fromkeys(e["seed"] for e in record.values() if "choice" in e):
    print(f"\nThe choice or the share, seed {seed}: validation loss with the model's own choice "
          "(its share on attention), with none, and with attention on 1/k of each window's bytes "
          "chosen otherwise\n\n| model | own choice (share) | no attention | share | "
          + " | ".join(HEADS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(HEADS))
    for e in record.values():
        if e["seed"] == seed and "choice" in e:
            c = e["choice"]
            digits = 0 if e["row"] in ("recurrent only", "dense") else 1
            print(f"| {e['row']} | {e['val_loss']:.4f} ({pct(share(e), digits)}) | "
                  f"{c['no attention']:.4f} | 1/{c['k']} | "
                  + " | ".join(f"{c[h]:.4f}" for h in HEADS) + " |")

# %%
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from theory.figures import save_figure  # noqa: E402

FAMILIES = ["every", "the paper's", "capacity", "measured", "gain", "controlled"]
seeds = list(dict.fromkeys(e["seed"] for e in record.values()))   # every seed recorded
fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4), squeeze=False)
for ax, seed in zip(axes[0], seeds):
    runs_of = [e for e in record.values() if e["seed"] == seed]
    for e in runs_of:
        if e["row"] in ("recurrent only", "dense"):
            ax.axhline(e["val_loss"], color="k", ls=":" if e["row"] == "dense" else "--", lw=1,
                       label=e["row"])
    for i, fam in enumerate(FAMILIES):
        pts = sorted((max(share(e), 1e-3), e["val_loss"]) for e in runs_of
                     if e["row"].startswith(fam))
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=fam)
    ax.set(xscale="log", xlim=(5e-4, 1.5), xlabel="tokens on attention (evaluation)",
           title=f"seed {seed}")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
axes[0][0].set_ylabel("validation loss (nats per byte)")
axes[0][0].legend(fontsize=7, loc="lower left")   # the empty corner: little attention, low loss
fig.tight_layout()
save_figure(fig, "11_language_routers")

# %% [markdown]
# ## Which tokens a router picks
#
# The measured router at 1/8 (else another row at 1/8 among those run, else the paper's router at
# its default weight), first seed, in evaluation mode: the share of each kind of byte on attention
# per layer, over every evaluation window; beside it, the share the hindsight choice of "the
# choice or the share" would put there (the 1/8 of each window where the same model's attention,
# on every byte, saves the most loss). Kinds are read from the byte the router sees (its decision
# at t predicts byte t + 1): an identifier's first byte or a later one, each split by whether the
# identifier already occurred earlier in the window (a repeat, which attention can copy),
# whitespace, the rest.

# %%
import numpy as np  # noqa: E402

IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
KINDS = ["identifier start, new", "identifier start, repeat", "inside identifier, new",
         "inside identifier, repeat", "whitespace", "punctuation, digits, other"]


def byte_kinds(seq):
    """seq: a window of byte ids (256 is end of text) -> an array of indices into KINDS."""
    raw = bytes(b if b < 256 else 0 for b in seq)
    kind = np.full(len(raw), 5)
    kind[[c in b" \t\n\r" for c in raw]] = 4
    seen = set()
    for m in IDENT.finditer(raw):
        repeat = m.group() in seen
        seen.add(m.group())
        kind[m.start()] = 1 if repeat else 0
        kind[m.start() + 1:m.end()] = 3 if repeat else 2
    return kind


assert byte_kinds(list(b"ab(ab, 7)")).tolist() == [0, 2, 5, 1, 3, 5, 4, 5, 5]

PICK = ["measured 1/8"] + [r for r in ROWS if r.endswith("1/8")] + ["the paper's router (w 0.5)"]
picked_row = next((r for r in PICK if r in ROWS), None)
if picked_row is not None:
    run, task, model, _ = train.load_run(run_dir(picked_row, SEEDS[0]))
    model.eval()
    counts = np.zeros((model.cfg.n_layer, len(KINDS)))
    totals, paying = np.zeros(len(KINDS)), np.zeros(len(KINDS))
    with torch.no_grad():
        for i in range(run["eval_batches"]):
            batch = train.eval_batch(task, run, i)
            on = model(batch["tokens"])["routing"]["z"][..., cram.EPISODIC] > 0    # (L, B, T)
            best = top(saved(model, batch), 8)   # (B, T): the hindsight choice at 1/8
            if i == 0:  # the window drawn below
                window, window_on = batch["tokens"][0], on[:, 0]
            for b, seq in enumerate(batch["tokens"].tolist()):
                kind = byte_kinds(seq)
                totals += np.bincount(kind, minlength=len(KINDS))
                paying += np.bincount(kind, weights=best[b].numpy(), minlength=len(KINDS))
                for layer in range(model.cfg.n_layer):
                    counts[layer] += np.bincount(kind, weights=on[layer, b].numpy(),
                                                 minlength=len(KINDS))
    windows = totals.sum() // window.numel()
    assert paying.sum() == windows * (window.numel() // 8)  # hindsight: 1/8 of each window
    print(f"\n{picked_row}, seed {SEEDS[0]}: share of each kind of byte on attention\n")
    print("| kind | bytes | " + " | ".join(f"L{i}" for i in range(len(counts)))
          + " | in hindsight |")
    print("|---|---:|" + "---:|" * (len(counts) + 1))
    for j, name in enumerate(KINDS):
        print(f"| {name} | {100 * totals[j] / totals.sum():.1f}% | " + " | ".join(
            f"{100 * c[j] / max(totals[j], 1):.1f}%" for c in list(counts) + [paying]) + " |")

    # one window drawn, a panel per layer: the bytes on attention on a coloured ground
    text = [chr(b) if 32 <= b < 127 else ("\n" if b == 10 else " ") for b in window.tolist()]
    lines = "".join(text).count("\n") + 1
    fig, axes = plt.subplots(1, len(window_on), figsize=(7 * len(window_on), 0.16 * lines + 0.8),
                             squeeze=False)
    for ax, layer_on in zip(axes[0], window_on):
        row_, col = 0, 0
        for ch, hit in zip(text, layer_on.tolist()):
            if hit:
                ax.add_patch(plt.Rectangle((col, row_), 1, 1, color="C1", alpha=0.6, lw=0))
            if ch == "\n":
                row_, col = row_ + 1, 0
            else:
                ax.text(col + 0.5, row_ + 0.5, ch, ha="center", va="center", fontsize=5,
                        family="monospace")
                col += 1
        ax.set(xlim=(0, 80), ylim=(lines, 0), xticks=[], yticks=[])
    for i, ax in enumerate(axes[0]):
        ax.set_title(f"{picked_row}, L{i}: bytes on attention", fontsize=8)
    fig.tight_layout()
    save_figure(fig, "11_language_tokens")

# %% [markdown]
# The findings, as RESULTS.md states them ("Routers on language"), asserted at full size on the
# rows this call ran: the regime is one where attention pays (dense below recurrent only by at
# least 0.03 nats per byte on every seed).

# %%
if not SMALL:
    for seed in SEEDS:
        if ("dense", seed) in summaries and ("recurrent only", seed) in summaries:
            gain = summaries[("recurrent only", seed)]["val_loss"] - summaries[("dense", seed)][
                "val_loss"]
            assert gain >= 0.03, (seed, gain)
