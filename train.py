"""
Train CRAM. One script for every dataset in data.py; every global below, every CramConfig field and
every dataset setting can be overridden on the command line:

    python train.py --dataset srcd                          # CPU-sized default, a few minutes
    python train.py --dataset srcd --n_embd=128 --device=cuda --max_iters=5000
    python train.py --out_dir=out/srcd --resume             # continue a run from its checkpoint
    python train.py configs/text_tiny.py --max_iters=100    # a config file, then flags over it
    torchrun --standalone --nproc_per_node=8 train.py configs/openwebtext_gpt2_small.py
    python train.py --help                                  # every setting, default and meaning

Model settings are CramConfig's fields (cram.py), given the same way (--w_compute=0.2); a dataset's
settings carry its prefix (--srcd_len=2048). Each run writes into out_dir: log.txt (the printed
lines), metrics.jsonl (one JSON object per log or eval line), ckpt.pt (atomic; everything needed to
resume exactly) and, at the end, summary.json and curves.png. main() knows no dataset by name:
data.make builds the one --dataset names, and the dataset batches, scores, describes
and plots itself.

Under torchrun every process trains a DistributedDataParallel replica (nccl on GPUs, gloo on CPU);
rank 0 alone logs, evaluates and checkpoints. The data: every rank draws the step's whole global
batch (gradient_accumulation_steps micro-batches) from the one seeded stream and keeps its own
share, so the ranks see different sequences, a run sees the same data as a one-process run with
the same global batch, and a checkpoint holds one stream to resume from.
"""
import ast
import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, fields
from types import SimpleNamespace

import numpy as np
import torch

import data
from cram import CRAM, ROUTER_MODES, ConfigError, CramConfig, router_tau, routing_stats

# ---- run ----------------------------------------------------------------------------------
dataset = "srcd"         # srcd, mqar or tokens (data.DATASETS); its settings carry its prefix
out_dir = "out/srcd"     # the run folder: log.txt, metrics.jsonl, ckpt.pt, summary.json
device = "auto"          # auto picks cuda, then mps, then cpu
dtype = "auto"           # auto: bfloat16 autocast on CUDA, float32 elsewhere; or float32, bfloat16
compile = False          # torch.compile the model (CUDA only)
threads = 0              # CPU threads for torch; 0 keeps torch's default
seed = 1337              # seeds the model's init, the training batches and the random routing
resume = False           # continue from out_dir/ckpt.pt
overwrite = False        # allow a fresh run to replace the checkpoint already in out_dir
max_iters = 1500         # training steps
stop_iter = -1           # stop early (with a checkpoint) at this step, to split a run; -1: never
batch_size = 16          # sequences per micro-step and rank
gradient_accumulation_steps = 1  # micro-steps per step, over all ranks (a multiple of their number)
backend = "auto"         # torchrun's process group: auto is nccl on CUDA, gloo on CPU
learning_rate = 3e-3     # peak learning rate of AdamW
min_lr = 3e-4            # cosine decay from learning_rate to min_lr after a linear warm-up
warmup_iters = 100       # steps of linear learning-rate warm-up
weight_decay = 0.1       # AdamW weight decay, on matrices only
grad_clip = 1.0          # clip the gradient norm to this; 0: no clipping
log_interval = 50        # steps between log lines (the only steps that read values to the host)
eval_interval = 250      # steps between evaluations on the fixed eval batches
eval_batches = 4         # eval sequences = eval_batches * batch_size, the same every eval
ckpt_interval = 500      # steps between checkpoints
keep_checkpoints = False # also keep each checkpoint as ckpt_<step>.pt (probe.py reads them all)
init_from = ""           # a run folder: start from its weights (its model settings; new optimizer)
freeze = ""              # comma-separated parts of parameter names kept fixed, e.g. semantic,router
attn_warmup = 0          # steps of attention forced on every token before the router is free:
                         # the default router needs none (cram.py: attn_prior, the q-weighted
                         # penalty); kept for --router_mode=flat_penalty and MQAR (RESULTS.md).
                         # Under capacity, measured and gain the share is 1 instead (the score
                         # learns)
attn_anneal = 0          # then steps over which the budgeted routers' share (the top-k of
                         # capacity, measured and gain, controlled's target) falls linearly from
                         # 1 to attn_budget; 0: at once
