"""
Train CRAM. One script for every dataset; every global below can be overridden on the command line:

    python train.py --dataset srcd                          # CPU-sized default, a few minutes
    python train.py --dataset srcd --n_embd=128 --device=cuda --max_iters=5000
    python train.py --out_dir=out/srcd --resume=True        # continue a run from its checkpoint

Model settings are CramConfig's fields (cram.py), given the same way (--w_compute=0.2). Each run
writes into out_dir: log.txt (the printed lines), metrics.jsonl (one JSON object per log or eval
line), ckpt.pt (atomic; everything needed to resume exactly) and, at the end, summary.json.
"""
import ast
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch

from cram import CRAM, ConfigError, CramConfig, router_tau

# ---- run ----------------------------------------------------------------------------------
dataset = "srcd"
out_dir = "out/srcd"
device = "auto"          # auto picks cuda, then mps, then cpu
threads = 0              # CPU threads for torch; 0 keeps torch's default
seed = 1337
resume = False           # continue from out_dir/ckpt.pt
overwrite = False        # allow a fresh run to replace the checkpoint already in out_dir
max_iters = 1500
stop_iter = -1           # stop early (with a checkpoint) at this step, to split a run; -1: never
batch_size = 16
learning_rate = 3e-3
min_lr = 3e-4            # cosine decay from learning_rate to min_lr after a linear warm-up
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0
log_interval = 50
eval_interval = 250
eval_batches = 4         # eval sequences = eval_batches * batch_size, the same every eval
ckpt_interval = 500
attn_warmup = 0          # steps with attention forced on every token before the router is free;
                         # the default router needs none (cram.py: attn_prior, penalty_q); kept for
                         # the flat penalty (--penalty_q=False), run with 500 in DESIGN.md sec. 5
# ---- SRCD (DESIGN.md sec. 5); the paper's generator uses srcd_len = 2048 ------------------
srcd_len = 512
srcd_query = 0.05        # share of positions that are queries
srcd_recurring = 0.7     # share of bindings from the fixed pool shared by all sequences
srcd_pool = 100          # recurring (key -> value) patterns
srcd_novel_keys = 200    # key ids for novel bindings; their values are fresh in every sequence
srcd_values = 64
srcd_pareto = 2.5        # tail index of the Pareto time gaps
srcd_gap = 0.2           # mean time gap
srcd_noise = 0.05        # observation noise of the continuous signal
srcd_pool_seed = 0       # the recurring pool is part of the task: fixed unless changed here
# -------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
MODEL_KEYS = {f.name: f.type for f in fields(CramConfig)}


def parse_args(argv):
    """--key=value or --key value -> (run dict, model overrides dict). Values are Python
    literals (ast.literal_eval) or bare strings; each is checked against its default's type."""
    run, model, i = dict(DEFAULTS), {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: give settings as --key=value")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            text, i = argv[i + 1], i + 1
        i += 1
        if key in DEFAULTS:
            want = type(DEFAULTS[key])
        elif key in MODEL_KEYS and key not in ("vocab_size", "n_cont", "n_pred"):
            want = MODEL_KEYS[key]
        else:
            raise ConfigError(f"unknown setting --{key}: see the globals of train.py or the fields of CramConfig")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"--{key}={text}: expected {want.__name__}, got {type(value).__name__}")
        (run if key in DEFAULTS else model)[key] = value
    for key in ("max_iters", "batch_size", "log_interval", "eval_interval", "eval_batches", "ckpt_interval"):
        if run[key] < 1:
            raise ConfigError(f"--{key}={run[key]}: expected a positive int")
    if run["stop_iter"] == 0 or run["stop_iter"] < -1:
        raise ConfigError(f"--stop_iter={run['stop_iter']}: expected -1 (never) or a positive step")
    return run, model


# ---- SRCD -----------------------------------------------------------------------------------

