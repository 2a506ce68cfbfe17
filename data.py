"""
The datasets train.py trains on, one class each, all with the same small interface:

    data = SRCD(len=512)                     # a dataclass of the dataset's settings
    data.vocab_size, data.n_cont, data.n_pred     # what the model needs (CramConfig fields)
    batch = data.batch(16, rng, "cpu")       # keyword arguments of CRAM.forward
    out = model(**batch)
    data.metrics(out, batch)                 # its task scores: 0-dim tensors, no host sync
    data.describe()                          # one line for the log
    data.line(m), data.summary(m)            # its part of a log line and of summary.json, from
                                             # the host copies m of the metrics
    data.plot(rows, out, batch, path)        # a run's curves.png, from its metrics.jsonl rows

train.py exposes each setting as --<prefix><field> (--srcd_len=2048), and a resumed run must keep
all of them. DATASETS maps --dataset to the class.
"""
from dataclasses import dataclass, fields

import numpy as np
import torch

from cram import ConfigError, class_stats


@dataclass
class SRCD:
    """Sparse Retrieval in Continuous Dynamics, generated as DESIGN.md sec. 5 lays it out.

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
    shared_keys: bool = False # draw the pool at random from one key space shared with the novel keys,
                              # so a key id says nothing of recurrence (theory: Theorem 2)

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
                        (2 * self.n_query <= n, f"{p}query={self.query}: at most half the positions can be queries"),
                        (0 <= self.recurring <= 1, f"{p}recurring={self.recurring}: expected in [0, 1]"),
                        (self.n_recurring <= self.pool, f"{p}pool={self.pool}: fewer than the {self.n_recurring} recurring pairs per sequence"),
                        (self.n_novel <= self.novel_keys, f"{p}novel_keys={self.novel_keys}: fewer than the {self.n_novel} novel pairs per sequence"),
                        (self.values >= 2, f"{p}values={self.values}: expected >= 2"),
                        (self.pareto > 1, f"{p}pareto={self.pareto}: expected > 1 (a finite mean gap)"),
                        (self.gap > 0 and self.noise >= 0, f"{p}gap must be > 0 and {p}noise >= 0")]:
            if not ok:
                raise ConfigError(msg)
        self.key0 = 2                          # key ids, then value ids
        self.value0 = self.key0 + self.pool + self.novel_keys
        self.vocab_size = self.value0 + self.values
        rng = np.random.default_rng(self.pool_seed)
        self.pool_values = rng.integers(self.values, size=self.pool)
        keys = self.key0 + (rng.permutation(self.pool + self.novel_keys) if self.shared_keys
                            else np.arange(self.pool + self.novel_keys))
        self.pool_keys, self.novel_key_ids = keys[:self.pool], keys[self.pool:]  # (pool,), (novel_keys,)
        self.in_pool = np.isin(np.arange(self.vocab_size), self.pool_keys)     # (vocab,) bool
        self.in_pool_t = torch.from_numpy(self.in_pool)

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
        rk = rng.choice(self.pool, self.n_recurring, replace=False)
        keys[recurring], values[recurring] = self.pool_keys[rk], self.pool_values[rk]
        keys[~recurring] = self.novel_key_ids[rng.choice(self.novel_keys, self.n_novel, replace=False)]
        values[~recurring] = rng.integers(self.values, size=self.n_novel)
        tokens[pairs[:, 0]] = np.stack([keys, self.value0 + values], 1)
        tokens[pairs[:, 1], 0], tokens[pairs[:, 1], 1] = keys, self.QUERY
        targets[pairs[:, 1]] = self.value0 + values
        # the signal: Pareto gaps (x_m chosen so the mean gap is `gap`), three sinusoids
        gaps = (rng.pareto(self.pareto, n) + 1) * self.gap * (self.pareto - 1) / self.pareto
        tau = np.cumsum(gaps)
        amp, freq, phase = rng.uniform(0.5, 1, 3), rng.uniform(0.5, 3, 3), rng.uniform(0, 2 * np.pi, 3)
        y = (amp * np.sin(freq * tau[:, None] + phase)).sum(1) / np.sqrt(1.5)
        y = y + self.noise * rng.standard_normal(n)
        y_prev = np.concatenate([[0.0], y[:-1]])
        cont = np.stack([y_prev, np.log1p(gaps)], 1)
        return tokens, gaps, cont, targets, y[:, None]

    def batch(self, b, rng, device="cpu"):
        """b sequences -> CRAM.forward's keyword arguments: tokens (b, n, 2), dtau (b, n),
        cont (b, n, 2), targets (b, n), pred_targets (b, n, 1)."""
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
        """Retrieval accuracy over all queries and per class (acc, acc_recurring, acc_novel) and
        routing per class (cram.class_stats); the dynamics MSE is the loss term mse."""
        hit = (out["logits"].argmax(-1) == batch["targets"]).float()
        classes = self.classes(batch["tokens"])
        m = {"acc": (hit * (batch["targets"] >= 0)).sum() / (batch["targets"] >= 0).sum()}
        for name in ("recurring", "novel"):
            m[f"acc_{name}"] = (hit * classes[name]).sum() / classes[name].sum()
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
                f"other {100 * g('attn_other'):.2f}% | q rec {g('q_recurring'):.2f} nov {g('q_novel'):.2f}")

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
            ax0.plot(col("train", "step"), col("train", f"attn_{name}"), "-", color=color, label=f"attention, {name}")
            ax0.plot(col("eval", "step"), col("eval", f"attn_{name}"), "o", color=color)
            if name != "other":
                ax0.plot(col("train", "step"), col("train", f"q_{name}"), "--", color=color,
                         label=f"q_hat, {name} queries")
                ax1.plot(col("train", "step"), col("train", f"acc_{name}"), "-", color=color, label=f"{name} queries")
                ax1.plot(col("eval", "step"), col("eval", f"acc_{name}"), "o", color=color)
        ax0.set(xlabel="step", ylabel="share of the class on attention / mean q_hat", ylim=(-0.03, 1.03),
                title="routing per token class")
        ax0.legend(fontsize=7)
        ax1.set(xlabel="step", ylabel="retrieval accuracy", ylim=(-0.03, 1.03), title="retrieval per class")
        ax1.legend(fontsize=8)
        ax2 = fig.add_subplot(2, 1, 2)
        z = out["routing"]["z"][:, 0].argmax(-1).cpu().numpy()                    # (L, T) tier per token
        ax2.imshow(z, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#dddddd", "C3", "C2"]),
                   vmin=0, vmax=2)
        classes = self.classes(batch["tokens"][:1])
        for name, marker, color in (("recurring", "v", "C0"), ("novel", "v", "C3")):
            t = np.flatnonzero(classes[name][0].cpu().numpy())
            ax2.scatter(t, np.full(len(t), -0.7), marker=marker, color=color, s=18, label=f"{name} query",
                        clip_on=False)
        ax2.set(xlabel="token", ylabel="layer", yticks=range(len(z)), ylim=(len(z) - 0.5, -1.0),
                title="router decisions on one eval sequence: grey W (working memory only), red E (attention), "
                      "green S (semantic)")
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
    """Multi-query associative recall, generated as Zoology's _mqar does (DESIGN.md sec. 9).

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
        for ok, msg in [(self.len % 2 == 0 and self.len >= 4, f"{p}len={self.len}: expected an even int >= 4"),
                        (self.kv_pairs >= 1 and 4 * self.kv_pairs <= self.len,
                         f"{p}kv_pairs={self.kv_pairs}: expected 1 .. len/4 = {self.len // 4}"),
                        (self.vocab > self.len, f"{p}vocab={self.vocab}: expected more than len={self.len}"),
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
        pos = 2 * kv + 2 * rng.choice(self.space, kv, replace=False, p=self.gap_p)  # query positions
        tokens[pos], targets[pos] = keys, values
        if self.random_filler:
            filler = tokens == 0
            tokens[filler] = rng.integers(self.vocab, size=filler.sum())
        return tokens, targets

    def batch(self, b, rng, device="cpu"):
        """b examples -> CRAM.forward's keyword arguments: tokens (b, len), targets (b, len)."""
        tokens, targets = (np.stack(c) for c in zip(*(self.example(rng) for _ in range(b))))
        return {k: to_device(torch.from_numpy(v), device) for k, v in dict(tokens=tokens, targets=targets).items()}

    def metrics(self, out, batch):
        """Accuracy over the query positions (Zoology's), and routing for queries and other tokens."""
        query = batch["targets"] >= 0
        hit = (out["logits"].argmax(-1) == batch["targets"]) & query
        return {"acc": hit.sum() / query.sum(), **class_stats(out["routing"], dict(query=query, other=~query))}

    def describe(self):
        return (f"mqar: {self.len} tokens, {self.kv_pairs} key-value pairs, vocab {self.vocab} | attention "
                f"floor {100 * self.floor:.2f}% (every query)")

    def line(self, m):
        g = lambda k: m.get(k, float("nan"))
        return f"acc {g('acc'):.4f} | attn query {100 * g('attn_query'):.1f}% other {100 * g('attn_other'):.2f}%"

    def plot(self, rows, out, batch, path):
        """curves.png: accuracy and the attention share of queries and other tokens against step."""
        from matplotlib.figure import Figure
        col = lambda kind, k: column(rows, kind, k)
        fig = Figure(figsize=(11, 4))
        ax0, ax1 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for name, color in (("query", "C3"), ("other", "C7")):
            ax0.plot(col("train", "step"), col("train", f"attn_{name}"), "-", color=color, label=f"attention, {name}")
            ax0.plot(col("eval", "step"), col("eval", f"attn_{name}"), "o", color=color)
        ax1.plot(col("train", "step"), col("train", "acc"), "-", label="training batches")
        ax1.plot(col("eval", "step"), col("eval", "acc"), "o", label="eval set")
        ax0.set(xlabel="step", ylabel="share on attention", ylim=(-0.03, 1.03), title="routing")
        ax1.set(xlabel="step", ylabel="accuracy at query positions", ylim=(-0.03, 1.03), title="MQAR accuracy")
        ax0.legend(fontsize=8)
        ax1.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def summary(self, m):
        return dict(accuracy=m.get("acc"), attn_floor=self.floor, attn_query=m.get("attn_query"),
                    attn_other=m.get("attn_other"))


def column(rows, kind, key):
    """One metric over a run's metrics.jsonl rows of one kind ("train" or "eval"), NaN where absent."""
    return np.array([r.get(key, np.nan) for r in rows if r["kind"] == kind], float)


def to_device(x, device):
    """A CPU tensor onto device; to CUDA from pinned memory without waiting for the GPU (nanoGPT)."""
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


DATASETS = {"srcd": SRCD, "mqar": MQAR}


def settings():
    """Every dataset's settings as train.py's flags: {prefix + field: default}."""
    return {cls.prefix + f.name: f.default for cls in DATASETS.values() for f in fields(cls)}


def setting_keys(name):
    """The flags of dataset `name`: a resumed run must keep each of them."""
    cls = DATASETS[name]
    return tuple(cls.prefix + f.name for f in fields(cls))


def make(run):
    """The dataset run["dataset"] names, built from its flags in the run dict."""
    if run["dataset"] not in DATASETS:
        raise ConfigError(f"--dataset={run['dataset']}: expected one of {tuple(DATASETS)}")
    cls = DATASETS[run["dataset"]]
    return cls(**{f.name: run[cls.prefix + f.name] for f in fields(cls)})