# -------------------------------------------------------------------------------------------
RUN_DEFAULTS = {k: v for k, v in globals().items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
DEFAULTS = {**RUN_DEFAULTS, **data.settings()}        # every run setting, the datasets' included
SET_BY_DATA = ("vocab_size", "n_cont", "n_pred")       # model sizes the dataset decides
MODEL_KEYS = {f.name: f.type for f in fields(CramConfig) if f.name not in SET_BY_DATA}
INVOCATION = ("out_dir", "resume", "overwrite", "stop_iter")  # how a run was started,
                                                              # not what it computes
HOW = ("device", "threads", "compile", "backend", "keep_checkpoints")  # where and how it runs
# A resumed run is the run it resumes: every other setting comes from its checkpoint, and a flag
# that contradicts the checkpoint is refused. max_iters may grow, to extend a finished run.
RESUME_MAY_CHANGE = INVOCATION + HOW + ("max_iters", "attn_impl")
DTYPES = ("auto", "float32", "bfloat16")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message is one line that says what to do."""


# ---- settings -------------------------------------------------------------------------------

def comments(source):
    """{name: its comment} for every `name = value  # comment` or `name: type = value  # comment`
    line of source: the one line of meaning --help prints beside each setting."""
    found = {}
    for line in source.splitlines():
        m = re.match(r"\s*(\w+)\s*(?::[^=]+)?=[^#]*#\s*(.+)", line)
        if m:
            found.setdefault(m[1], m[2].strip().rstrip(",;:"))
    return found


def usage():
    """--help: every setting with its default and the comment beside its definition."""
    show = lambda v: v if isinstance(v, str) else repr(v)
    sections = [("run (train.py)", RUN_DEFAULTS, comments(open(__file__).read()), ""),
                ("model (cram.CramConfig; vocab_size, n_cont and n_pred come from the dataset)",
                 {f.name: f.default for f in fields(CramConfig) if f.name in MODEL_KEYS},
                 comments(inspect.getsource(CramConfig)), "")]
    sections += [(f"dataset {name} (data.{cls.__name__}, --dataset={name})",
                  {cls.prefix + f.name: f.default for f in fields(cls)},
                  comments(inspect.getsource(cls)), cls.prefix)
                 for name, cls in data.DATASETS.items()]
    lines = ["usage: python train.py [--key=value ...]   (a bare --flag sets a bool to True)",
             "  --resume continues out_dir's run with its own settings; it may change only "
             + ", ".join(RESUME_MAY_CHANGE) + " (max_iters upward)"]
    for title, defaults, docs, prefix in sections:
        lines += ["", title + ":"]
        lines += [f"  --{f'{k}={show(v)}':32} {docs.get(k[len(prefix):], '')}"
                  for k, v in defaults.items()]
    return "\n".join(lines)


def config_file(path):
    """A config file (nanoGPT's habit: `key = value` lines of Python, comments allowed) -> its
    settings as --key=value arguments. Read with ast, never executed: values must be literals."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError) as e:  # ValueError: not text (bad UTF-8, NUL bytes)
        msg = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not a settings file ({msg}): "
                          "expected `key = value` lines") from None
    args = []
    for node in tree.body:
        target = (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1
                  else None)
        if not isinstance(target, ast.Name):
            raise ConfigError(f"config file {path}, line {node.lineno}: "
                              "expected `key = value` lines only")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"config file {path}, line {node.lineno}: the value must be a "
                              "literal (a number, string, bool)") from None
        args.append(f"--{target.id}={value!r}" if isinstance(value, str)
                    else f"--{target.id}={value}")
    return args


def read_args(argv):
    """Config files (path.py, first) then --key=value, --key value, or a bare --flag for a bool,
    later ones winning -> (run settings given, model settings given): only what argv names. Values
    are Python literals (ast.literal_eval) or bare strings, each checked against its default's
    type."""
    files = 0
    while files < len(argv) and argv[files].endswith(".py"):  # config files come first
        files += 1
    argv = [a for path in argv[:files] for a in config_file(path)] + argv[files:]
    run, model, i = {}, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: give settings as --key=value "
                              "(--help lists them)")
        key, eq, text = arg[2:].partition("=")
        if key in DEFAULTS:
            want = type(DEFAULTS[key])
        elif key in MODEL_KEYS:
            want = MODEL_KEYS[key]
        else:
            raise ConfigError(f"unknown setting --{key}: python train.py --help lists them")
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if not eq and want is bool:  # --flag, or --flag True / --flag False
            text, i = (nxt, i + 1) if nxt in ("True", "False") else ("True", i)
        elif not eq:
            if nxt is None or nxt.startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            text, i = nxt, i + 1
        i += 1
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = text
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"--{key}={text}: expected {want.__name__}, "
                              f"got {type(value).__name__}")
        (run if key in DEFAULTS else model)[key] = value
    return run, model