class SRCD:
    """Sparse Retrieval in Continuous Dynamics, generated as DESIGN.md sec. 5 lays it out.

    Every position observes a continuous signal (three random sinusoids plus noise) at a time
    that advances by a Pareto-distributed gap; the model predicts the observation from the past
    (dynamics MSE). Over this, pairs of events: a binding shows a key with its value, and later a
    query shows the key and asks for the value (retrieval accuracy). A pair is recurring with
    probability srcd_recurring (key from a fixed pool, always the same value) or novel (key id
    from a separate range with a value drawn fresh for this sequence, so only attention can
    answer it). Each position holds two token slots: (key, value) at a binding, (key, QUERY) at a
    query, (NONE, NONE) elsewhere. Token class: 0 other, 1 recurring query, 2 novel query.
    """
    NONE, QUERY = 0, 1

    def __init__(self, n, query, recurring, pool, novel_keys, values, pareto, gap, noise, pool_seed):
        self.n, self.pareto, self.gap, self.noise = n, pareto, gap, noise
        self.n_query = max(1, round(query * n))
        self.n_recurring = round(recurring * self.n_query)
        self.n_novel = self.n_query - self.n_recurring
        for ok, msg in [(n >= 2, f"srcd_len={n}: expected >= 2"),
                        (2 * self.n_query <= n, f"srcd_query={query}: at most half the positions can be queries"),
                        (self.n_recurring <= pool, f"srcd_pool={pool}: fewer than the {self.n_recurring} recurring pairs per sequence"),
                        (self.n_novel <= novel_keys, f"srcd_novel_keys={novel_keys}: fewer than the {self.n_novel} novel pairs per sequence"),
                        (values >= 2, f"srcd_values={values}: expected >= 2"),
                        (pareto > 1, f"srcd_pareto={pareto}: expected > 1 (a finite mean gap)"),
                        (gap > 0 and noise >= 0, "srcd_gap must be > 0 and srcd_noise >= 0")]:
            if not ok:
                raise ConfigError(msg)
        self.key0 = 2                          # recurring keys, then novel keys, then values
        self.novel0 = self.key0 + pool
        self.value0 = self.novel0 + novel_keys
        self.n_values = values
        self.vocab_size = self.value0 + values
        self.pool, self.novel_keys = pool, novel_keys
        self.pool_values = np.random.default_rng(pool_seed).integers(values, size=pool)

    @property
    def floor(self):
        """Attention floor: the share of tokens only attention can answer (novel queries)."""
        return self.n_novel / self.n

    def sequence(self, rng):
        n = self.n
        tokens = np.zeros((n, 2), np.int64)
        targets = np.full(n, -1, np.int64)
        cls = np.zeros(n, np.int64)
        pairs = np.sort(rng.choice(n, (self.n_query, 2), replace=False), axis=1)  # (bind, query)
        recurring = rng.permutation(self.n_query) < self.n_recurring
        keys = np.empty(self.n_query, np.int64)
        values = np.empty(self.n_query, np.int64)
        rk = rng.choice(self.pool, self.n_recurring, replace=False)
        keys[recurring], values[recurring] = self.key0 + rk, self.pool_values[rk]
        keys[~recurring] = self.novel0 + rng.choice(self.novel_keys, self.n_novel, replace=False)
        values[~recurring] = rng.integers(self.n_values, size=self.n_novel)
        tokens[pairs[:, 0]] = np.stack([keys, self.value0 + values], 1)
        tokens[pairs[:, 1], 0], tokens[pairs[:, 1], 1] = keys, self.QUERY
        targets[pairs[:, 1]] = self.value0 + values
        cls[pairs[:, 1]] = np.where(recurring, 1, 2)
        # the signal: Pareto gaps (x_m chosen so the mean gap is srcd_gap), three sinusoids
        gaps = (rng.pareto(self.pareto, n) + 1) * self.gap * (self.pareto - 1) / self.pareto
        tau = np.cumsum(gaps)
        amp, freq, phase = rng.uniform(0.5, 1, 3), rng.uniform(0.5, 3, 3), rng.uniform(0, 2 * np.pi, 3)
        y = (amp * np.sin(freq * tau[:, None] + phase)).sum(1) / np.sqrt(1.5)
        y = y + self.noise * rng.standard_normal(n)
        y_prev = np.concatenate([[0.0], y[:-1]])
        cont = np.stack([y_prev, np.log1p(gaps)], 1)
        return tokens, gaps, cont, targets, y[:, None], cls

    def batch(self, b, rng, device="cpu"):
        """b sequences -> a dict of tensors for CRAM.forward: tokens (b, n, 2), dt (b, n),
        cont (b, n, 2), targets (b, n), pred_targets (b, n, 1), token_class (b, n)."""
        cols = [np.stack(c) for c in zip(*(self.sequence(rng) for _ in range(b)))]
        names = ("tokens", "dt", "cont", "targets", "pred_targets", "token_class")
        out = {k: torch.from_numpy(c) for k, c in zip(names, cols)}
        for k in ("dt", "cont", "pred_targets"):
            out[k] = out[k].float()
        return {k: v.to(device) for k, v in out.items()}


def make_dataset(c):
    if c.dataset == "srcd":
        return SRCD(c.srcd_len, c.srcd_query, c.srcd_recurring, c.srcd_pool, c.srcd_novel_keys,
                    c.srcd_values, c.srcd_pareto, c.srcd_gap, c.srcd_noise, c.srcd_pool_seed)
    raise ConfigError(f"--dataset={c.dataset}: expected one of ('srcd',)")


# ---- training -------------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ConfigError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available here; use --device=cpu")
    return name


