"""
The attention-redundancy probe (the paper's section 2): how much of what attention returns could
the hidden state alone have predicted? Per layer, a linear map (ridge regression) from the
attention block's input u_t (after its layer norm) to the attention output a_t, fitted on one set
of tokens and scored on held-out tokens:

    R^2    = 1 - sum ||a - W u||^2 / sum ||a - mean(a)||^2     the share of attention's output
                                                               variance the probe explains
    share  = mean[ cos(W u - m, a - m) >= threshold ]          the share of attention operations
                                                               the probe predicts, m the mean output
                                                               of the fitting tokens (threshold 0.9:
                                                               within 26 degrees)

The cosine is taken about the mean: attention outputs share a large constant part that any probe
gets right (a tiny trained model scores cos >= 0.9 on 97-100% of tokens uncentred, R^2 0.7), and
that part says nothing about whether this token's retrieval was predictable.

R^2 is threshold-free and what "predictability" is taken to mean here; the share is the count the
paper's "88% of attention operations" speaks of, and depends on the threshold, so both are printed.
A probe that predicts a_t means the layer's attention, at that token, added what the token's own
state already held: those are the operations a router could skip.

    python probe.py --out_dir=out/text_tiny                     # every kept checkpoint of a run
    python probe.py --gpt2=gpt2 --data_dir=data/openwebtext     # pretrained GPT-2
                                                                # (pip install transformers)

For our models the probe reads EpisodicMemory (the tokens routed to attention, every token with
router_mode=always); for GPT-2 each block's attention module.
"""
import argparse
import glob
import os
import re
import sys

import numpy as np
import torch

import data
import train
from cram import ConfigError, EpisodicMemory


def attention_modules(model):
    """The attention module of each layer: ours (CRAM, EpisodicMemory) or transformers' GPT-2."""
    if hasattr(model, "blocks"):
        return [block.episodic for block in model.blocks]
    return [block.attn for block in model.transformer.h]


@torch.no_grad()
def layer_io(model, batches):
    """Run the model over batches of token ids (B, T), yielding per batch a list over layers of
    (U, A): the attention input and output of every token that ran attention, (N, d) float64
    arrays. One batch at a time, so that a probe of GPT-2 keeps sums, not every token's vectors."""
    grabbed = [None] * len(attention_modules(model))

    def hook(i):
        def grab(module, args, kwargs, out):
            u = args[0] if args else kwargs["hidden_states"]
            a = out[0] if isinstance(out, tuple) else out
            ours = isinstance(module, EpisodicMemory)  # ours runs only the routed tokens
            ran = args[1] if ours else torch.ones(u.shape[:2], dtype=torch.bool, device=u.device)
            grabbed[i] = (u[ran].double().cpu().numpy(), a[ran].double().cpu().numpy())
        return grab

    handles = [m.register_forward_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(attention_modules(model))]
    try:
        for ids in batches:
            model(ids)
            yield list(grabbed)
    finally:
        for h in handles:
            h.remove()


def with_bias(U):
    return np.hstack([U, np.ones((len(U), 1))])


def fit(model, batches, lam=1e-3):
    """Per layer the ridge probe a ~ [u, 1] W, W = (X'X + lam N I)^-1 X'A, from sums over the
    batches' tokens (lam relative to the token count N: it only keeps the solve well-posed), and
    the mean output m -> [(W, m)]."""
    sums = None
    for layers in layer_io(model, batches):
        step = [(with_bias(U).T @ with_bias(U), with_bias(U).T @ A, A.sum(0), len(A))
                for U, A in layers]
        sums = step if sums is None else [tuple(x + y for x, y in zip(s, t))
                                          for s, t in zip(sums, step)]
    out = []
    for i, (xx, xa, a_sum, n) in enumerate(sums):
        if n <= xx.shape[0]:
            raise ConfigError(f"layer {i}: {n} tokens ran attention, too few for a "
                              f"{xx.shape[0] - 1}-wide probe: give more --batches (or a model "
                              "that routes tokens to attention)")
        out.append((np.linalg.solve(xx + lam * n * np.eye(len(xx)), xa), a_sum / n))
    return out


def score(probes, model, batches, threshold=0.9):
    """Per layer on the batches' tokens: R^2 of the probe, and the share of tokens with
    cos(prediction - m, output - m) >= threshold -> [dict(r2, share, tokens)]."""
    sums = [dict(sse=0.0, a2=0.0, a=0.0, hit=0, n=0) for _ in probes]
    for layers in layer_io(model, batches):
        for (U, A), (W, m), t in zip(layers, probes, sums):
            P = with_bias(U) @ W
            cos = ((P - m) * (A - m)).sum(1) / (np.linalg.norm(P - m, axis=1)
                                                * np.linalg.norm(A - m, axis=1) + 1e-12)
            t["sse"] += ((A - P) ** 2).sum()
            t["a2"] += (A ** 2).sum()
            t["a"] = t["a"] + A.sum(0)
            t["hit"] += int((cos >= threshold).sum())
            t["n"] += len(A)
    out = []
    for t in sums:
        n = max(t["n"], 1)
        total = t["a2"] - (np.asarray(t["a"]) ** 2).sum() / n  # sum of ||a - mean(a)||^2
        out.append(dict(r2=float(1 - t["sse"] / total) if t["n"] else float("nan"),
                        share=t["hit"] / n, tokens=t["n"]))
    return out