def check_run(run):
    """Refuse, in one line, run settings that cannot train."""
    c = SimpleNamespace(**run)
    positive = ("max_iters", "batch_size", "gradient_accumulation_steps", "log_interval",
                "eval_interval", "eval_batches", "ckpt_interval")
    rules = [(k, run[k] >= 1, "a positive int") for k in positive] + [
        ("stop_iter", c.stop_iter == -1 or c.stop_iter > 0, "-1 (never) or a positive step"),
        ("dtype", c.dtype in DTYPES, f"one of {DTYPES}"),
        ("backend", c.backend in ("auto", "nccl", "gloo"), "auto, nccl or gloo"),
        ("learning_rate", 0 <= c.learning_rate < math.inf,
         ">= 0 (0: the weights stay, as for a transfer test)"),
        ("min_lr", 0 <= c.min_lr <= c.learning_rate, f"in [0, learning_rate={c.learning_rate}]"),
        ("weight_decay", 0 <= c.weight_decay < math.inf, ">= 0"),
        ("grad_clip", 0 <= c.grad_clip < math.inf, ">= 0 (0: no clipping)"),
        ("warmup_iters", c.warmup_iters >= 0, ">= 0"),
        ("attn_warmup", c.attn_warmup >= 0, ">= 0"),
        ("attn_anneal", c.attn_anneal >= 0, ">= 0"),
        ("threads", c.threads >= 0, ">= 0 (0: torch's default)")]
    for key, ok, want in rules:
        if not ok:
            raise ConfigError(f"--{key}={run[key]}: expected {want}")


def parse_args(argv):
    """argv -> (every run setting, the model settings given), or None for -h / --help; a fresh
    run's view, even with --resume: what argv does not name is its default."""
    parsed = settings(argv, resume=False)
    return parsed and parsed[:2]


def resume_settings(given, model_over):
    """--resume: the checkpoint's run, with only RESUME_MAY_CHANGE taken from the command line
    -> (run, model overrides, checkpoint). A flag that contradicts the checkpoint is refused."""
    out_dir = given.get("out_dir", DEFAULTS["out_dir"])
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    saved = {**DEFAULTS, **ckpt["run"]}  # a setting newer than the checkpoint: its default
    for k, v in given.items():
        if k not in RESUME_MAY_CHANGE and saved[k] != v:
            raise ConfigError(f"--{k}={v!r} differs from the checkpoint's {saved[k]!r}: a resumed "
                              "run keeps its settings (--help lists the few it may change)")
    for k, v in model_over.items():
        was = ckpt["model_args"].get(k, getattr(CramConfig, k))
        if was != v and k not in RESUME_MAY_CHANGE:
            raise ConfigError(f"--{k}={v} differs from the checkpoint's {was!r}: "
                              "a resumed run keeps its model")
    if given.get("max_iters", saved["max_iters"]) < saved["max_iters"]:
        raise ConfigError(f"--max_iters={given['max_iters']} is below the run's "
                          f"{saved['max_iters']}: a resume may extend a run, not shorten it "
                          "(use --stop_iter to stop early)")
    run = {**saved, **{k: DEFAULTS[k] for k in INVOCATION}, **given}
    check_run(run)
    return run, model_over, ckpt


def settings(argv, resume=True):
    """argv -> (run, model overrides, the checkpoint to resume or None), every setting checked, or
    None for --help. Nothing is built and nothing is written."""
    if "-h" in argv or "--help" in argv:
        return None
    given, model_over = read_args(argv)
    if resume and given.get("resume"):
        return resume_settings(given, model_over)
    run = {**DEFAULTS, **given}
    check_run(run)
    return run, model_over, None