def get_lr(c, it):
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / c.warmup_iters
    frac = (it - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (c.learning_rate - c.min_lr)


def make_optimizer(model, c):
    """AdamW; weight decay on matrices only (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(0.9, 0.95))


def accuracy(logits, targets, cls):
    """Retrieval accuracy on all query positions and per class (recurring, novel)."""
    hit = logits.argmax(-1) == targets
    q = targets >= 0
    acc = dict(acc=hit[q].float().mean().item() if q.any() else float("nan"))
    for c, name in ((1, "recurring"), (2, "novel")):
        m = cls == c
        if m.any():
            acc[f"acc_{name}"] = hit[m].float().mean().item()
    return acc


@torch.no_grad()
def evaluate(model, batches, router_mode=None):
    """Mean of loss terms, accuracy and routing statistics over the fixed eval batches."""
    model.eval()
    rows = []
    for batch in batches:
        out = model(**batch, router_mode=router_mode)
        rows.append({**out["terms"], **accuracy(out["logits"], batch["targets"], batch["token_class"]),
                     **out["stats"]})
    model.train()
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]}


def log_line(step, m, ms, tok_s):
    """One grep-able line: step, losses, accuracy, attention and semantic shares, speed."""
    pct = lambda k: f"{100 * m[k]:.1f}%" if k in m else "-"
    return (f"step {step} | loss {m['loss']:.3f} | ce {m['ce']:.3f} | mse {m['mse']:.3f} | "
            f"consol {m['consol']:.4f} | acc {m['acc']:.3f} (rec {m.get('acc_recurring', float('nan')):.3f} "
            f"nov {m.get('acc_novel', float('nan')):.3f}) | attn {pct('attn_frac')} (rec {pct('attn_recurring')} "
            f"nov {pct('attn_novel')} other {pct('attn_other')}) | sem {pct('sem_frac')} | "
            f"q rec {m.get('q_recurring', float('nan')):.2f} nov {m.get('q_novel', float('nan')):.2f} | "
            f"{ms:.0f} ms | {tok_s / 1000:.1f}k tok/s")


def eval_line(step, m, peak):
    """The consolidation at a glance: accuracy and attention use per query class, and q_hat."""
    g = lambda k: m.get(k, float("nan"))
    return (f"eval {step} | acc {m['acc']:.4f} (rec {g('acc_recurring'):.4f} nov {g('acc_novel'):.4f}) | "
            f"attn {100 * m['attn_frac']:.2f}% (rec {100 * g('attn_recurring'):.1f}% nov {100 * g('attn_novel'):.1f}% "
            f"other {100 * g('attn_other'):.2f}%; peak {100 * peak:.1f}%) | "
            f"q rec {g('q_recurring'):.2f} nov {g('q_novel'):.2f} | dyn mse {m['mse']:.4f}")


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: run without --resume to start a new run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not {"model", "optimizer", "model_args", "step", "rng", "run"} <= set(ckpt):
            raise KeyError("missing entries")
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}): delete it or choose another --out_dir")
    return ckpt


def main(argv):
    run, model_over = parse_args(argv)
    c = type("Run", (), run)  # attribute access to the run settings
    dev = pick_device(c.device)
    if c.threads > 0:
        torch.set_num_threads(c.threads)
    if dev.startswith("cuda"):  # as nanoGPT: fp32 matmuls, and kernel.py's tiles, on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        os.makedirs(c.out_dir, exist_ok=True)
        open(os.path.join(c.out_dir, "log.txt"), "a").close()
    except OSError as e:
        raise ConfigError(f"--out_dir={c.out_dir} is not a writable folder ({e.strerror})")
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    metrics_path = os.path.join(c.out_dir, "metrics.jsonl")
    ckpt = None
    if c.resume:
        ckpt = load_checkpoint(ckpt_path)
        for k, v in model_over.items():
            if ckpt["model_args"].get(k) != v and k != "use_kernel":  # same math, either way
                raise ConfigError(f"--{k}={v} differs from the checkpoint's {ckpt['model_args'].get(k)!r}: a resumed run keeps its model")
        for k in ("dataset",) + tuple(k for k in run if k.startswith("srcd_")):
            if ckpt["run"][k] != run[k]:
                raise ConfigError(f"--{k}={run[k]!r} differs from the checkpoint's {ckpt['run'][k]!r}: a resumed run keeps its data")
    elif os.path.exists(ckpt_path) and not c.overwrite:
        raise ConfigError(f"{ckpt_path} exists: pass --resume=True to continue it, --overwrite=True to replace it, or another --out_dir")

    data = make_dataset(c)
    mcfg = CramConfig(**({**ckpt["model_args"], **model_over} if ckpt else
                         {**model_over, "vocab_size": data.vocab_size, "n_cont": 2, "n_pred": 1}))
    torch.manual_seed(c.seed)
    model = CRAM(mcfg).to(dev)
    opt = make_optimizer(model, c)
    rng = np.random.default_rng(c.seed)
    eval_set = [data.batch(c.batch_size, np.random.default_rng([c.seed, 1, i]), dev) for i in range(c.eval_batches)]
    step, peak, wall = 0, 0.0, 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, peak, wall = ckpt["step"], ckpt["attn_frac_peak"], ckpt["wall_seconds"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and dev.startswith("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        if os.path.exists(metrics_path):  # drop what the interrupted run wrote after its checkpoint
            with open(metrics_path) as f:
                rows = [json.loads(l) for l in f]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows
                             if r["step"] < step or (r["kind"] == "train" and r["step"] == step))
    else:
        for name in ("metrics.jsonl", "log.txt"):
            if os.path.exists(os.path.join(c.out_dir, name)):
                os.remove(os.path.join(c.out_dir, name))

    def say(line, record=None):
        print(line, flush=True)
        with open(os.path.join(c.out_dir, "log.txt"), "a") as f:
            f.write(line + "\n")
        if record is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    say(f"{'resuming at step ' + str(step) if ckpt else 'new run'} | device {dev} | "
        f"{model.num_params() / 1e3:.1f}k params | model {asdict(mcfg)}")
    say(f"srcd: {data.n} tokens, {data.n_query} queries ({data.n_recurring} recurring, {data.n_novel} novel) "
        f"| attention floor {100 * data.floor:.2f}% (queries {100 * c.srcd_query:g}% x novel {100 * (1 - c.srcd_recurring):g}%)")

    def checkpoint(at):
        save_checkpoint(ckpt_path, dict(
            model=model.state_dict(), optimizer=opt.state_dict(), model_args=asdict(mcfg), run=run,
            step=at, attn_frac_peak=peak, wall_seconds=wall + time.time() - t_start,
            rng=dict(torch=torch.get_rng_state(), numpy=rng.bit_generator.state,
                     cuda=torch.cuda.get_rng_state_all() if dev.startswith("cuda") else None)))

    t_start, t_last, acc_ms = time.time(), time.time(), []
    last = min(c.max_iters, c.stop_iter) if c.stop_iter >= 0 else c.max_iters
    while step < last:
        warm = step < c.attn_warmup and mcfg.router_mode in ("learned", "static")
        if step % c.eval_interval == 0:
            m = evaluate(model, eval_set, "always" if warm else None)
            if not warm:  # the peak counts only steps where the router was free
                peak = max(peak, m["attn_frac"])
            say(eval_line(step, m, peak), dict(kind="eval", step=step, **m))
        for group in opt.param_groups:
            group["lr"] = get_lr(c, step)
        batch = data.batch(c.batch_size, rng, dev)
        tau = router_tau(mcfg, (step - c.attn_warmup) / max(1, c.max_iters - c.attn_warmup))
        out = model(**batch, tau=tau, router_mode="always" if warm else None)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        step += 1
        acc_ms.append(1000 * (time.time() - t_last))
        t_last = time.time()
        if step % c.log_interval == 0 or step == c.max_iters:
            m = dict(loss=out["loss"].item(), **out["terms"], **out["stats"],
                     **accuracy(out["logits"], batch["targets"], batch["token_class"]))
            ms = float(np.median(acc_ms))
            tok_s = c.batch_size * data.n / (ms / 1000)
            say(log_line(step, m, ms, tok_s), dict(kind="train", step=step, ms=ms, tok_s=tok_s, lr=get_lr(c, step - 1), **m))
            acc_ms = []
        if step % c.ckpt_interval == 0 or step == last:
            checkpoint(step)
    if step < c.max_iters:
        say(f"stopped at step {step} (stop_iter); continue with --resume=True")
        return None

    m = evaluate(model, eval_set)
    if c.max_iters > c.attn_warmup:
        peak = max(peak, m["attn_frac"])
    summary = dict(retrieval_acc=m["acc"], acc_recurring=m.get("acc_recurring"), acc_novel=m.get("acc_novel"),
                   attn_frac=m["attn_frac"], attn_frac_peak=peak, attn_floor=data.floor,
                   attn_recurring=m.get("attn_recurring"), attn_novel=m.get("attn_novel"),
                   attn_other=m.get("attn_other"), sem_frac=m["sem_frac"], dynamics_mse=m["mse"],
                   steps=step, wall_seconds=round(wall + time.time() - t_start, 1),
                   config=dict(run=run, model=asdict(mcfg)))
    say(eval_line(step, m, peak), dict(kind="eval", step=step, **m))
    with open(os.path.join(c.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
