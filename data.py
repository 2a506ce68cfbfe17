"""
The datasets train.py trains on, one class each, all with the same small interface:

    data = SRCD(len=512)                     # a dataclass of the dataset's settings
    data.vocab_size, data.n_cont, data.n_pred     # what the model needs (CramConfig fields)
    batch = data.batch(16, rng, "cpu")       # keyword arguments of CRAM.forward; split="val" for
                                             # the eval set (only token files keep a held-out split)
    out = model(**batch)
    data.metrics(out, batch)                 # its task scores: 0-dim tensors, no host sync
    data.describe()                          # one line for the log
    data.line(m), data.summary(m)            # its part of a log line and of summary.json, from
                                             # the host copies m of the metrics
    data.plot(rows, out, batch, path)        # a run's curves.png, from its metrics.jsonl rows

train.py exposes each setting as --<prefix><field> (--srcd_len=2048); a resumed run keeps them
all from its checkpoint. DATASETS maps --dataset to the class.

Token files for language modelling are made once by the preparation command (nanoGPT's format):

    python data.py prepare --source=openwebtext              # -> data/openwebtext/{train,val}.bin
    python data.py prepare --source='books/*.txt' --out_dir=data/books --encoding=bytes
    python data.py prepare --source=pydoc --encoding=bytes   # a tiny corpus Python ships, offline
    python data.py prepare --source=stdlib --encoding=bytes  # CPython's Lib/*.py, 12 MB, offline
"""
import argparse
import glob
import importlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, fields

import numpy as np
import torch

from cram import ConfigError, attended, class_stats