def distributed(c):
    """Under torchrun (RANK in the environment): join the process group -> (rank, local rank,
    number of ranks); (0, 0, 1) otherwise."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and (c.device == "auto" or c.device.startswith("cuda"))
    backend = c.backend if c.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("--backend=nccl needs CUDA GPUs (and --device=auto or cuda); "
                          "on CPU use --backend=gloo")
    if not dist.is_available() or not getattr(dist, f"is_{backend}_available")():
        raise ConfigError(f"--backend={backend} is not available in this torch build: "
                          f"try --backend={'gloo' if backend == 'nccl' else 'nccl'}")
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if c.gradient_accumulation_steps % world:
        raise ConfigError(f"--gradient_accumulation_steps={c.gradient_accumulation_steps} "
                          f"is not divisible by the {world} ranks: give a multiple of {world}")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return rank, local, world


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ConfigError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available here; use --device=cpu")
    if name.startswith("cuda:") and not (name[5:].isdigit()
                                         and int(name[5:]) < torch.cuda.device_count()):
        raise ConfigError(f"--device={name}: this machine has "
                          f"{torch.cuda.device_count()} CUDA devices")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps: Apple's MPS is not available here; "
                          "use --device=auto or cpu")
    return name


def autocast_context(name, dev):
    """--dtype -> (the dtype used, a context for the forward pass): bfloat16 autocast (what auto
    picks on CUDA), or nothing for float32."""
    if name == "auto":
        name = "bfloat16" if dev.startswith("cuda") else "float32"
    if name == "float32":
        return name, contextlib.nullcontext()
    return name, torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)


# ---- training -------------------------------------------------------------------------------

def get_lr(c, it):
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / c.warmup_iters
    frac = (it - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (c.learning_rate - c.min_lr)


def attn_share(c, mcfg, it):
    """The budgeted routers' share of tokens on attention at step it: 1 through the attention
    warm-up, then down a line to attn_budget over attn_anneal steps (the decreasing attention
    use the paper's router shows, as a schedule); None for the other routers."""
    mode = ROUTER_MODES[mcfg.router_mode]
    if mode.attention != "budget" and mode.penalty != "controlled":
        return None
    if it < c.attn_warmup:
        frac = 0.0
    elif c.attn_anneal:
        frac = min(1.0, (it - c.attn_warmup) / c.attn_anneal)
    else:
        frac = 1.0
    return mcfg.attn_budget + (1.0 - frac) * (1.0 - mcfg.attn_budget)


def make_optimizer(model, c):
    """AdamW; weight decay on matrices only (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(0.9, 0.95))


def measure(out, task, batch):
    """Everything a log line reports about one forward, as 0-dim tensors still on the device."""
    return {"loss": out["loss"].detach(), **out["terms"], **routing_stats(out["routing"]),
            **task.metrics(out, batch)}


def to_host(m):
    """A dict of 0-dim tensors as floats, in one device-to-host copy; NaN entries (a token class
    absent from the batch) are left out."""
    values = torch.stack([v.float() for v in m.values()]).tolist()
    return {k: v for k, v in zip(m, values) if not math.isnan(v)}


@torch.no_grad()
def evaluate(model, task, batches, autocast, router_mode=None):
    """The mean over the fixed eval batches of everything measure() reports, as floats."""
    model.eval()
    rows = []
    for batch in batches:
        with autocast:
            out = model(**batch, router_mode=router_mode)
        rows.append(measure(out, task, batch))
    model.train()
    return to_host({k: torch.stack([r[k] for r in rows]).nanmean() for k in rows[0]})


class NonFinite:
    """Watches the loss terms and the gradient norm for NaN or inf without a host sync per step:
    the first bad step and its values stay on the device until check(), which runs before every
    host read and checkpoint. A bad gradient is seen in the step whose update it spoils, so a
    checkpoint never holds the weights a bad step wrote."""

    def __init__(self, device):
        self.step = torch.full((), -1, device=device)
        self.values, self.names = None, None

    def update(self, step, terms):
        values = torch.stack([v.float() for v in terms.values()])
        first = (self.step < 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, step, self.step)
        self.values = values if self.values is None else torch.where(first, values, self.values)
        self.names = list(terms)

    def check(self, ckpt_step):
        step = int(self.step)
        if step >= 0:
            bad = ", ".join(f"{n} = {v}" for n, v in zip(self.names, self.values.tolist())
                            if not math.isfinite(v))
            kept = (f"the checkpoint of step {ckpt_step} is intact" if ckpt_step
                    else "no checkpoint was written")
            raise TrainingError(f"step {step}: not finite: {bad}; stopped, {kept}: "
                                "lower --learning_rate or check the data, "
                                "then --resume or start again")


def log_line(step, m, task, ms, tok_s):
    """One grep-able line: step, losses, attention and semantic shares, the task's part, speed."""
    g = lambda k: m.get(k, float("nan"))
    return (f"step {step} | loss {g('loss'):.3f} | ce {g('ce'):.3f} | mse {g('mse'):.3f} | "
            f"consol {g('consol'):.4f} | attn {100 * g('attn_frac'):.1f}% | "
            f"sem {100 * g('sem_frac'):.1f}% | "
            f"{task.line(m)} | {ms:.0f} ms | {tok_s / 1000:.1f}k tok/s")


def eval_line(step, m, task, peak):
    g = lambda k: m.get(k, float("nan"))
    return (f"eval {step} | loss {g('loss'):.3f} | mse {g('mse'):.4f} | "
            f"attn {100 * g('attn_frac'):.2f}% (peak {100 * peak:.1f}%) | "
            f"sem {100 * g('sem_frac'):.2f}% | {task.line(m)}")


# ---- checkpoints and the run folder ---------------------------------------------------------

CKPT_KEYS = {"model", "optimizer", "model_args", "step", "rng", "run"}
RUN_FILES = re.compile(r"(ckpt(_\d+)?\.pt(\.tmp)?|metrics\.jsonl|log\.txt|summary\.json"
                       r"|curves\.png)$")


def fingerprint(ckpt):
    """A SHA-256 of every tensor's bytes in the model and optimizer state: a checkpoint whose
    bytes changed on disk is refused at load instead of training on garbage."""
    h = hashlib.sha256()
    for t in [*ckpt["model"].values(),
              *(v for s in ckpt["optimizer"]["state"].values() for v in s.values())]:
        if torch.is_tensor(t):
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a kill or a full disk never leaves a torn
    checkpoint."""
    tmp = path + ".tmp"
    try:
        torch.save({**state, "sha256": fingerprint(state)}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteError(path, e) from None


def load_checkpoint(path, missing="run without --resume to start a new run"):
    """A checkpoint's dict, loaded as data only (weights_only: tensors, numbers, strings, dicts;
    a file that carries code is refused before any of it runs), its weights checked against the
    fingerprint written with them."""
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
            raise KeyError("missing entries")
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable or holds more than data "
                          f"({type(e).__name__}): delete it or choose another --out_dir") from None
    if "sha256" in ckpt and ckpt["sha256"] != fingerprint(ckpt):
        raise ConfigError(f"checkpoint {path} is corrupt (its weights do not match their "
                          "checksum): restore it from a copy, or start again")
    unknown = set(ckpt["model_args"]) - {f.name for f in fields(CramConfig)}
    if unknown:
        raise ConfigError(f"checkpoint {path} has model settings this cram.py lacks "
                          f"({', '.join(sorted(unknown))}): "
                          "an older version wrote it; start a new run in another --out_dir")
    return ckpt


def load_run(out_dir, device="cpu", path=None):
    """A run folder's checkpoint (path: another one than out_dir/ckpt.pt) -> (run settings, its
    dataset, the model in eval mode, the step it was saved at): for plots, sampling and probes of
    any finished or stopped run."""
    ckpt = load_checkpoint(path or os.path.join(out_dir, "ckpt.pt"),
                           missing="is --out_dir a train.py run folder?")
    run = {**DEFAULTS, **ckpt["run"]}
    model = CRAM(CramConfig(**{**ckpt["model_args"], "attn_impl": "auto"}))
    model.load_state_dict(ckpt["model"])
    return run, data.make(run), model.to(device).eval(), ckpt["step"]


def check_out_dir(c):
    """Before anything is built: out_dir is a writable folder, and a fresh run may use it (empty,
    or holding a train.py run and --overwrite). Nothing is removed here."""
    try:
        os.makedirs(c.out_dir, exist_ok=True)
        if not os.access(c.out_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise ConfigError(f"--out_dir={c.out_dir} is not a writable folder "
                          f"({e.strerror})") from None
    if c.resume:
        return
    names = sorted(n for n in os.listdir(c.out_dir) if not n.startswith("."))
    foreign = [n for n in names if not RUN_FILES.match(n)]
    if foreign:
        raise ConfigError(f"--out_dir={c.out_dir} holds files that are not a train.py run's "
                          f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                          "train into an empty or new folder")
    if "ckpt.pt" in names and not c.overwrite:
        raise ConfigError(f"{os.path.join(c.out_dir, 'ckpt.pt')} exists: "
                          "pass --resume to continue it, --overwrite to replace it, "
                          "or another --out_dir")
    if names and not c.overwrite:
        raise ConfigError(f"--out_dir={c.out_dir} holds a run ({', '.join(names)}): "
                          "pass --overwrite to replace it, or another --out_dir")


def clear_out_dir(out_dir):
    """A fresh run's folder: the files of the run it replaces go (check_out_dir allowed only
    those)."""
    for name in os.listdir(out_dir):
        if RUN_FILES.match(name):
            os.remove(os.path.join(out_dir, name))


class WriteError(RuntimeError):
    """Writing into the run folder failed (a full disk, a folder that went away)."""

    def __init__(self, path, e):
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        super().__init__(f"writing {path} failed ({why})")


class RunLog:
    """What rank 0 writes besides checkpoints: each line printed and appended to log.txt, records to
    metrics.jsonl. A record is one line written whole, so a crash leaves at most a torn last
    line."""

    def __init__(self, out_dir, master):
        self.master = master
        self.log, self.metrics = (os.path.join(out_dir, n) for n in ("log.txt", "metrics.jsonl"))

    def append(self, path, text):
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as e:
            raise WriteError(path, e) from None

    def say(self, line, record=None):
        if not self.master:
            return
        print(line, flush=True)
        self.append(self.log, line + "\n")
        if record is not None:
            self.append(self.metrics, json.dumps(record) + "\n")

    def truncate(self, step):
        """Resuming at `step`: keep the records written up to its checkpoint (the train line of step
        itself included); drop later ones and a torn last line, which a crash mid-write leaves."""
        if not self.master or not os.path.exists(self.metrics):
            return
        kept = []
        with open(self.metrics) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    keep = r["step"] < step or (r["kind"] == "train" and r["step"] == step)
                except (ValueError, TypeError, KeyError):
                    break  # torn: nothing after it was written whole
                if keep:
                    kept.append(line if line.endswith("\n") else line + "\n")
        try:
            with open(self.metrics, "w") as f:
                f.writelines(kept)
        except OSError as e:
            raise WriteError(self.metrics, e) from None


# ---- one run --------------------------------------------------------------------------------

def setup_device(c, local, world):
    """-> (device, dtype name, autocast context); threads and TF32 set."""
    dev = pick_device(c.device)
    if world > 1 and dev.startswith("cuda"):
        dev = f"cuda:{local}"
    if c.compile and not dev.startswith("cuda"):
        raise ConfigError(f"--compile: torch.compile is used on CUDA only; on {dev} drop --compile")
    dtype, autocast = autocast_context(c.dtype, dev)
    if c.threads > 0:
        torch.set_num_threads(c.threads)
    if dev.startswith("cuda"):  # as nanoGPT: fp32 matmuls, and kernel.py's tiles, on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return dev, dtype, autocast


def dataset_sizes(task):
    """The model sizes a dataset decides (SET_BY_DATA)."""
    return {k: getattr(task, k) for k in SET_BY_DATA}


def model_config(c, task, model_over, ckpt, source):
    """The model's settings: the checkpoint's (resume) or the source run's (--init_from) under the
    overrides, else the overrides on the defaults with the dataset's sizes. The attention window
    defaults to the dataset's sequence length, so every token can reach back to the start."""
    base = ckpt or source
    if base:  # its model, but not its attn_impl (the same math), which may not exist here
        return CramConfig(**{**base["model_args"], "attn_impl": CramConfig.attn_impl, **model_over})
    return CramConfig(**{"window": task.len, **model_over, **dataset_sizes(task)})