def probe(model, fit_batches, test_batches, threshold=0.9, lam=1e-3):
    """Per layer: the probe fitted on fit_batches' tokens, scored on test_batches' -> [dict]."""
    return score(fit(model, fit_batches, lam), model, test_batches, threshold)


def token_batches(task, n, batch_size, seed, split):
    rng = np.random.default_rng(seed)
    return [task.batch(batch_size, rng, split=split)["tokens"] for _ in range(n)]


def checkpoints(out_dir):
    """A run's kept checkpoints (ckpt_<step>.pt, train.py --keep_checkpoints) by step, else
    ckpt.pt."""
    kept = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")),
                  key=lambda p: int(re.findall(r"\d+", p)[-1]))
    return kept or [os.path.join(out_dir, "ckpt.pt")]


def probe_run(out_dir, batches=8, threshold=0.9):
    """Every kept checkpoint of a language-model run -> [(step, per-layer scores)]; the probe is
    fitted on training windows and scored on validation windows."""
    results = []
    for path in checkpoints(out_dir):
        run, task, model, step = train.load_run(out_dir, path=path)
        if not isinstance(task, data.TokenFile):
            raise ConfigError(f"{out_dir} trained on {run['dataset']}: the probe needs a "
                              "language-model run")
        fit = token_batches(task, batches, run["batch_size"], 0, "train")
        test = token_batches(task, max(1, batches // 2), run["batch_size"], 1, "val")
        results.append((step, probe(model, fit, test, threshold)))
    return results


def gpt2_model(name):
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ConfigError("--gpt2 needs the transformers library: "
                          "pip install transformers") from None
    try:
        return GPT2LMHeadModel.from_pretrained(name).eval()
    except OSError as e:
        raise ConfigError(f"GPT-2 weights {name!r} could not be loaded ({type(e).__name__}): "
                          "they download once from the Hugging Face hub; run once with internet "
                          "or give a local folder") from None


def table(rows):
    """rows: [(label, per-layer scores)] -> a markdown table, one column per layer."""
    n = len(rows[0][1])
    lines = ["| | " + " | ".join(f"layer {i} R^2 / share" for i in range(n)) + " | mean R^2 |",
             "|---|" + "---:|" * (n + 1)]
    for label, layers in rows:
        cells = [f"{s['r2']:.2f} / {100 * s['share']:.0f}%" for s in layers]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {np.mean([s['r2'] for s in layers]):.2f} |")
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(prog="python probe.py",
                                 description="The attention-redundancy probe.")
    ap.add_argument("--out_dir",
                    help="a language-model run of train.py: probe each kept checkpoint")
    ap.add_argument("--gpt2", help="pretrained GPT-2 through transformers instead: gpt2, "
                                   "gpt2-medium, or a folder")
    ap.add_argument("--data_dir", default="data/openwebtext",
                    help="with --gpt2: a folder prepared with --encoding=gpt2")
    ap.add_argument("--data_len", type=int, default=1024, help="with --gpt2: tokens per window")
    ap.add_argument("--batches", type=int, default=8,
                    help="fitting batches (half as many held out)")
    ap.add_argument("--threshold", type=float, default=0.9,
                    help="cosine at which a token counts as predicted")
    a = ap.parse_args(argv)
    if a.batches < 1 or not 0 < a.threshold <= 1:
        raise ConfigError("--batches must be >= 1 and --threshold in (0, 1]")
    if bool(a.out_dir) == bool(a.gpt2):
        raise ConfigError("give one of --out_dir (our run) or --gpt2 (pretrained GPT-2)")
    if a.out_dir:
        rows = [(f"step {step}", layers)
                for step, layers in probe_run(a.out_dir, a.batches, a.threshold)]
    else:
        task = data.TokenFile(dir=a.data_dir, len=a.data_len)
        if task.meta["encoding"] != "gpt2":
            raise ConfigError(f"{a.data_dir} holds {task.meta['encoding']} tokens; GPT-2 reads "
                              "--encoding=gpt2 data")
        fit = token_batches(task, a.batches, 8, 0, "train")
        rows = [(a.gpt2, probe(gpt2_model(a.gpt2), fit,
                               token_batches(task, max(1, a.batches // 2), 8, 1, "val"),
                               a.threshold))]
    print(table(rows))
    return rows


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