@dataclass
class SRCD:
    """Sparse Retrieval in Continuous Dynamics (arXiv 2602.12204, the SRCD benchmark; the paper
    publishes its ratios, not its token layout, which is this project's).

    Every position observes a continuous signal (three random sinusoids plus noise) at a time
    that advances by a Pareto-distributed gap; the model predicts the observation from the past
    (dynamics MSE). Over this, pairs of events: a binding shows a key with its value, and later a
    query shows the key and asks for the value (retrieval accuracy). A pair is recurring with
    probability `recurring` (key from a fixed pool, always the same value) or novel (key id from a
    separate range with a value drawn fresh for this sequence, so only attention can answer it).
    With shared_keys the pool is a random subset of one key space and the novel keys are the rest,
    as theory/lower_bound.py's deployment bound assumes.
    Each position holds two token slots: (key, value) at a binding, (key, QUERY) at a query,
    (NONE, NONE) elsewhere. The token classes: recurring queries, novel queries, other tokens.
    """
    len: int = 512            # tokens per sequence; the paper's generator uses 2048
    query: float = 0.05       # share of positions that are queries
    recurring: float = 0.7    # share of bindings from the fixed pool shared by all sequences
    pool: int = 100           # recurring (key -> value) patterns
    novel_keys: int = 200     # key ids for novel bindings; their values are fresh in every sequence
    values: int = 64          # value ids
    pareto: float = 2.5       # tail index of the Pareto time gaps
    gap: float = 0.2          # mean time gap
    noise: float = 0.05       # observation noise of the continuous signal
    pool_seed: int = 0        # the recurring pool is part of the task: fixed unless changed here
    pool_new: int = 0         # give the first pool_new patterns other values (transfer to a pool
                              # that shares pool - pool_new bindings with the one trained on)
    shared_keys: bool = False # draw the pool at random from one key space shared with the novel
                              # keys, so a key id says nothing of recurrence (theory: Theorem 2)
    zipf: float = 0.0         # recurring patterns drawn with p_i ~ i^-zipf (theory/zipf.py); 0:
                              # uniform (Zipf draws with replacement, as the theory; uniform once
                              # per sequence)

    prefix = "srcd_"          # class attributes, not settings
    n_cont, n_pred = 2, 1     # continuous inputs (previous observation, log gap); the observation
    NONE, QUERY = 0, 1        # token ids: an empty slot, the query marker

    def __post_init__(self):
        n = self.len
        self.n_query = max(1, round(self.query * n))
        self.n_recurring = round(self.recurring * self.n_query)
        self.n_novel = self.n_query - self.n_recurring
        p = self.prefix
        for ok, msg in [(n >= 2, f"{p}len={n}: expected >= 2"),
                        (2 * self.n_query <= n,
                         f"{p}query={self.query}: at most half the positions can be queries"),
                        (0 <= self.recurring <= 1,
                         f"{p}recurring={self.recurring}: expected in [0, 1]"),
                        (self.n_recurring <= self.pool,
                         f"{p}pool={self.pool}: fewer than the {self.n_recurring} recurring pairs "
                         "per sequence"),
                        (self.n_novel <= self.novel_keys,
                         f"{p}novel_keys={self.novel_keys}: fewer than the {self.n_novel} novel "
                         "pairs per sequence"),
                        (self.values >= 2, f"{p}values={self.values}: expected >= 2"),
                        (self.pareto > 1,
                         f"{p}pareto={self.pareto}: expected > 1 (a finite mean gap)"),
                        (self.gap > 0 and self.noise >= 0, f"{p}gap must be > 0 and {p}noise >= 0"),
                        (self.zipf >= 0, f"{p}zipf={self.zipf}: expected >= 0 (0: a uniform pool)"),
                        (0 <= self.pool_new <= self.pool,
                         f"{p}pool_new={self.pool_new}: expected 0 .. pool")]:
            if not ok:
                raise ConfigError(msg)
        self.key0 = 2                          # key ids, then value ids
        self.value0 = self.key0 + self.pool + self.novel_keys
        self.vocab_size = self.value0 + self.values
        rng = np.random.default_rng(self.pool_seed)
        self.pool_values = rng.integers(self.values, size=self.pool)
        shift = np.random.default_rng([self.pool_seed, 1]).integers(1, self.values,
                                                                    size=self.pool_new)
        # never the old value
        self.pool_values[:self.pool_new] = (self.pool_values[:self.pool_new] + shift) % self.values
        keys = self.key0 + (rng.permutation(self.pool + self.novel_keys) if self.shared_keys
                            else np.arange(self.pool + self.novel_keys))
        # (pool,), (novel_keys,)
        self.pool_keys, self.novel_key_ids = keys[:self.pool], keys[self.pool:]
        self.in_pool = np.isin(np.arange(self.vocab_size), self.pool_keys)     # (vocab,) bool
        self.in_pool_t = torch.from_numpy(self.in_pool)
        weights = np.arange(1, self.pool + 1, dtype=float) ** -self.zipf
        self.pool_p = weights / weights.sum()   # (pool,) how often each pattern recurs

    @property
    def floor(self):
        """Attention floor: the share of tokens only attention can answer (novel queries)."""
        return self.n_novel / self.len

    def sequence(self, rng):
        """One sequence as numpy arrays: tokens (n, 2), time gaps (n,), cont (n, 2), targets (n,),
        the observations to predict (n, 1)."""
        n = self.len
        tokens = np.zeros((n, 2), np.int64)
        targets = np.full(n, -1, np.int64)
        pairs = np.sort(rng.choice(n, (self.n_query, 2), replace=False), axis=1)  # (bind, query)
        recurring = rng.permutation(self.n_query) < self.n_recurring
        keys = np.empty(self.n_query, np.int64)
        values = np.empty(self.n_query, np.int64)
        if self.zipf:
            rk = rng.choice(self.pool, self.n_recurring, p=self.pool_p)
        else:  # the stream every uniform-pool result was measured with
            rk = rng.choice(self.pool, self.n_recurring, replace=False)
        keys[recurring], values[recurring] = self.pool_keys[rk], self.pool_values[rk]
        keys[~recurring] = self.novel_key_ids[rng.choice(self.novel_keys, self.n_novel,
                                                         replace=False)]
        values[~recurring] = rng.integers(self.values, size=self.n_novel)
        tokens[pairs[:, 0]] = np.stack([keys, self.value0 + values], 1)
        tokens[pairs[:, 1], 0], tokens[pairs[:, 1], 1] = keys, self.QUERY
        targets[pairs[:, 1]] = self.value0 + values
        # the signal: Pareto gaps (x_m chosen so the mean gap is `gap`), three sinusoids
        gaps = (rng.pareto(self.pareto, n) + 1) * self.gap * (self.pareto - 1) / self.pareto
        tau = np.cumsum(gaps)
        amp, freq, phase = (rng.uniform(0.5, 1, 3), rng.uniform(0.5, 3, 3),
                            rng.uniform(0, 2 * np.pi, 3))
        y = (amp * np.sin(freq * tau[:, None] + phase)).sum(1) / np.sqrt(1.5)
        y = y + self.noise * rng.standard_normal(n)
        y_prev = np.concatenate([[0.0], y[:-1]])
        cont = np.stack([y_prev, np.log1p(gaps)], 1)
        return tokens, gaps, cont, targets, y[:, None]

    def batch(self, b, rng, device="cpu", split="train"):
        """b sequences -> CRAM.forward's keyword arguments: tokens (b, n, 2), dtau (b, n),
        cont (b, n, 2), targets (b, n), pred_targets (b, n, 1). One generator for every split:
        the eval set differs from training by its rng only."""
        cols = [np.stack(c) for c in zip(*(self.sequence(rng) for _ in range(b)))]
        names = ("tokens", "dtau", "cont", "targets", "pred_targets")
        out = {k: torch.from_numpy(c) for k, c in zip(names, cols)}
        for k in ("dtau", "cont", "pred_targets"):
            out[k] = out[k].float()
        return {k: to_device(v, device) for k, v in out.items()}

    def classes(self, tokens):
        """The token classes of a batch, read off its tokens (b, n, 2): {name: (b, n) bool}."""
        query = tokens[..., 1] == self.QUERY
        if self.in_pool_t.device != tokens.device:  # once per device, not a copy per call
            self.in_pool_t = self.in_pool_t.to(tokens.device)
        recurring = query & self.in_pool_t[tokens[..., 0]]
        return dict(recurring=recurring, novel=query & ~recurring, other=~query)

    def metrics(self, out, batch):
        """Retrieval accuracy over all queries and per class (acc, acc_recurring, acc_novel),
        routing per class (cram.class_stats), and open_recurring: the share of recurring queries
        not answered right without attention (on attention, or wrong): above attn_recurring by the
        queries the router has taken off attention too early. The dynamics MSE is the loss term
        mse."""
        hit = (out["logits"].argmax(-1) == batch["targets"]).float()
        classes = self.classes(batch["tokens"])
        m = {"acc": (hit * (batch["targets"] >= 0)).sum() / (batch["targets"] >= 0).sum()}
        for name in ("recurring", "novel"):
            m[f"acc_{name}"] = (hit * classes[name]).sum() / classes[name].sum()
        rec = classes["recurring"].float()
        consolidated = (1 - attended(out["routing"]["z"])) * hit  # answered right, attention unused
        m["open_recurring"] = 1 - (consolidated * rec).sum() / rec.sum()
        return {**m, **class_stats(out["routing"], classes)}

    def describe(self):
        return (f"srcd: {self.len} tokens, {self.n_query} queries ({self.n_recurring} recurring, "
                f"{self.n_novel} novel) | attention floor {100 * self.floor:.2f}% (queries "
                f"{100 * self.query:g}% x novel {100 * (1 - self.recurring):g}%)")

    def line(self, m):
        """Accuracy and attention per query class, and q_hat: the consolidation at a glance."""
        g = lambda k: m.get(k, float("nan"))
        return (f"acc {g('acc'):.4f} (rec {g('acc_recurring'):.4f} nov {g('acc_novel'):.4f}) | "
                f"attn rec {100 * g('attn_recurring'):.1f}% nov {100 * g('attn_novel'):.1f}% "
                f"other {100 * g('attn_other'):.2f}% | open rec {100 * g('open_recurring'):.1f}% | "
                f"q rec {g('q_recurring'):.2f} nov {g('q_novel'):.2f}")

    def plot(self, rows, out, batch, path):
        """curves.png of a run: attention share per class with q_hat per class, and retrieval per
        class, from metrics.jsonl's rows (lines: training batches at each log step; dots: the eval
        set), and the router's decisions for one eval sequence per token and layer (out: the
        model's output on batch), queries marked recurring or novel."""
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure  # no pyplot: nothing global, any backend
        col = lambda kind, k: column(rows, kind, k)
        fig = Figure(figsize=(12, 7.5))
        ax0, ax1 = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2)
        for name, color in (("recurring", "C0"), ("novel", "C3"), ("other", "C7")):
            ax0.plot(col("train", "step"), col("train", f"attn_{name}"), "-", color=color,
                     label=f"attention, {name}")
            ax0.plot(col("eval", "step"), col("eval", f"attn_{name}"), "o", color=color)
            if name != "other":
                ax0.plot(col("train", "step"), col("train", f"q_{name}"), "--", color=color,
                         label=f"q_hat, {name} queries")
                ax1.plot(col("train", "step"), col("train", f"acc_{name}"), "-", color=color,
                         label=f"{name} queries")
                ax1.plot(col("eval", "step"), col("eval", f"acc_{name}"), "o", color=color)
        ax0.set(xlabel="step", ylabel="share of the class on attention / mean q_hat",
                ylim=(-0.03, 1.03), title="routing per token class")
        ax0.legend(fontsize=7)
        ax1.set(xlabel="step", ylabel="retrieval accuracy", ylim=(-0.03, 1.03),
                title="retrieval per class")
        ax1.legend(fontsize=8)
        ax2 = fig.add_subplot(2, 1, 2)
        z = out["routing"]["z"][:, 0].argmax(-1).cpu().numpy()  # (L, T) tier per token
        ax2.imshow(z, aspect="auto", interpolation="nearest",
                   cmap=ListedColormap(["#dddddd", "C3", "C2"]), vmin=0, vmax=2)
        classes = self.classes(batch["tokens"][:1])
        for name, marker, color in (("recurring", "v", "C0"), ("novel", "v", "C3")):
            t = np.flatnonzero(classes[name][0].cpu().numpy())
            ax2.scatter(t, np.full(len(t), -0.7), marker=marker, color=color, s=18,
                        label=f"{name} query", clip_on=False)
        ax2.set(xlabel="token", ylabel="layer", yticks=range(len(z)), ylim=(len(z) - 0.5, -1.0),
                title="router decisions on one eval sequence: grey W (working memory only), "
                      "red E (attention), green S (semantic)")
        ax2.legend(fontsize=7, loc="upper right", ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def summary(self, m):
        return dict(retrieval_acc=m.get("acc"), acc_recurring=m.get("acc_recurring"),
                    acc_novel=m.get("acc_novel"), attn_floor=self.floor,
                    attn_recurring=m.get("attn_recurring"), attn_novel=m.get("attn_novel"),
                    attn_other=m.get("attn_other"), dynamics_mse=m.get("mse"))


@dataclass
class MQAR:
    """Multi-query associative recall, generated as Zoology's _mqar does (arXiv 2312.04927).

    Keys come from 1 .. vocab/2-1 and values from vocab/2 .. vocab-1, each example drawing kv_pairs
    distinct keys and distinct values paired one to one, laid out first as k1 v1 k2 v2 ... Each key
    is then queried exactly once after that block, at an even offset 2g with g drawn without
    replacement from p(g) ~ (g+1)^(a-1), so queries cluster soon after the block. Only query
    positions carry a label (the key's value); the filler between queries is 0, replaced by random
    tokens when random_filler (Zoology's default). Keys and values are redrawn for every example,
    so no binding can be consolidated: a query is answered from the context, by attention or by
    working memory, and the attention floor of CRAM's router is the query rate kv_pairs / len.
    Attention reaches back `window` tokens: keep window >= len.
    Where this differs from Zoology's harness: every batch is freshly drawn (an unbounded training
    set, not a fixed 100k iterated in order), and the eval set is train.py's fixed eval batches.
    """
    len: int = 64             # tokens per example (even)
    kv_pairs: int = 4         # key-value pairs, each queried once
    vocab: int = 8192         # token ids: 0 filler, keys below vocab/2, values from vocab/2
    power_a: float = 0.01     # query offsets g drawn with p(g) ~ (g+1)^(a-1); 1 is uniform
    random_filler: bool = True  # replace the filler 0s by random tokens, as Zoology does

    prefix = "mqar_"
    n_cont, n_pred = 0, 0

    def __post_init__(self):
        p = self.prefix
        for ok, msg in [(self.len % 2 == 0 and self.len >= 4,
                         f"{p}len={self.len}: expected an even int >= 4"),
                        (self.kv_pairs >= 1 and 4 * self.kv_pairs <= self.len,
                         f"{p}kv_pairs={self.kv_pairs}: expected 1 .. len/4 = {self.len // 4}"),
                        (self.vocab > self.len,
                         f"{p}vocab={self.vocab}: expected more than len={self.len}"),
                        (self.power_a > 0, f"{p}power_a={self.power_a}: expected > 0")]:
            if not ok:
                raise ConfigError(msg)
        self.vocab_size = self.vocab
        self.space = (self.len - 2 * self.kv_pairs) // 2          # query slots after the block
        g = np.arange(1, self.space + 1, dtype=float) ** (self.power_a - 1)
        self.gap_p = g / g.sum()

    @property
    def floor(self):
        return self.kv_pairs / self.len

    def example(self, rng):
        """One example: tokens (len,) and targets (len,), -1 where there is no label."""
        half, kv = self.vocab // 2, self.kv_pairs
        keys = rng.choice(np.arange(1, half), kv, replace=False)
        values = rng.choice(np.arange(half, self.vocab), kv, replace=False)
        tokens = np.zeros(self.len, np.int64)
        targets = np.full(self.len, -1, np.int64)
        tokens[0:2 * kv:2], tokens[1:2 * kv:2] = keys, values
        # query positions
        pos = 2 * kv + 2 * rng.choice(self.space, kv, replace=False, p=self.gap_p)
        tokens[pos], targets[pos] = keys, values
        if self.random_filler:
            filler = tokens == 0
            tokens[filler] = rng.integers(self.vocab, size=filler.sum())
        return tokens, targets

    def batch(self, b, rng, device="cpu", split="train"):
        """b examples -> CRAM.forward's keyword arguments: tokens (b, len), targets (b, len); every
        split from the one generator, as SRCD."""
        tokens, targets = (np.stack(c) for c in zip(*(self.example(rng) for _ in range(b))))
        return {k: to_device(torch.from_numpy(v), device)
                for k, v in dict(tokens=tokens, targets=targets).items()}

    def metrics(self, out, batch):
        """Accuracy over the query positions (Zoology's), and routing for queries and other
        tokens."""
        query = batch["targets"] >= 0
        hit = (out["logits"].argmax(-1) == batch["targets"]) & query
        return {"acc": hit.sum() / query.sum(),
                **class_stats(out["routing"], dict(query=query, other=~query))}

    def describe(self):
        return (f"mqar: {self.len} tokens, {self.kv_pairs} key-value pairs, vocab {self.vocab} | "
                f"attention floor {100 * self.floor:.2f}% (every query)")

    def line(self, m):
        g = lambda k: m.get(k, float("nan"))
        return (f"acc {g('acc'):.4f} | attn query {100 * g('attn_query'):.1f}% "
                f"other {100 * g('attn_other'):.2f}%")

    def plot(self, rows, out, batch, path):
        """curves.png: accuracy and the attention share of queries and other tokens against step."""
        col = lambda kind, k: column(rows, kind, k)
        fig, ax0, ax1 = two_panels()
        for name, color in (("query", "C3"), ("other", "C7")):
            ax0.plot(col("train", "step"), col("train", f"attn_{name}"), "-", color=color,
                     label=f"attention, {name}")
            ax0.plot(col("eval", "step"), col("eval", f"attn_{name}"), "o", color=color)
        ax1.plot(col("train", "step"), col("train", "acc"), "-", label="training batches")
        ax1.plot(col("eval", "step"), col("eval", "acc"), "o", label="eval set")
        ax0.set(xlabel="step", ylabel="share on attention", ylim=(-0.03, 1.03), title="routing")
        ax1.set(xlabel="step", ylabel="accuracy at query positions", ylim=(-0.03, 1.03),
                title="MQAR accuracy")
        save_panels(fig, path)

    def summary(self, m):
        return dict(accuracy=m.get("acc"), attn_floor=self.floor, attn_query=m.get("attn_query"),
                    attn_other=m.get("attn_other"))


@dataclass
class TokenFile:
    """Language modelling on token files made by `python data.py prepare` (nanoGPT's format):
    train.bin and val.bin, flat uint16 token ids with the end-of-text token between documents, and
    meta.json (the encoding, its vocabulary size, the token counts). A batch is b windows of len + 1
    tokens at random offsets of the split's file, read through a memmap (so the file never has to
    fit in memory); the targets are the inputs shifted by one. Every token is a target; routing is
    reported per layer (routing_stats' L<i>_episodic), since no token class here is known to need
    attention.
    """
    dir: str = "data/openwebtext"  # the prepared folder (train.bin, val.bin, meta.json)
    len: int = 256                 # context: tokens per training sequence (GPT-2: 1024)

    prefix = "data_"
    n_cont, n_pred = 0, 0

    def __post_init__(self):
        if self.len < 1:
            raise ConfigError(f"--{self.prefix}len={self.len}: expected a positive int "
                              "(tokens per sequence)")
        meta_path = os.path.join(self.dir, "meta.json")
        redo = f"prepare {self.dir} again with python data.py prepare"
        if not os.path.exists(meta_path):
            raise ConfigError(f"no prepared data in {self.dir} (meta.json is missing): make it "
                              "with python data.py prepare --source=openwebtext "
                              f"--out_dir={self.dir}, or --source='your/*.txt'")
        try:
            with open(meta_path) as fh:
                self.meta = json.load(fh)
            vocab = int(self.meta["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{meta_path} is unreadable ({type(e).__name__}): {redo}") from None
        # the embedding rounded up to a multiple of 64 (nanoGPT's 50304 for GPT-2's 50257): the
        # extra rows are never targets and make the output matmul's shapes faster on GPUs
        self.vocab_size = -(-vocab // 64) * 64
        for split in ("train", "val"):
            n = self.tokens(split).shape[0]
            if n < self.len + 1:
                raise ConfigError(f"{self.path(split)} holds {n} tokens, fewer than one sequence "
                                  f"of --{self.prefix}len={self.len} + 1: prepare more text or "
                                  f"lower --{self.prefix}len")

    def path(self, split):
        return os.path.join(self.dir, f"{split}.bin")

    def tokens(self, split):
        """The split's token ids as a read-only memmap, made afresh per call (nanoGPT: a memmap
        kept open grows the process's memory as pages are read)."""
        path = self.path(split)
        if not os.path.exists(path):
            raise ConfigError(f"{path} is missing: prepare {self.dir} again with "
                              "python data.py prepare")
        size = os.path.getsize(path)
        if size % 2:
            raise ConfigError(f"{path} has an odd size ({size} bytes), not uint16 ids: it is "
                              f"torn; prepare {self.dir} again with python data.py prepare")
        if size == 0:  # np.memmap cannot map an empty file
            return np.zeros(0, np.uint16)
        return np.memmap(path, dtype=np.uint16, mode="r")

    def batch(self, b, rng, device="cpu", split="train"):
        """b windows of the split -> CRAM.forward's keyword arguments: tokens (b, len), targets
        (b, len)."""
        ids = self.tokens(split)
        start = rng.integers(len(ids) - self.len, size=b)
        chunks = np.stack([ids[i:i + self.len + 1] for i in start]).astype(np.int64)
        if chunks.max() >= self.meta["vocab_size"]:  # on the host, before anything indexes with it
            raise ConfigError(f"{self.path(split)} holds token id {chunks.max()}, but meta.json's "
                              f"vocab_size is {self.meta['vocab_size']}: prepare {self.dir} again")
        return {k: to_device(torch.from_numpy(v), device)
                for k, v in dict(tokens=chunks[:, :-1], targets=chunks[:, 1:]).items()}

    def metrics(self, out, batch):
        """Next-token accuracy; the loss is train.py's ce (the validation loss on the eval set)."""
        return {"acc": (out["logits"].argmax(-1) == batch["targets"]).float().mean()}

    def describe(self):
        m = self.meta
        return (f"tokens: {self.dir} ({m['encoding']}, vocab {m['vocab_size']} as "
                f"{self.vocab_size}), {m['train_tokens']:,} train and {m['val_tokens']:,} val "
                f"tokens, context {self.len}")

    @staticmethod
    def layers(m):
        """The layers named in routing_stats' keys (L0_episodic: layer 0's share on attention)."""
        return sorted((k.split("_")[0] for k in m if k.startswith("L") and k.endswith("_episodic")),
                      key=lambda layer: int(layer[1:]))

    def line(self, m):
        attn = " ".join(f"{layer} {100 * m[layer + '_episodic']:.1f}%" for layer in self.layers(m))
        return f"acc {m.get('acc', float('nan')):.4f} | attn per layer {attn}"

    def plot(self, rows, out, batch, path):
        """curves.png: training and validation loss, and the attention share per layer, against
        step."""
        col = lambda kind, k: column(rows, kind, k)
        fig, ax0, ax1 = two_panels()
        ax0.plot(col("train", "step"), col("train", "ce"), "-", label="train (one batch)")
        ax0.plot(col("eval", "step"), col("eval", "ce"), "o-", label="val")
        for i, layer in enumerate(self.layers(rows[-1])):
            ax1.plot(col("train", "step"), col("train", layer + "_episodic"), "-", color=f"C{i}",
                     label=f"layer {layer[1:]}")
            ax1.plot(col("eval", "step"), col("eval", layer + "_episodic"), "o", color=f"C{i}")
        ax0.set(xlabel="step", ylabel="cross-entropy (nats per token)",
                title="language modelling loss")
        ax1.set(xlabel="step", ylabel="share of tokens on attention", ylim=(-0.03, 1.03),
                title="routing per layer")
        save_panels(fig, path)

    def summary(self, m):
        return dict(val_loss=m.get("ce"), val_acc=m.get("acc"),
                    attn_per_layer={layer: m[layer + "_episodic"] for layer in self.layers(m)})


# ---- preparing token files ----------------------------------------------------------------------

def byte_encoding():
    """A tokenizer that needs nothing downloaded: one token per UTF-8 byte, end-of-text 256; a
    tiktoken Encoding (GPT-2's pre-tokenizer pattern, no merges). For character-level corpora and
    the tests; GPT-2's BPE ("gpt2") is the default."""
    tiktoken = need("tiktoken")
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="bytes", pat_str=pattern,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def need(module):
    """An installed module by name, or one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed: pip install -r requirements.txt") from None


def get_encoding(name):
    """A tiktoken Encoding by name: "bytes", or one tiktoken knows ("gpt2"), whose tables tiktoken
    downloads on first use and keeps in TIKTOKEN_CACHE_DIR."""
    if name == "bytes":
        return byte_encoding()
    tiktoken = need("tiktoken")
    if name not in tiktoken.list_encoding_names():
        raise ConfigError(f"--encoding={name}: expected bytes or one of tiktoken's "
                          f"{tiktoken.list_encoding_names()}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ConfigError(f"the {name} tokenizer tables could not be loaded ({type(e).__name__}): "
                          "tiktoken downloads them once; run once with internet, or set "
                          "TIKTOKEN_CACHE_DIR to a folder that holds them") from None


def stdlib_files():
    """CPython's own standard library source, which every Python ships: Lib/**/*.py without the
    test suites (test/, tests/, idle_test/, test_*.py) and without installed packages."""
    lib = sysconfig.get_paths()["stdlib"]
    skip = re.compile(r"(^|/)(test|tests|idle_test|site-packages|dist-packages)(/|$)"
                      r"|(^|/)test_[^/]*\.py$")
    return sorted(p for p in glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)
                  if not skip.search(os.path.relpath(p, lib)))


def read_documents(source):
    """source -> (iterable of document strings, their number, the default val split, a list that
    collects, as they are read, the files that are not UTF-8 text). "openwebtext" reads OpenWebText
    through the datasets library (a download of some 40 GB, cached): its parquet export, since
    datasets 4 no longer runs the original loading script (`load_dataset("openwebtext")` fails).
    "pydoc" is a small real corpus every Python ships: pydoc's 79 help topics (English about Python,
    0.46 MB). "stdlib" is the interpreter's standard library source (stdlib_files, about 12 MB of
    Python). Anything else is a glob of text files, one document each."""
    if source == "openwebtext":
        try:
            from datasets import load_dataset
        except ImportError:
            raise ConfigError("--source=openwebtext needs the datasets library: "
                              "pip install datasets==5.2.0") from None
        ds = load_dataset("Skylion007/openwebtext", revision="refs/convert/parquet", split="train")
        return (row["text"] for row in ds), len(ds), 0.0005, []
    if source == "pydoc":
        from pydoc_data.topics import topics
        return list(topics.values()), len(topics), 0.1, []
    paths = stdlib_files() if source == "stdlib" else sorted(
        p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ConfigError(f"--source={source}: no file matches; give openwebtext, pydoc, stdlib "
                          "or a glob of text files ('texts/*.txt')")

    not_text = []

    def read(path):  # a bad byte becomes U+FFFD, and the file is noted so that prepare says so
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if "\ufffd" in text:
            not_text.append(path)
        return text
    return map(read, paths), len(paths), 0.1, not_text


def prepare(source, out_dir, encoding="gpt2", val_fraction=None, seed=2357):
    """Tokenize the documents of `source` into out_dir/train.bin and val.bin (uint16 ids, the
    end-of-text token after every document) and meta.json; returns the meta dict. Documents are
    encoded in batches and appended as they come, so OpenWebText never sits in memory. The
    validation split: a share val_fraction of the documents drawn with `seed` (OpenWebText's
    default 0.0005, nanoGPT's); with local files, whose documents are few, the last val_fraction
    of the tokens (default 0.1), as nanoGPT's Shakespeare. Files appear only when complete."""
    enc = get_encoding(encoding)
    if enc.n_vocab > 2 ** 16:
        raise ConfigError(f"--encoding={encoding}: {enc.n_vocab} tokens do not fit in uint16")
    docs, n_docs, default_val, not_text = read_documents(source)
    val_fraction = default_val if val_fraction is None else val_fraction
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val_fraction={val_fraction}: expected in (0, 1)")
    by_document = source == "openwebtext"
    tmp = {split: os.path.join(out_dir, f"{split}.bin.tmp") for split in ("train", "val")}
    try:
        os.makedirs(out_dir, exist_ok=True)
        counts = write_tokens(docs, n_docs, enc, tmp, val_fraction if by_document else 0.0, seed,
                              source)
        if not_text:
            print(f"note: {len(not_text)} of {n_docs} files are not UTF-8 text ({not_text[0]}, "
                  "...): each bad byte was read as U+FFFD", file=sys.stderr)
        if not by_document:  # move the last val_fraction of the tokens into val
            ids = np.fromfile(tmp["train"], np.uint16)
            cut = len(ids) - max(1, int(val_fraction * len(ids)))
            ids[:cut].tofile(tmp["train"])
            ids[cut:].tofile(tmp["val"])
            counts = dict(train=cut, val=len(ids) - cut)
        if min(counts.values()) < 2:
            raise ConfigError(f"--source={source} gave {counts['train']} train and "
                              f"{counts['val']} val tokens: too little text to train on")
        for split, path in tmp.items():
            os.replace(path, os.path.join(out_dir, f"{split}.bin"))
        meta = dict(source=source, encoding=encoding, vocab_size=enc.n_vocab, eot=enc.eot_token,
                    dtype="uint16", documents=n_docs, train_tokens=counts["train"],
                    val_tokens=counts["val"])
        with open(os.path.join(out_dir, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
    except OSError as e:
        raise ConfigError(f"--out_dir={out_dir}: cannot write there ({e.strerror}): "
                          "choose a writable folder") from None
    finally:  # an interrupted preparation leaves no half-written files behind
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return meta


def write_tokens(docs, n_docs, enc, paths, val_share, seed, source):
    """Encode docs in batches of 1024 (tiktoken's threads) and append each, closed by end-of-text,
    to paths["val"] with probability val_share (drawn with seed), else to paths["train"];
    a progress bar over documents -> the token count of each file."""
    tqdm = need("tqdm").tqdm
    rng = np.random.default_rng(seed)
    counts = dict(train=0, val=0)
    with open(paths["train"], "wb") as train, open(paths["val"], "wb") as val, \
            tqdm(total=n_docs, unit="doc", desc=f"tokenizing {source}") as bar:
        def encode(batch):
            for ids in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1):
                split = "val" if rng.random() < val_share else "train"
                (val if split == "val" else train).write(
                    np.asarray(ids + [enc.eot_token], np.uint16).tobytes())
                counts[split] += len(ids) + 1
            bar.update(len(batch))
            batch.clear()

        batch = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == 1024:
                encode(batch)
        encode(batch)
    return counts


def two_panels():
    """A figure of two side-by-side plots, made without pyplot (nothing global, any backend)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4))
    return fig, fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)


def save_panels(fig, path):
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def column(rows, kind, key):
    """One metric over a run's metrics.jsonl rows of one kind ("train" or "eval"), NaN where
    absent."""
    return np.array([r.get(key, np.nan) for r in rows if r["kind"] == kind], float)


def to_device(x, device):
    """A CPU tensor onto device; to CUDA from pinned memory without waiting for the GPU
    (nanoGPT)."""
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# tokens: any folder data.py prepare wrote
DATASETS = {"srcd": SRCD, "mqar": MQAR, "tokens": TokenFile}


def settings():
    """Every dataset's settings as train.py's flags: {prefix + field: default}."""
    return {cls.prefix + f.name: f.default for cls in DATASETS.values() for f in fields(cls)}


def setting_keys(name):
    """The flags of dataset `name` (a run of another dataset ignores them)."""
    cls = DATASETS[name]
    return tuple(cls.prefix + f.name for f in fields(cls))


def make(run):
    """The dataset run["dataset"] names, built from its flags in the run dict."""
    if run["dataset"] not in DATASETS:
        raise ConfigError(f"--dataset={run['dataset']}: expected one of {tuple(DATASETS)}")
    cls = DATASETS[run["dataset"]]
    return cls(**{f.name: run[cls.prefix + f.name] for f in fields(cls)})



def main(argv):
    ap = argparse.ArgumentParser(prog="python data.py prepare",
                                 description=prepare.__doc__.split(";")[0])
    ap.add_argument("command", choices=["prepare"])
    ap.add_argument("--source", required=True,
                    help="openwebtext, pydoc, stdlib (this Python's Lib/*.py without tests), "
                         "or a glob of text files ('texts/*.txt')")
    ap.add_argument("--out_dir", help="where train.bin, val.bin, meta.json go (default "
                                      "data/openwebtext, data/pydoc, or data/text for files)")
    ap.add_argument("--encoding", default="gpt2",
                    help="gpt2 (GPT-2's BPE, tiktoken) or bytes (one token per byte)")
    ap.add_argument("--val_fraction", type=float, help="validation share (default: 0.0005 of "
                                                       "OpenWebText's documents, 0.1 of local "
                                                       "text's tokens)")
    a = ap.parse_args(argv)
    out_dir = a.out_dir or os.path.join(
        "data", a.source if a.source in ("openwebtext", "pydoc", "stdlib") else "text")
    meta = prepare(a.source, out_dir, a.encoding, a.val_fraction)
    print(f"{out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens from "
          f"{meta['documents']:,} documents; train with python train.py --dataset=tokens "
          f"--data_dir={out_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