def check_model(c, mcfg, task, dev, source):
    """What a model config cannot do here, found before any work: the kernel off CUDA without
    triton's interpreter, another vocabulary than --init_from's."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if mcfg.attn_impl == "kernel" and not (dev.startswith("cuda") or interpreted):
        raise ConfigError(f"--attn_impl=kernel runs on CUDA (or with TRITON_INTERPRET=1, slowly); "
                          f"on {dev} use --attn_impl=auto")
    sizes = dataset_sizes(task)
    if source and any(getattr(mcfg, k) != v for k, v in sizes.items()):
        raise ConfigError(f"--init_from={c.init_from}: its model reads "
                          f"{dict((k, getattr(mcfg, k)) for k in sizes)}, this dataset {sizes}: "
                          "keep the vocabulary and inputs of the run it starts from")


def build(c, run, model_over, ckpt, dev, rank, local, world, say_note):
    """Dataset, model (from --init_from's weights, if given), optimizer -> a namespace of them."""
    task = data.make(run)
    source = None if ckpt or not c.init_from else load_checkpoint(
        os.path.join(c.init_from, "ckpt.pt"), missing="--init_from names a train.py run folder")
    mcfg = model_config(c, task, model_over, ckpt, source)
    check_model(c, mcfg, task, dev, source)
    if mcfg.window < task.len:
        say_note(f"note: window {mcfg.window} < sequence length {task.len}: attention cannot reach "
                 f"tokens more than {mcfg.window} back")
    torch.manual_seed(c.seed)
    raw_model = CRAM(mcfg).to(dev)  # what checkpoints hold; `model` may be its compiled form
    if source:
        try:
            raw_model.load_state_dict(source["model"])
        except RuntimeError:
            changed = [f"--{k}={v}" for k, v in model_over.items()
                       if source["model_args"].get(k) != v]
            raise ConfigError(f"--init_from={c.init_from}: its weights do not fit this model "
                              f"({', '.join(changed) or 'other shapes'}): "
                              "keep its model settings") from None
    frozen(raw_model, c.freeze)
    model = torch.compile(raw_model) if c.compile else raw_model
    ddp = model  # what the training step calls: under torchrun the replica that averages gradients
    if world > 1:
        torch.manual_seed(c.seed + rank)  # the same weights (DDP also broadcasts them), other noise
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if dev.startswith("cuda") else None,
            find_unused_parameters=True)  # router modes leave a tier unused (never: attention)
    return SimpleNamespace(task=task, mcfg=mcfg, raw_model=raw_model, model=model, ddp=ddp,
                           opt=make_optimizer(raw_model, c), rng=np.random.default_rng(c.seed))


def restore(r, ckpt, dev, rank):
    """Resume: weights, optimizer, step, peak, wall time and every random state from the
    checkpoint."""
    r.raw_model.load_state_dict(ckpt["model"])
    r.opt.load_state_dict(ckpt["optimizer"])
    saved = ckpt["rng"].get("ranks") or [dict(torch=ckpt["rng"]["torch"], cuda=ckpt["rng"]["cuda"])]
    if rank < len(saved):
        torch.set_rng_state(saved[rank]["torch"])
        if saved[rank]["cuda"] is not None and dev.startswith("cuda"):
            torch.cuda.set_rng_state_all(saved[rank]["cuda"])
    r.rng.bit_generator.state = ckpt["rng"]["numpy"]
    return ckpt["step"], ckpt["attn_frac_peak"], ckpt["wall_seconds"]


def frozen(model, freeze):
    """Keep fixed every parameter whose name contains one of the comma-separated parts of freeze
    (transfer: --freeze=semantic,router keeps semantic memory, the router and its q-head)."""
    parts = [p for p in freeze.split(",") if p]
    for part in parts:
        if not any(part in name for name, _ in model.named_parameters()):
            raise ConfigError(f"--freeze={freeze}: no parameter name contains {part!r} "
                              "(see model.named_parameters())")
    for name, p in model.named_parameters():
        p.requires_grad_(not any(part in name for part in parts))


def rng_states(dev, world):
    """Every rank's torch random state (the router's Gumbel noise and spot checks), gathered for
    rank 0's checkpoint: [{torch, cuda}] per rank."""
    mine = dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if dev.startswith("cuda") else None)
    if world == 1:
        return [mine]
    states = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def train_step(r, c, tau, forced, share, dev, rank, world):
    """One optimizer step over the global batch (gradient_accumulation_steps micro-batches, drawn in
    one order on every rank, each rank computing its share) -> (last output, its batch, grad
    norm)."""
    for group in r.opt.param_groups:
        group["lr"] = get_lr(c, r.step)
    r.opt.zero_grad(set_to_none=True)
    accum = c.gradient_accumulation_steps // world  # this rank's micro-steps
    for micro in range(c.gradient_accumulation_steps):
        mine = micro // accum == rank
        drawn = r.task.batch(c.batch_size, r.rng, dev if mine else "cpu")
        if not mine:  # another rank's share: drawn only to keep the stream in step
            continue
        batch = drawn
        if world > 1:  # average the gradients across ranks after the last micro-step only
            r.ddp.require_backward_grad_sync = micro % accum == accum - 1
        with r.autocast:
            out = r.ddp(**batch, tau=tau, router_mode="always" if forced else None, share=share)
        (out["loss"] / accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(r.raw_model.parameters(), c.grad_clip or math.inf)
    r.opt.step()
    return out, batch, grad_norm


def eval_batch(task, run, i, device="cpu"):
    """The run's i-th fixed eval batch (the held-out split where the dataset has one)."""
    return task.batch(run["batch_size"], np.random.default_rng([run["seed"], 1, i]), device,
                      split="val")


def plot_run(out_dir, task=None, model=None, batch=None):
    """Write out_dir/curves.png from a run folder: its metrics.jsonl rows and, for the router's
    decisions, the model on the first eval batch. main() passes its task, model and batch; alone it
    rebuilds them from the checkpoint, for any finished or stopped run:
    python -c "import train; train.plot_run('out/srcd')"."""
    if model is None:
        run, task, model, _ = load_run(out_dir)
        batch = eval_batch(task, run, 0)
    model.eval()
    with torch.no_grad():
        out = model(**{k: v[:1] for k, v in batch.items()})  # one sequence is all the plot shows
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    task.plot(rows, out, batch, os.path.join(out_dir, "curves.png"))


def main(argv):
    """Parse, join torchrun's process group if there is one, train -> the summary (rank 0)."""
    parsed = settings(argv)
    if parsed is None:
        print(usage())
        return None
    rank, local, world = distributed(SimpleNamespace(**parsed[0]))
    try:
        summary = train(*parsed, rank, local, world)
        if world > 1:  # leave together: gloo aborts a rank whose peer tears down mid-shutdown
            torch.distributed.barrier()
        return summary
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def train(run, model_over, ckpt=None, rank=0, local=0, world=1):
    """One training run (one rank of it under torchrun) -> the summary dict on rank 0, else None.
    Everything that can be refused is checked before the run folder is touched."""
    c, master = SimpleNamespace(**run), rank == 0
    dev, dtype, autocast = setup_device(c, local, world)
    if master:
        check_out_dir(c)
    notes = []
    r = build(c, run, model_over, ckpt, dev, rank, local, world, notes.append)
    r.autocast, r.log = autocast, RunLog(c.out_dir, master)
    r.eval_set = ([eval_batch(r.task, run, i, dev) for i in range(c.eval_batches)] if master
                  else None)
    r.step, r.peak, r.wall = restore(r, ckpt, dev, rank) if ckpt else (0, 0.0, 0.0)
    r.ckpt_step = r.step if ckpt else None
    try:
        if ckpt:
            r.log.truncate(r.step)  # drop what the interrupted run wrote after its checkpoint
        elif master:
            clear_out_dir(c.out_dir)
        r.log.say(f"{'resuming at step ' + str(r.step) if ckpt else 'new run'} | device {dev} | "
                  f"dtype {dtype} | "
                  f"{r.raw_model.num_params() / 1e3:.1f}k params | model {asdict(r.mcfg)}")
        for line in [r.task.describe(), *notes]:
            r.log.say(line)
        return loop(r, c, run, dev, rank, world)
    except WriteError as e:
        kept = (f"the checkpoint of step {r.ckpt_step} is intact" if r.ckpt_step
                else "no checkpoint was written")
        raise TrainingError(f"{e}; stopped, {kept}: free space (or restore the folder), "
                            "then continue with "
                            f"python train.py --out_dir={c.out_dir} --resume") from None


def loop(r, c, run, dev, rank, world):
    """The training loop: evaluate, step, watch for non-finite values, log, checkpoint."""
    master, watch = rank == 0, NonFinite(dev)
    attention = ROUTER_MODES[r.mcfg.router_mode].attention
    free_router = attention in ("router", "budget")
    t_start = t_log = time.time()
    step_log, t_eval = r.step, 0.0  # the step and time of the last log line; eval time since then
    last = min(c.max_iters, c.stop_iter) if c.stop_iter >= 0 else c.max_iters
    while r.step < last:
        warm = r.step < c.attn_warmup and free_router
        share = attn_share(c, r.mcfg, r.step)
        if r.step % c.eval_interval == 0 and master:
            t0 = time.time()
            evaluation(r, "always" if warm and attention == "router" else None, free=not warm)
            t_eval += time.time() - t0
        tau = router_tau(r.mcfg, (r.step - c.attn_warmup) / max(1, c.max_iters - c.attn_warmup))
        forced = warm and attention == "router"  # capacity warms up at share 1 instead
        out, batch, grad_norm = train_step(r, c, tau, forced, share, dev, rank, world)
        r.step += 1  # from here on, `step` counts the updates made, as the log lines do
        watch.update(r.step, {**out["terms"], "grad_norm": grad_norm})
        logs = r.step % c.log_interval == 0 or r.step == c.max_iters
        saves = r.step % c.ckpt_interval == 0 or r.step == last
        if logs or saves or r.step % c.eval_interval == 0:  # the host reads: check first
            try:
                watch.check(r.ckpt_step)
            except TrainingError as e:
                if master:  # printed once, by main; kept in the log
                    r.log.append(r.log.log, f"error: {e}\n")
                raise
        if logs and master:
            m = to_host(measure(out, r.task, batch))  # the sync that makes the time below true
            ms = 1000 * (time.time() - t_log - t_eval) / (r.step - step_log)  # mean training step
            tok_s = (c.gradient_accumulation_steps * math.prod(batch["tokens"].shape[:2])
                     / (ms / 1000))
            r.log.say(log_line(r.step, m, r.task, ms, tok_s),
                      dict(kind="train", step=r.step, ms=ms, tok_s=tok_s,
                           lr=get_lr(c, r.step - 1), **m))
            t_log, step_log, t_eval = time.time(), r.step, 0.0
        if saves:
            checkpoint(r, c, run, dev, world, r.wall + time.time() - t_start)
    return finish(r, c, run, world, r.wall + time.time() - t_start)


def evaluation(r, router_mode=None, free=True):
    """Evaluate on the fixed eval set, log it, track the peak attention share -> the metrics."""
    m = evaluate(r.model, r.task, r.eval_set, r.autocast, router_mode)
    if free:  # the peak counts only steps where the router was free
        r.peak = max(r.peak, m["attn_frac"])
    r.log.say(eval_line(r.step, m, r.task, r.peak), dict(kind="eval", step=r.step, **m))
    return m


def checkpoint(r, c, run, dev, world, wall):
    states = rng_states(dev, world)  # every rank takes part; rank 0 writes
    if r.log.master:
        path = os.path.join(c.out_dir, "ckpt.pt")
        save_checkpoint(path, dict(
            model=r.raw_model.state_dict(), optimizer=r.opt.state_dict(), model_args=asdict(r.mcfg),
            run=run, step=r.step, attn_frac_peak=r.peak, wall_seconds=wall,
            rng=dict(numpy=r.rng.bit_generator.state, **states[0],
                     ranks=states if world > 1 else None)))
        if c.keep_checkpoints:
            kept = os.path.join(c.out_dir, f"ckpt_{r.step}.pt")
            try:
                shutil.copyfile(path, kept)
            except OSError as e:
                raise WriteError(kept, e) from None
    r.ckpt_step = r.step


def finish(r, c, run, world, wall):
    """The last evaluation, summary.json and curves.png (rank 0) -> the summary, or None when the
    run stopped early or on another rank."""
    if world > 1:  # what DDP promises, checked: every replica ends with the same weights
        sums = [None] * world
        torch.distributed.all_gather_object(sums, [p.double().sum().item()
                                                   for p in r.raw_model.parameters()])
        if any(s != sums[0] for s in sums):
            raise TrainingError(f"step {r.step}: the ranks' weights differ; "
                                "report this with the command that ran")
        r.log.say(f"step {r.step}: the weights of all {world} ranks are identical")
    if r.step < c.max_iters:
        r.log.say(f"stopped at step {r.step} (stop_iter); continue with --resume")
        return None
    if not r.log.master:
        return None
    m = evaluation(r, free=c.max_iters > c.attn_warmup)
    summary = dict(**r.task.summary(m), attn_frac=m["attn_frac"], attn_frac_peak=r.peak,
                   sem_frac=m["sem_frac"], steps=r.step, wall_seconds=round(wall, 1),
                   config=dict(run={k: v for k, v in run.items() if k not in INVOCATION},
                               model=asdict(r.mcfg)))
    path = os.path.join(c.out_dir, "summary.json")
    try:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        plot_run(c.out_dir, r.task, r.raw_model, r.eval_set[0])
    except OSError as e:
        raise WriteError(path, e) from None
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainingError) as e:
        sys.exit(f"error: {e}")
