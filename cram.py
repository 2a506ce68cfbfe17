"""
CRAM: Consolidation-based Routing for Adaptive Memory (arXiv 2602.12204), the whole model in one
file, with Palimpsa (arXiv 2602.09075) among its alternative working memories.

Every layer has three memories and a router. Working memory, a recurrence with a fixed-size
state, runs on every token; per token the router adds nothing more (tier WORKING), an exact
retrieval by causal attention over a window (tier EPISODIC), or the output of a small low-rank MLP
(tier SEMANTIC). A consolidation loss distils attention's answers into the MLP, so that recurring
retrievals can stop needing attention. Attention is computed only for the tokens routed to it,
in training and in generation, where a step carries the working memories' fixed-size states and
the keys and values of the last `window` tokens.

Order, the core first and each part before its users: CramConfig; routed attention
(routed_attention, dense_attention, attention_impl); the default working memory GatedCTMemory and
its scans; EpisodicMemory; SemanticMemory; RouterMode, ROUTER_MODES, Router and route(); Block;
CRAM, with prefill and step for generation and their LayerCache and Cache; the routing
statistics (tensors, read on log steps). Then, in a marked section, the
alternative working memories: CTRNNMemory (the paper's), ShortConvMemory and PalimpsaMemory.

    model = CRAM(CramConfig())                          # a token model: (B, T) ids -> logits
    out = model(tokens, targets=targets)                # out["loss"], out["terms"], out["routing"]
    out, cache = model.eval().prefill(prompt)           # generation: the prompt in parallel,
    out, cache = model.step(next_token, cache=cache)    # then a token at a time, same logits

Glossary, code name -> paper symbol; C is arXiv 2602.12204 (CRAM), P is arXiv 2602.09075 (Palimpsa):
    dtau           dtau_t, the time gap since the previous observation       (C, working memory)
    CTRNNMemory    h^(k+1) = h^(k) + dt sigmoid(W_tau log(1+dtau)) tanh(W1 h + W2 x)  (C, working
                   memory; the paper's inner Euler step dt is 1/K here, K = ctrnn_steps)
    GatedCTMemory  h_t = a_t h_{t-1} + (1 - a_t) u_t, a_t = exp(-dtau_t lambda_t): this code's
                   linear stand-in for the CT-RNN, scanned in parallel (its docstring says why)
    r_E            episodic (attention) output at a token                     (C, episodic memory)
    f_sem          semantic memory, SemanticMemory                            (C, semantic memory)
    q, q_hat       consolidation quality q_t = exp(-||f_sem(h_t) - r_E||^2 / sigma^2), and the
                   q-head's estimate of it from h_t alone, which this code adds (Router says why)
    z              the router's straight-through one-hot decision over the tiers (C, router)
    WORKING, EPISODIC, SEMANTIC   the tiers' indices in z
    eps            spot-check rate: extra attention targets during training (this code's;
                   Block says why)
    attn_frac      share of tokens that used attention in at least one layer (C, attention compute)
    Router.pick    router_mode="capacity": Mixture-of-Depths' top-k (arXiv 2404.02258), the
                   EPISODIC logit as the score, a threshold for causal decisions (this code's)
    Sensitivity    router_mode="measured": the score regressed on log |dL/dh_t . r_E_t|, how far
                   attention's output at t moves the loss, where attention ran; "gain": on
                   -dL/dh_t . r_E_t, how much it lowers the loss there (this code's)
    PalimpsaMemory M_t = a_t M_{t-1} + v_t k_t^T, Ibar_t = a_t Ibar_{t-1} + b_t (k_t^2)^T,
                   mu_t = M_t / (Ibar_t + I_prior), y_t = mu_t q_t; b = 0 is Mamba2-style  (P)
"""
import functools
import math
from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

TIERS = ("working", "episodic", "semantic")
WORKING, EPISODIC, SEMANTIC = 0, 1, 2  # the tiers' indices in the router's output z
WM_KINDS = ("gated", "ctrnn", "palimpsa", "mamba2", "conv", "none")
PALIMPSA_PARAMS = ("code", "paper")
ATTN_IMPLS = ("auto", "twin", "kernel", "dense")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key and what it takes."""


@dataclass
class CramConfig:
    vocab_size: int = 512    # token ids 0 .. vocab_size-1
    n_cont: int = 0          # continuous inputs per token (SRCD: 2, last observation, log gap)
    n_pred: int = 0          # regression outputs per token (SRCD: 1, the next observation)
    n_embd: int = 64         # d, the width of the residual stream
    n_layer: int = 2         # layers (Block), each with its own router
    n_head: int = 4          # heads of the episodic memory and of the palimpsa and mamba2 memories
    window: int = 512        # episodic buffer: a query at t sees keys t-window+1 .. t
    attn_impl: str = "auto"  # how attention runs: auto, twin, kernel or dense (attention_impl);
                             # auto: dense SDPA if every token is routed, on CUDA the kernel,
                             # else twin
    emb_std: float = 0.02    # init std of the token and position embeddings (nanoGPT's 0.02);
                             # MQAR needs 1.0, PyTorch's default, to learn recall on a CPU budget
                             # (README, MQAR table)
    sem_rank: int = 0        # semantic memory rank; 0 means d/16 as in the paper
    mlp: bool = True         # each layer's MLP; False is the paper's layer, tiers and router only
    wm_kind: str = "gated"   # gated (chunked scan), ctrnn (paper's), palimpsa, mamba2, conv, none
    palimpsa_param: str = "code"  # palimpsa/mamba2 gates: "code" (the authors' code) or "paper"
    palimpsa_prior: float = 1.0   # I_prior of palimpsa_param="paper" (the code's is fixed at 1)
    n_positions: int = 0     # learned absolute position embeddings (nanoGPT) for this many tokens;
                             # 0: none, order comes from working memory (a transformer
                             # baseline needs them)
    wm_chunk: int = 16       # chunk length of the parallel scan
    ctrnn_steps: int = 2     # K, Euler steps per token of the paper's update
    router_mode: str = "learned"  # a row of ROUTER_MODES: learned, no_q, always, never, fixed, ...
    fixed_every: int = 16    # router_mode="fixed": attention on every k-th token of the sequence
    attn_budget: float = 0.125  # capacity: the share of each sequence on attention; controlled:
                                # the mean P(EPISODIC) the compute weight steers toward
    budget_lr: float = 0.01  # router_mode="controlled": the dual step on the compute weight
    tau_start: float = 1.0   # Gumbel-softmax temperature, annealed to tau_end over training
    tau_end: float = 0.3     # the temperature at the end of training
    sigma2: float = 0.2      # sigma^2 in q = exp(-err / sigma^2), err the relative squared error:
                             # ||f_sem - r_E||^2 over the spread of r_E where attention ran
    spot_check: float = 0.03 # eps: share of non-routed tokens that still run attention in training
    w_pred: float = 1.0      # loss weight of the regression (dynamics MSE)
    w_consol: float = 1.0    # loss weight of consolidation ||f_sem - sg(r_E)||^2
    w_qhead: float = 0.1     # loss weight of the q-head's BCE toward sg(q), and of the measured
                             # score's regression (router_mode=measured): the router's probes
    w_compute: float = 0.5   # loss weight of the compute penalty on the router's P(EPISODIC)
    attn_prior: float = 0.9  # the router's initial P(EPISODIC): attention use starts high
                             # With q_hat, retrievals semantic memory cannot answer keep
                             # attention free
    dropout: float = 0.0     # on the embeddings and after each MLP

    def __post_init__(self):
        for f in fields(self):  # types first, so a string where an int belongs says so plainly
            v = getattr(self, f.name)
            ok = isinstance(v, (int, float) if f.type is float else f.type)
            if not ok or (f.type is not bool and isinstance(v, bool)):
                raise ConfigError(f"config {f.name}={v!r}: expected {f.type.__name__}")
        checks = [
            ("n_head", self.n_head > 0, "a positive int"),
            ("n_embd", self.n_embd > 0 and self.n_head > 0 and self.n_embd % self.n_head == 0,
             f"a positive multiple of n_head={self.n_head}"),
            ("n_layer", self.n_layer > 0, "a positive int"),
            ("vocab_size", self.vocab_size > 0, "a positive int"),
            ("window", self.window > 0, "a positive int"),
            ("attn_impl", self.attn_impl in ATTN_IMPLS, f"one of {ATTN_IMPLS}"),
            ("sem_rank", 0 <= self.sem_rank <= self.n_embd, f"0 (= d/16) .. n_embd={self.n_embd}"),
            ("wm_kind", self.wm_kind in WM_KINDS, f"one of {WM_KINDS}"),
            ("palimpsa_param", self.palimpsa_param in PALIMPSA_PARAMS, f"one of {PALIMPSA_PARAMS}"),
            ("palimpsa_prior", self.palimpsa_prior > 0, "> 0"),
            ("emb_std", self.emb_std > 0, "> 0 (0.02 nanoGPT's, 1.0 PyTorch's)"),
            ("wm_chunk", self.wm_chunk > 0, "a positive int"),
            ("n_positions", self.n_positions >= 0, ">= 0"),
            ("ctrnn_steps", self.ctrnn_steps > 0, "a positive int"),
            ("router_mode", self.router_mode in ROUTER_MODES, f"one of {tuple(ROUTER_MODES)}"),
            ("fixed_every", self.fixed_every > 0, "a positive int"),
            ("attn_budget", 0 < self.attn_budget <= 1, "in (0, 1]"),
            ("budget_lr", self.budget_lr >= 0, ">= 0"),
            ("tau_start", self.tau_start > 0, "> 0"),
            ("tau_end", self.tau_end > 0, "> 0"),
            ("sigma2", self.sigma2 > 0, "> 0"),
            ("spot_check", 0 <= self.spot_check <= 1, "in [0, 1]"),
            ("attn_prior", 0 < self.attn_prior < 1, "in (0, 1)"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("n_cont", self.n_cont >= 0, ">= 0"),
            ("n_pred", self.n_pred >= 0, ">= 0"),
        ] + [(w, getattr(self, w) >= 0, ">= 0")
             for w in ("w_pred", "w_consol", "w_qhead", "w_compute")]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"config {name}={getattr(self, name)!r}: expected {want}")

    @property
    def rank(self):
        return self.sem_rank or max(1, self.n_embd // 16)


# ---------------------------------------------------------------------------------------------
# Routed attention: the twin of kernel.py's Triton kernel (same signature), the dense
# reference, and the choice between them.

attention_work = Counter()  # what routed_attention computed: "queries", "scores"


def routed_attention(q, k, v, b_idx, t_idx, window):
    """Causal windowed softmax attention for a subset of query positions (the episodic tier).

    q: (M, H, D) queries of the routed tokens only; b_idx, t_idx: (M,) their batch row and
    position, sorted by (b, t); k, v: (B, H, T, D) for every token; window: a query at t sees keys
    t-window+1 .. t. Returns (M, H, D). The cost is O(M T D), not O(T^2 D): scores are formed only
    for routed queries, against the key range their batch row needs.
    """
    M, H, D = q.shape
    attention_work["queries"] += M
    if M == 0:
        return q.new_zeros(0, H, D)
    outs = []
    rows, counts = torch.unique_consecutive(b_idx, return_counts=True)
    for b, qb, tq in zip(rows.tolist(), q.split(counts.tolist()), t_idx.split(counts.tolist())):
        lo, hi = max(0, int(tq.min()) - window + 1), int(tq.max()) + 1
        pos = torch.arange(lo, hi, device=q.device)
        keep = (pos[None] <= tq[:, None]) & (pos[None] > tq[:, None] - window)   # (m, L)
        s = torch.einsum("mhd,hld->hml", qb, k[b, :, lo:hi]) / math.sqrt(D)    # (H, m, L)
        p = s.masked_fill(~keep, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hml,hld->mhd", p.to(v.dtype), v[b, :, lo:hi]))  # (m, H, D)
        attention_work["scores"] += s.numel()
    return torch.cat(outs)


def dense_attention(q, k, v, window):
    """Every query attends: causal windowed softmax attention, q, k, v (B, H, T, D) -> (B, H, T, D),
    one fused SDPA call. The reference routed_attention is tested against, and attn_impl="dense"."""
    T = q.shape[2]
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(T, device=q.device)
    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.cache
def triton_attention():
    """kernel.py's Triton routed_attention, or None where triton cannot be imported (its wheels are
    Linux only). Imported on first use, so a CPU run never loads triton."""
    try:
        from kernel import routed_attention as triton_routed_attention
    except ImportError:
        return None
    return triton_routed_attention


def attention_impl(name, is_cuda, head_dim, all_routed):
    """cfg.attn_impl resolved for one call -> "dense", "kernel" or "twin". "auto": one dense SDPA
    call when every token is routed (router_mode "always": the twin would be ~7x slower); else the
    Triton kernel on CUDA with triton installed and heads of at most 128; else the PyTorch twin."""
    if name != "auto":
        return name
    if all_routed:
        return "dense"
    if is_cuda and head_dim <= 128 and triton_attention() is not None:
        return "kernel"
    return "twin"


# ---------------------------------------------------------------------------------------------
# The default working memory: a time-gap-aware gated linear recurrence, run as a chunked scan.

def gated_scan_sequential(log_a, x, h=None):
    """h_t = exp(log_a_t) * h_{t-1} + x_t, one step at a time: the test oracle, and generation's
    step. log_a, x: (B, T, C); h: (B, C) the state before the first step, None for 0
    -> h: (B, T, C)."""
    h, out = torch.zeros_like(x[:, 0]) if h is None else h, []
    for t in range(x.shape[1]):
        h = log_a[:, t].exp() * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1)


def doubling_scan(log_a, x):
    """The same recurrence in log2(T) parallel steps (Hillis-Steele). After the step of stride s,
    (log_a_t, x_t) summarise steps t-2s+1 .. t: composing two affine maps h -> a h + x is affine.
    Only sums of log_a <= 0 are exponentiated, so it is stable for any gap."""
    s = 1
    while s < x.shape[1]:
        x = torch.cat([x[:, :s], x[:, s:] + log_a[:, s:].exp() * x[:, :-s]], 1)
        log_a = torch.cat([log_a[:, :s], log_a[:, s:] + log_a[:, :-s]], 1)
        s *= 2
    return x


def gated_scan_chunked(log_a, x, chunk):
    """gated_scan_sequential as a chunked parallel scan, the layout a fused kernel uses.

    Each chunk of length C is scanned from a zero state (all chunks at once); then the chunk-final
    states are scanned across chunks, and each chunk adds its entering state decayed to t:
        h_t = h_t^intra + exp(L_t) h_start,   L_t = sum of log_a from the chunk start to t.
    log_a, x: (B, T, C) -> h: (B, T, C); h[:, -1] is the state after the last step.
    """
    B, T, D = x.shape
    n = -(-T // chunk)
    pad = (0, 0, 0, n * chunk - T)  # log_a = 0, x = 0 on padding: the state passes unchanged
    la = F.pad(log_a, pad).reshape(B * n, chunk, D)  # reshape: inputs of any memory layout
    h = doubling_scan(la, F.pad(x, pad).reshape(B * n, chunk, D))          # (B n, C, D)
    L = la.cumsum(1).view(B, n, chunk, D)
    ends = doubling_scan(L[:, :, -1], h[:, -1].view(B, n, D))              # (B, n, D)
    start = F.pad(ends, (0, 0, 1, 0))[:, :-1]                              # entering chunk j
    h = h.view(B, n, chunk, D) + L.exp() * start[:, :, None]
    return h.view(B, n * chunk, D)[:, :T]


class GatedCTMemory(nn.Module):
    """Default working memory: a time-gap-aware gated linear recurrence (a diagonal CT-SSM).

    dh/dtau = -lambda_t (h - u_t), solved exactly over the gap dtau_t (zero-order hold):
        a_t = exp(-dtau_t lambda_t),  h_t = a_t h_{t-1} + (1 - a_t) u_t,
        y_t = W_o (h_t * silu(g_t))
    with lambda_t = softplus(W_l x_t + b_l) > 0. Why not the paper's update (CTRNNMemory): that one
    is a nonlinear RNN, a Python loop over T (times K Euler steps) that is too slow to train on a
    CPU; this one is linear in h, so it runs as a chunked parallel scan in O(log T) parallel steps,
    while keeping the time gap in the decay.
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.chunk = cfg.wm_chunk

    def forward(self, x, dtau, scan=None):
        """x: (B, T, d), dtau: (B, T) time gaps -> (B, T, d). scan: override the scan (tests)."""
        return self.extend(x, dtau, None, scan)[0]

    def extend(self, x, dtau, h=None, scan=None):
        """The same, on from the state h (B, d) after earlier tokens (None: the start) -> y
        (B, T, d) and the state after x, h (B, d). From the start by the chunked scan (training, a
        prompt); from a state by the plain recurrence (generation, a token at a time)."""
        u, rate, g = self.in_proj(x).float().chunk(3, dim=-1)  # fp32 under autocast: products of
        log_a = -dtau[..., None] * F.softplus(rate)             # decays lose bf16's 8 bits fast
        xin = -torch.expm1(log_a) * u                                    # (1 - a_t) u_t, (B, T, d)
        if h is not None:
            h = gated_scan_sequential(log_a, xin, h)                     # h_t, (B, T, d)
        else:
            h = scan(log_a, xin) if scan else gated_scan_chunked(log_a, xin, self.chunk)
        return self.out_proj((h * F.silu(g)).to(x.dtype)), h[:, -1]


# ---------------------------------------------------------------------------------------------
# Episodic and semantic memory.

class EpisodicMemory(nn.Module):
    """Causal softmax attention over a window, for the routed tokens (r_E). Keys and values for
    every token (O(T d^2)); queries, scores and sums for routed ones only, by the implementation
    cfg.attn_impl names (resolved per call by attention_impl), except attn_impl="dense", a
    reference that computes every query and keeps the routed rows. In generation the keys and
    values of the last `window` tokens wait in a ring (ring, step), so memory is bounded by the
    window, not by the sequence."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.window, self.impl = cfg.n_head, cfg.window, cfg.attn_impl
        if self.impl == "kernel" and triton_attention() is None:
            raise ConfigError("config attn_impl='kernel': triton is not installed (Linux only); "
                              "use 'auto' or 'twin'")
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_embd)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, u, ran, all_routed=False, cache=None, pos=0):
        """u: (B, T, d); ran: (B, T) bool, the tokens that run attention; all_routed: ran is True
        everywhere (router_mode "always") -> r_E: (B, T, d), zero where attention did not run.
        cache: in generation, the layer's LayerCache, whose rings this call fills (a prompt: it
        has none yet) or reads and writes (a step: the token at position pos, T = 1)."""
        B, T, d = u.shape
        H, D = self.n_head, d // self.n_head
        k, v = self.kv_proj(u).view(B, T, 2, H, D).permute(2, 0, 3, 1, 4)      # (B, H, T, D) each
        if cache is not None and cache.k is not None:
            return self.step(u, ran, all_routed, k, v, cache, pos)
        if cache is not None:
            cache.k, cache.v = self.ring(k), self.ring(v)
        impl = attention_impl(self.impl, u.is_cuda, D, all_routed)
        if impl == "dense":  # every query in one SDPA call; the rows that did not run are dropped
            q = self.q_proj(u).view(B, T, H, D).transpose(1, 2)                  # (B, H, T, D)
            y = dense_attention(q, k, v, self.window).transpose(1, 2).reshape(B, T, d)
            return torch.where(ran[..., None], self.out_proj(y), 0.0).to(u.dtype)
        b_idx, t_idx = ran.nonzero(as_tuple=True)                               # sorted by (b, t)
        q = self.q_proj(u[b_idx, t_idx]).view(-1, H, D)                          # (M, H, D)
        attend = routed_attention if impl == "twin" else triton_attention()
        y = self.out_proj(attend(q, k, v, b_idx, t_idx, self.window).reshape(-1, d))  # (M, d)
        return u.new_zeros(B, T, d).index_put((b_idx, t_idx), y.to(u.dtype))

    def ring(self, x):
        """x: (B, H, T, D), a prompt's keys or values -> (B, H, window, D), the last `window` of
        them, token t in slot t % window: the layout step keeps writing."""
        B, H, T, D = x.shape
        ring = x.new_zeros(B, H, self.window, D)
        t = torch.arange(max(0, T - self.window), T, device=x.device)
        ring[:, :, t % self.window] = x[:, :, t]
        return ring

    def step(self, u, ran, all_routed, k, v, cache, pos):
        """One token at position pos: u (B, 1, d), ran (B, 1), its k, v (B, H, 1, D) -> r_E
        (B, 1, d). Its key and value overwrite slot pos % window, the token that has just left the
        window; the rows that route here attend to slots 0 .. n-1, n = min(pos + 1, window): until
        the ring is full those are tokens 0 .. pos, after that all of it, in ring order, which
        softmax does not see."""
        B, _, d = u.shape
        H, D = self.n_head, d // self.n_head
        cache.k[:, :, pos % self.window] = k[:, :, 0]
        cache.v[:, :, pos % self.window] = v[:, :, 0]
        n = min(pos + 1, self.window)
        keys, values = cache.k[:, :, :n], cache.v[:, :, :n]                     # (B, H, n, D)
        r_E = u.new_zeros(B, 1, d)
        # the rows that attend (M of them); when all do, no gather: a copy of the rings would
        # cost more than the attention (all_routed: no wait for the device either)
        rows = None if all_routed else ran[:, 0].nonzero(as_tuple=True)[0]      # (M,)
        if rows is not None and len(rows) == 0:
            return r_E
        if rows is not None and len(rows) < B:
            u, keys, values = (x.index_select(0, rows) for x in (u, keys, values))
        else:
            rows = slice(None)
        M = u.shape[0]
        q = self.q_proj(u).view(M, 1, H, D).transpose(1, 2)                     # (M, H, 1, D)
        y = F.scaled_dot_product_attention(q, keys, values)                     # (M, H, 1, D)
        attention_work["queries"] += M
        attention_work["scores"] += M * H * n
        r_E[rows] = self.out_proj(y.transpose(1, 2).reshape(M, 1, d)).to(u.dtype)
        return r_E


class SemanticMemory(nn.Module):
    """f_sem: a low-rank MLP, d -> rank (= d/16) -> d, trained toward sg(r_E) by consolidation.
    Where attention's answer to a recurring query has been learned into these weights, the router
    can send that query here instead, at the cost of two small matmuls instead of a retrieval."""

    def __init__(self, cfg):
        super().__init__()
        self.down = nn.Linear(cfg.n_embd, cfg.rank)
        self.up = nn.Linear(cfg.rank, cfg.n_embd)

    def forward(self, u):
        """u: (B, T, d) -> f_sem(u): (B, T, d)."""
        return self.up(F.gelu(self.down(u)))


# ---------------------------------------------------------------------------------------------
# The router: what each mode means (one table), the network, and the decision.

@dataclass(frozen=True)
class RouterMode:
    """What one router mode means: Block.forward and route() read the mode from this alone."""
    attention: str      # who decides EPISODIC: "router" chooses freely, "all" forces it on
                        # every token, "none" forbids it, "every_k" forces it on every
                        # fixed_every-th token of the sequence and forbids it elsewhere,
                        # "budget" gives it to the attn_budget share of each sequence that
                        # scores highest (Router.pick; its score scales attention's output)
                        # (WORKING vs SEMANTIC is still the router's choice)
    reads_q: bool       # the router's input includes the q-head's estimate q_hat
    consolidates: bool  # the consolidation loss trains f_sem and the q-head learns q
    spot_checks: bool   # in training, a share eps of the other tokens also runs attention
    penalty: str        # compute penalty on P(EPISODIC): "q" charges it in proportion to q_hat
                        # (an unconsolidated retrieval keeps attention free), "flat" always,
                        # "controlled" flat with a weight steered to a budget, "none" nothing
    semantic: bool = True  # SEMANTIC is a tier the router may choose; False: the other two
    score: str = "gate"    # how a "budget" router's score learns: "gate", its sigmoid scales
                           # attention's output (MoD); "measured", a regression on the measured
                           # sensitivity of the loss to attention's output (Sensitivity); "gain",
                           # on the loss it saves, signed


ROUTER_MODES = {  # the paper's router, its ablations, three baselines, four budgeted routers
    "learned": RouterMode("router", reads_q=True, consolidates=True, spot_checks=True,
                          penalty="q"),
    "no_q": RouterMode("router", reads_q=False, consolidates=True, spot_checks=True, penalty="q"),
    "flat_penalty": RouterMode("router", reads_q=True, consolidates=True, spot_checks=True,
                               penalty="flat"),
    "no_semantic": RouterMode("router", reads_q=True, consolidates=True, spot_checks=True,
                              penalty="q", semantic=False),
    # the paper's "w/o consolidation"; not static in theory/lower_bound.py's sense: trained with
    # the model, it has seen the pool (Theorem 2 covers "fixed", "always" and "never" only)
    "no_consolidation": RouterMode("router", reads_q=False, consolidates=False, spot_checks=True,
                                   penalty="flat"),
    "always": RouterMode("all", reads_q=True, consolidates=True, spot_checks=False,
                         penalty="none"),
    "never": RouterMode("none", reads_q=True, consolidates=True, spot_checks=False,
                        penalty="none"),
    "fixed": RouterMode("every_k", reads_q=True, consolidates=True, spot_checks=False,
                        penalty="none"),
    # Mixture-of-Depths' capacity routing (arXiv 2404.02258): a fixed budget, so the share on
    # attention cannot collapse, and the router is left to learn which tokens fill it
    "capacity": RouterMode("budget", reads_q=True, consolidates=True, spot_checks=True,
                           penalty="none"),
    # the same budget, the score taught by a target measured where attention ran: the tokens whose
    # loss attention's output moves most, helping or not yet (a query before attention can recall)
    "measured": RouterMode("budget", reads_q=True, consolidates=True, spot_checks=True,
                           penalty="none", score="measured"),
    # the same measurement with its sign: the tokens where attention's output lowers the loss
    # most. On text the unsigned target also ranks high the tokens where attention hurts
    "gain": RouterMode("budget", reads_q=True, consolidates=True, spot_checks=True,
                       penalty="none", score="gain"),
    # the paper's router with its compute weight a Lagrange multiplier, raised while the mean
    # P(EPISODIC) is above attn_budget and lowered below it, through 0 to a subsidy (dual ascent):
    # a target, not a price
    "controlled": RouterMode("router", reads_q=True, consolidates=True, spot_checks=True,
                             penalty="controlled"),
}


class Router(nn.Module):
    """Three-way Gumbel-softmax router over the tiers with straight-through hard decisions.

    The paper routes on q, but q needs r_E, i.e. attention would have to run before the router
    could skip it. Here a q-head predicts q from the hidden state alone; it
    learns from the tokens where r_E is known (routed plus spot checks) and the router reads its
    estimate q_hat. The q-head is a probe: it sees u detached, so it never reshapes the model.
    """

    def __init__(self, cfg):
        super().__init__()
        self.q_head = nn.Linear(cfg.n_embd, 1)
        self.logits = nn.Linear(cfg.n_embd + 1, 3)
        mode = ROUTER_MODES[cfg.router_mode]
        # the initial P(EPISODIC); under a budget the EPISODIC logit is a score whose sigmoid
        # scales attention's output (or a regression), so it starts at 0, where that learns fastest
        self.attn_prior = None if mode.attention == "budget" else cfg.attn_prior
        if mode.attention == "budget":  # the causal cut of evaluation and generation, from
            self.register_buffer("threshold", torch.tensor(0.0))  # where the scores start

    def pick(self, score, budget):
        """Budget routing (capacity, measured, gain), score (B, T) the EPISODIC logit -> (B, T)
        bool, the tokens that run attention. In training the top ceil(budget T) of each sequence
        (MoD's top-k: it sees the whole sequence), and the threshold follows the score that a share
        budget of the batch's tokens reaches (a moving average); in evaluation and generation every
        token scoring above the threshold, which is causal and spends the budget on average."""
        if not self.training:
            return score > self.threshold
        k = max(1, math.ceil(budget * score.shape[1]))
        top = score.detach().topk(k, dim=-1)
        with torch.no_grad():
            flat = score.detach().float().flatten()
            cut = flat.kthvalue(max(1, flat.numel() - math.ceil(budget * flat.numel()) + 1)).values
            self.threshold.lerp_(cut, 0.05)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top.indices, True)

    def forward(self, u, reads_q=True):
        """u: (B, T, d) -> logits (B, T, 3) over (WORKING, EPISODIC, SEMANTIC), and q_logit
        (B, T), the q-head's logit: q_hat = sigmoid(q_logit), kept as a logit so that its loss is
        autocast-safe BCE."""
        q_logit = self.q_head(u.detach()).squeeze(-1)
        q_in = torch.sigmoid(q_logit).detach() if reads_q else torch.zeros_like(q_logit)
        x = torch.cat([u, q_in[..., None].to(u.dtype)], -1)
        logits = self.logits(x)
        return logits, q_logit


class Sensitivity(torch.autograd.Function):
    """The identity on the residual stream h (B, T, d) after attention, whose backward pass also
    measures, at each token where attention ran, dL/dh_t . r_E_t: to first order how the loss
    moves when attention's output r_E_t is added there (picked or spot check alike, since dL/dh_t
    exists at every token). The target s_t is how far it moves, log |dL/dh_t . r_E_t|, or, signed,
    how much it lowers the loss, asinh(-dL/dh_t . r_E_t / its mean size) (asinh: log-like tails,
    both signs). The score gets the gradient of weight * mean over those tokens of
    (score - s_hat)^2 / 2, s_hat being s standardised over them (top-k only needs the order, and
    the loss's scale drifts over training). The measurement needs the backward pass, so the target
    is taught in it, with no second forward."""

    @staticmethod
    def forward(ctx, h, r_E, score, ran, weight, signed=False):
        ctx.save_for_backward(r_E, score, ran)
        ctx.weight, ctx.signed = weight, signed
        return h.view_as(h)

    @staticmethod
    def target(g, r_E, ran, signed):
        """s (B, T) from dL/dh g (B, T, d), 0 where attention did not run (r_E: any value there,
        the kernel computes none)."""
        dot = torch.where(ran, (g.float() * r_E.float()).sum(-1), 0.0)
        if signed:
            return torch.asinh(-dot / (dot.abs().sum() / ran.sum()).clamp_min(1e-30))
        return torch.where(ran, dot.abs().clamp_min(1e-30).log(), 0.0)

    @staticmethod
    def backward(ctx, g):
        r_E, score, ran = ctx.saved_tensors
        n = ran.float().sum()
        if n < 2:
            return g, None, torch.zeros_like(score), None, None, None
        s = Sensitivity.target(g, r_E, ran, ctx.signed)                                # (B, T)
        mean = s.sum() / n
        std = (torch.where(ran, s - mean, 0.0).pow(2).sum() / (n - 1)).sqrt().clamp_min(1e-6)
        grad = torch.where(ran, score - (s - mean) / std, 0.0)
        return g, None, ctx.weight * grad / n, None, None, None


def route(logits, mode, tau, training, fixed_every, offset=0, picked=None):
    """The router's decision z (B, T, 3), one-hot over (WORKING, EPISODIC, SEMANTIC), from logits
    (B, T, 3): a straight-through Gumbel-softmax sample in training, the argmax in evaluation, with
    EPISODIC forced or forbidden as mode.attention (a RouterMode) says. offset: the absolute
    position of the first of the T tokens (generation's steps), for "every_k", which forces
    positions fixed_every-1, 2 fixed_every-1, ... of the whole sequence; picked: (B, T) bool,
    the tokens "budget" forces (Router.pick)."""
    B, T, _ = logits.shape
    if mode.attention == "all":
        return F.one_hot(torch.full((B, T), EPISODIC, device=logits.device), 3).to(logits.dtype)
    forced = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
    if mode.attention != "router" or not mode.semantic:
        logits = logits.clone()
        if mode.attention != "router":  # "none", "every_k": not the router's choice
            logits[..., EPISODIC] = float("-inf")
        if not mode.semantic:
            logits[..., SEMANTIC] = float("-inf")
        if mode.attention == "every_k":
            forced[:, (-offset - 1) % fixed_every::fixed_every] = True  # (offset + t + 1) % k == 0
        if mode.attention == "budget":
            forced = picked
    if training:
        z = F.gumbel_softmax(logits, tau=tau, hard=True)
    else:
        z = F.one_hot(logits.argmax(-1), 3).to(logits.dtype)
    if mode.attention in ("every_k", "budget"):  # EPISODIC on the forced tokens, on the device
        e_hot = torch.zeros_like(z)
        e_hot[..., EPISODIC] = 1
        z = torch.where(forced[..., None], e_hot, z)
    return z


# ---------------------------------------------------------------------------------------------
# The layer and the model.

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        """x: (B, T, d) -> (B, T, d), nanoGPT's MLP."""
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One CRAM layer:
        h   = x + WM(ln1(x), dtau)                      working memory, every token
        u   = ln2(h);  z = route(u, q_hat(u))           decision over (WORKING, EPISODIC, SEMANTIC)
        h   = h + z_E r_E(u) + z_S f_sem(u)             WORKING adds nothing more
        out = h + MLP(ln3(h))                             (without cfg.mlp: out = h)
    r_E is used only where the router chose EPISODIC, plus (in training) a spot-check sample whose
    output is not added: z_E = 0 there, but it gives the consolidation targets and, through the
    straight-through z_E, the router's gradient for attention on tokens it did not pick.
    Generation runs the same equations with a LayerCache: the working memory goes on from its
    state, attention reads the cached keys (see CRAM.step).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.ln3 = nn.LayerNorm(cfg.n_embd) if cfg.mlp else None
        self.wm = {"gated": lambda: GatedCTMemory(cfg), "ctrnn": lambda: CTRNNMemory(cfg),
                   "palimpsa": lambda: PalimpsaMemory(cfg),
                   "mamba2": lambda: PalimpsaMemory(cfg, metaplastic=False),
                   "conv": lambda: ShortConvMemory(cfg), "none": lambda: None}[cfg.wm_kind]()
        self.episodic = EpisodicMemory(cfg)
        self.semantic = SemanticMemory(cfg)
        self.router = Router(cfg)
        self.mlp = MLP(cfg) if cfg.mlp else None

    def forward(self, x, dtau, tau, mode, losses=True, cache=None, pos=0, share=None):
        """x: (B, T, d), dtau: (B, T) time gaps, mode: a RouterMode -> (B, T, d), this layer's loss
        terms (0-dim tensors; none unless losses) and its routing: z (B, T, 3) and q_hat (B, T),
        detached. cache: in generation, this layer's LayerCache, updated in place; pos: the
        absolute position of x's first token; share: the budget router's share of tokens on
        attention for this call (cfg.attn_budget when None)."""
        cfg = self.cfg
        if self.wm is None:  # "none": a transformer block
            h = x
        elif cache is None:
            h = x + self.wm(self.ln1(x), dtau)
        else:  # on from the state before x (None before a prompt); keep the one after
            y, cache.wm = self.wm.extend(self.ln1(x), dtau, cache.wm)
            h = x + y
        u = self.ln2(h)
        logits, q_logit = self.router(u, mode.reads_q)
        # fp32 under autocast: bf16 Gumbel draws tie
        logits, q_hat = logits.float(), torch.sigmoid(q_logit.float())
        budget = mode.attention == "budget"
        share = cfg.attn_budget if share is None else share
        picked = self.router.pick(logits[..., EPISODIC], share) if budget else None
        z = route(logits, mode, tau, self.training, cfg.fixed_every, pos, picked)
        routed = z[..., EPISODIC] > 0
        spot = torch.zeros_like(routed)       # attention runs there too, its output not added
        if self.training and mode.spot_checks and cfg.spot_check > 0:
            spot = ~routed & (torch.rand(routed.shape, device=x.device) < cfg.spot_check)
        ran = routed | spot                                              # attention runs, (B, T)
        r_E = self.episodic(u, ran, mode.attention == "all", cache, pos)           # (B, T, d)
        f_sem = self.semantic(u)                                                 # (B, T, d)
        z_E = z[..., EPISODIC]
        if budget and mode.score == "gate":  # the score scales attention's output (MoD), so the
            # task loss teaches it
            gate = torch.sigmoid(logits[..., EPISODIC])
            # where attention ran but was not picked, gate - sg(gate) adds nothing yet sends the
            # score dL/d(output) . r_E, what attention would have been worth there: without it a
            # token left out of the top-k never learns that it should have been in
            z_E = z_E * gate + spot * (gate - gate.detach())
        h = h + (z_E[..., None] * r_E + z[..., SEMANTIC, None] * f_sem).to(h.dtype)
        if budget and mode.score != "gate" and self.training and losses:
            h = Sensitivity.apply(h, r_E.detach(), logits[..., EPISODIC], ran, cfg.w_qhead,
                                  mode.score == "gain")
        out = h + self.mlp(self.ln3(h)) if self.mlp is not None else h
        routing = dict(z=z.detach().float(), q_hat=q_hat.detach().float())
        if not losses:  # inference: no consolidation targets to compare, nothing to charge
            return out, {}, routing

        zero = u.new_zeros((), dtype=torch.float32)
        if mode.consolidates:
            terms = self.consolidation(u, r_E, ran, q_logit)
        else:
            terms = dict(consol=zero, qhead=zero)
        # compute penalty on the router's attention probability, as the mode's row says
        p_E = logits.softmax(-1)[..., EPISODIC]
        charge = p_E * q_hat.detach() if mode.penalty == "q" else p_E
        terms["compute"] = zero if mode.penalty == "none" else charge.mean()
        return out, terms, routing

    def consolidation(self, u, r_E, ran, q_logit):
        """Over the tokens where attention ran: the consolidation loss ||f_sem(u) - sg(r_E)||^2,
        which moves only f_sem, and the q-head's BCE toward q = exp(-err / (sigma^2 spread)).
        Masked means rather than gathers, so nothing waits for the device; q needs the spread of
        r_E over at least two tokens, so with fewer both terms are 0."""
        m = ran.float()                                                           # (B, T)
        n = m.sum().clamp_min(1)
        r = r_E.detach().float()
        err = (self.semantic(u.detach()).float() - r).pow(2).mean(-1)             # (B, T)
        # errors relative to the spread of r_E: early on attention's outputs are near zero,
        # and an absolute error would call that trivially "consolidated" (q ~ 1 everywhere)
        r_mean = (r * m[..., None]).sum((0, 1)) / n                               # (d,)
        spread = ((r - r_mean).pow(2).mean(-1) * m).sum() / n + 1e-12
        q = torch.exp(-err.detach() / (self.cfg.sigma2 * spread))                  # q_t, (B, T)
        bce = F.binary_cross_entropy_with_logits(q_logit.float(), q, reduction="none")
        enough = (m.sum() > 1).float()
        return dict(consol=enough * (err * m).sum() / n, qhead=enough * (bce * m).sum() / n)


class CRAM(nn.Module):
    """Embeddings, n_layer Blocks, the heads and the losses. forward runs a whole sequence in
    parallel; prefill and step run it incrementally for generation (same equations, same output)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.cont_proj = nn.Linear(cfg.n_cont, cfg.n_embd) if cfg.n_cont else None
        self.pos_emb = nn.Embedding(cfg.n_positions, cfg.n_embd) if cfg.n_positions else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.router_mode == "controlled":  # the multiplier starts at 0: no price or subsidy
            self.register_buffer("compute_weight", torch.tensor(0.0))
        self.pred_head = nn.Linear(cfg.n_embd, cfg.n_pred) if cfg.n_pred else None
        self.apply(self._init)
        with torch.no_grad():  # scaled, not redrawn: the default draws the same numbers as before
            for emb in (self.tok_emb, self.pos_emb):
                if emb is not None:
                    emb.weight.mul_(cfg.emb_std / 0.02)

    @staticmethod
    def _init(m):
        """nanoGPT's init, then the tiers' own; apply() visits a module after its children."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            # zero biases: PyTorch's default U(+-1/sqrt(fan_in)) on cont_proj (fan_in 2) is a
            # constant vector 10x larger than the token embeddings, which then drowns the key in
            # every attention score and stalls retrieval
            nn.init.zeros_(m.bias)
        if isinstance(m, GatedCTMemory):  # rates spread from slow to fast channels (S4/Mamba)
            d = m.out_proj.weight.shape[0]
            with torch.no_grad():
                m.in_proj.bias[d:2 * d] = torch.linspace(-4, 2, d)
        if isinstance(m, Router):  # start by assuming nothing is consolidated (q_hat ~ 0.12)
            nn.init.constant_(m.q_head.bias, -2.0)
            p = m.attn_prior  # softmax(0, b, 0)[EPISODIC] = p  <=>  b = log(2p / (1 - p))
            if p is not None:
                nn.init.constant_(m.logits.bias[EPISODIC], math.log(2 * p / (1 - p)))
        if isinstance(m, EpisodicMemory):
            # W_q = W_k at init, std 1/sqrt(d): a repeated key then scores ||W_q u||^2 against its
            # binding from the first step, instead of ~0 like every other key. At init on SRCD a
            # query puts 3-4x the uniform weight on its binding (1.1x untied, 1.0x with PyTorch's
            # default biases; test_at_init_a_query_attends_to_the_binding_of_its_key).
            d = m.q_proj.weight.shape[1]
            nn.init.normal_(m.q_proj.weight, std=d ** -0.5)
            with torch.no_grad():
                m.kv_proj.weight[:d].copy_(m.q_proj.weight)

    def forward(self, tokens, dtau=None, cont=None, targets=None, pred_targets=None, tau=1.0,
                router_mode=None, cache=None, share=None):
        """
        tokens: (B, T) ids, or (B, T, S) with S token slots per position whose embeddings are
        summed (SRCD puts key and value of a binding at one position); dtau: (B, T) time gaps
        (default 1);
        cont: (B, T, n_cont) continuous inputs, needed when cfg.n_cont > 0; targets: (B, T) ids,
        -1 = no target; pred_targets: (B, T, n_pred) regression targets, NaN = no target; tau: the
        router's temperature; router_mode: a key of ROUTER_MODES for this call only (train.py's
        attention warm-up). Returns a dict: logits (B, T, V); pred (B, T, n_pred) or None;
        routing: z (L, B, T, 3) and q_hat (L, B, T), detached, for routing_stats; with targets
        also loss (scalar) and terms (each loss term, a detached 0-dim tensor). Nothing here
        copies a value to the host: the caller reads what it logs, when it logs. cache: a Cache,
        for generation (prefill, step): x's tokens follow the cache's, which takes x's in place.
        share: the budgeted routers' share of tokens on attention for this call, attn_budget when
        None (train.py's schedule lowers it from 1 to the budget: --attn_warmup, --attn_anneal).
        """
        pos = 0 if cache is None else cache.pos                 # the absolute position of token 0
        self.check_inputs(tokens, dtau, cont, targets, pred_targets, cache)
        cfg = self.cfg
        mode = ROUTER_MODES[router_mode or cfg.router_mode]
        if tokens.dim() == 2:
            tokens = tokens[..., None]
        B, T, _ = tokens.shape
        dtau = torch.ones(B, T, device=tokens.device) if dtau is None else dtau
        x = self.tok_emb(tokens).sum(2)                                          # (B, T, d)
        if self.cont_proj is not None:
            x = x + self.cont_proj(cont)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=tokens.device))
        x = self.drop(x)
        terms, routing = {}, []
        for i, block in enumerate(self.blocks):
            x, t, r = block(x, dtau, tau, mode, losses=targets is not None,
                            cache=None if cache is None else cache.layers[i], pos=pos,
                            share=share)
            terms = {k: terms.get(k, 0) + v for k, v in t.items()}
            routing.append(r)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        logits = self.lm_head(x)
        pred = self.pred_head(x) if self.pred_head is not None else None
        out = dict(logits=logits, pred=pred,
                   routing={k: torch.stack([r[k] for r in routing]) for k in routing[0]})
        if targets is not None:
            terms = {k: v / cfg.n_layer for k, v in terms.items()}
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                                 reduction="sum")
            terms["ce"] = ce / (targets >= 0).sum().clamp_min(1)  # 0, not NaN, with no targets
            terms["mse"] = logits.new_zeros((), dtype=torch.float32)
            if pred is not None and pred_targets is not None:
                have = ~pred_targets.isnan()
                err = torch.where(have, pred.float() - pred_targets.nan_to_num(), 0.0)
                terms["mse"] = err.pow(2).sum() / have.sum().clamp_min(1)
            w_compute = cfg.w_compute
            if mode.penalty == "controlled":
                w_compute = self.compute_weight.clone()  # this step's price; then the dual step
                if self.training:  # two-sided: below the target the weight turns negative, a
                    # subsidy, so the share is held at the target rather than only capped by it
                    target = cfg.attn_budget if share is None else share
                    with torch.no_grad():
                        self.compute_weight.add_(cfg.budget_lr * (terms["compute"] - target))
            out["loss"] = (terms["ce"] + cfg.w_pred * terms["mse"] + cfg.w_consol * terms["consol"]
                           + cfg.w_qhead * terms["qhead"] + w_compute * terms["compute"])
            out["terms"] = {k: v.detach() for k, v in terms.items()}
        return out

    @torch.no_grad()
    def prefill(self, tokens, dtau=None, cont=None):
        """Generation, first the prompt, in parallel: tokens (B, T) or (B, T, S), dtau (B, T),
        cont (B, T, n_cont) -> forward's output for it (logits (B, T, V), pred, routing) and a
        Cache of every layer's state after it. In eval mode: the router takes its argmax."""
        cache = Cache(0, [LayerCache() for _ in self.blocks])
        return self(tokens, dtau, cont, cache=cache), cache

    @torch.no_grad()
    def step(self, tokens, dtau=None, cont=None, cache=None):
        """Then one token at a time: tokens (B, 1) or (B, 1, S), dtau (B, 1), cont (B, 1, n_cont)
        at position cache.pos -> forward's output for it (logits (B, 1, V), pred (B, 1, n_pred)
        or None, routing z (L, B, 1, 3) and q_hat (L, B, 1)) and the cache, updated in place.
        Every working memory goes on from its state (a fixed size), and attention runs only in
        the rows and layers whose router chose EPISODIC, against the cached keys: the same
        equations as forward on the whole sequence, which gives the same logits and routing."""
        return self(tokens, dtau, cont, cache=cache), cache

    def check_inputs(self, tokens, dtau, cont, targets, pred_targets, cache=None):
        """One clear line for inputs that do not fit this model, before anything deep fails. A
        ConfigError (a ValueError), so train.py prints it as one line: a shape that does not fit
        the config, such as --n_positions below the sequence length, is a setting to change."""
        def fail(msg):
            raise ConfigError(f"CRAM.forward: {msg}")
        cfg = self.cfg
        if tokens.dim() not in (2, 3) or tokens.is_floating_point():
            fail(f"tokens must be integer ids (B, T) or (B, T, S); got {tuple(tokens.shape)} "
                 f"{tokens.dtype}")
        B, T = tokens.shape[:2]
        pos = 0 if cache is None else cache.pos
        if cfg.n_positions and pos + T > cfg.n_positions:
            fail(f"{pos + T} tokens, but position embeddings for n_positions={cfg.n_positions} "
                 "only")
        if cache is not None and self.training:
            fail("generation (a cache) decides as in evaluation: call model.eval() first")
        if cache is not None and pos > 0 and T != 1:
            fail(f"a step takes one token after the prompt; got {T}")
        if cfg.n_cont and cont is None:
            fail(f"this model reads n_cont={cfg.n_cont} continuous inputs per token: pass cont "
                 f"({B}, {T}, {cfg.n_cont})")
        want = dict(dtau=(B, T), cont=(B, T, cfg.n_cont), targets=(B, T),
                    pred_targets=(B, T, cfg.n_pred))
        given = dict(dtau=dtau, cont=cont, targets=targets, pred_targets=pred_targets)
        for name, x in given.items():
            if x is not None and tuple(x.shape) != want[name]:
                fail(f"{name} has shape {tuple(x.shape)}; with tokens {tuple(tokens.shape)} and "
                     f"n_cont={cfg.n_cont}, n_pred={cfg.n_pred} it must be {want[name]}")

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


@dataclass
class LayerCache:
    """One layer's memory of the tokens so far, for generation."""
    wm: object = None         # the working memory's state, as its extend returns it: gated and
                              # ctrnn h (B, d); conv its last inputs; palimpsa (conv inputs, M,
                              # Ibar); mamba2 (conv inputs, M, None); wm_kind="none": None
    k: torch.Tensor = None    # (B, H, window, D): the last `window` tokens' keys, token t in slot
    v: torch.Tensor = None    # t % window (EpisodicMemory.ring); the values, laid out as k


@dataclass
class Cache:
    """What generation carries from one token to the next: a fixed size per sequence, bounded
    by the window, not by the number of tokens."""
    pos: int                  # tokens seen: the absolute position of the next one
    layers: list              # a LayerCache per layer

    def nbytes(self):
        """(bytes of the working memories' states, bytes of the key and value rings), all rows."""
        def size(x):
            if isinstance(x, (tuple, list)):
                return sum(size(y) for y in x)
            return x.numel() * x.element_size() if torch.is_tensor(x) else 0
        return (sum(size(c.wm) for c in self.layers), sum(size((c.k, c.v)) for c in self.layers))


# ---------------------------------------------------------------------------------------------
# Routing statistics: tensors, read by the caller on log steps.

def attended(z):
    """z (L, B, T, 3) -> (B, T) float: 1 where the token used attention in at least one layer."""
    return (z[..., EPISODIC].amax(0) > 0).float()


def routing_stats(routing):
    """From forward's routing tensors: attn_frac, the share of tokens that used attention in at
    least one layer (the paper's attention compute); attn_pair_frac, the share of (token, layer)
    pairs; sem_frac; per layer the share of tokens on each tier and the mean q_hat. 0-dim
    tensors."""
    z, q_hat = routing["z"], routing["q_hat"]                 # (L, B, T, 3), (L, B, T)
    stats = dict(attn_frac=attended(z).mean(), attn_pair_frac=z[..., EPISODIC].mean(),
                 sem_frac=z[..., SEMANTIC].mean())
    for i in range(z.shape[0]):
        for j, tier in enumerate(TIERS):
            stats[f"L{i}_{tier}"] = z[i, ..., j].mean()
        stats[f"L{i}_q"] = q_hat[i].mean()
    return stats


def class_stats(routing, classes):
    """Per token class, classes = {name: (B, T) bool mask}: attn_<name>, the share of its tokens
    that used attention in any layer; sem_<name>, its share of (token, layer) pairs on semantic
    memory; q_<name>, its mean q_hat. 0-dim tensors, NaN for a class with no tokens."""
    z, q_hat = routing["z"], routing["q_hat"]                 # (L, B, T, 3), (L, B, T)
    any_attn = attended(z)                                    # (B, T)
    stats = {}
    for name, mask in classes.items():
        m = mask.float()
        n = m.sum()
        stats[f"attn_{name}"] = (any_attn * m).sum() / n
        stats[f"sem_{name}"] = (z[..., SEMANTIC] * m).sum() / (n * len(z))
        stats[f"q_{name}"] = (q_hat * m).sum() / (n * len(z))
    return stats


def router_tau(cfg, frac):
    """Temperature at a fraction frac in [0, 1] of training: geometric from tau_start to tau_end."""
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** min(max(frac, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# Alternative working memories (wm_kind): the paper's CT-RNN, a short convolution, and
# Palimpsa with its Mamba2-style limit. Each has GatedCTMemory's forward(x, dtau) -> y and
# extend(x, dtau, state) -> (y, state), the state a generation step carries on from.

class CTRNNMemory(nn.Module):
    """The paper's working memory (arXiv 2602.12204, the CT-ODE expert), K Euler steps of size
    dt = 1/K per token:
        h^(k+1) = h^(k) + dt sigmoid(W_tau log(1 + dtau_t)) * tanh(W1 h^(k) + W2 x_t)
    A nonlinear RNN: exact to the paper, sequential, slow. Select with wm_kind="ctrnn"."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.W1 = nn.Linear(d, d, bias=False)
        self.W2 = nn.Linear(d, d)
        self.W_tau = nn.Linear(1, d)
        self.out_proj = nn.Linear(d, d)
        self.K = cfg.ctrnn_steps

    def step(self, h, x_t, dtau_t):
        """One token: h (B, d), x_t (B, d), dtau_t (B,) -> the next h (B, d)."""
        rate = torch.sigmoid(self.W_tau(torch.log1p(dtau_t)[:, None]))  # time-gap gate
        drive, dt = self.W2(x_t), 1 / self.K                             # dt: the Euler step
        for _ in range(self.K):
            h = h + dt * rate * torch.tanh(self.W1(h) + drive)
        return h

    def forward(self, x, dtau):
        """x: (B, T, d), dtau: (B, T) time gaps -> (B, T, d), one token at a time."""
        return self.extend(x, dtau)[0]

    def extend(self, x, dtau, h=None):
        """The same, on from the state h (B, d) (None: the start, h = 0) -> y (B, T, d) and the
        state after x, h (B, d)."""
        h, out = x.new_zeros(x.shape[0], x.shape[2]) if h is None else h, []
        for t in range(x.shape[1]):
            h = self.step(h, x[:, t], dtau[:, t])
            out.append(h)
        return self.out_proj(torch.stack(out, 1)), h


def causal_conv(x, weight, past=None):
    """Depthwise causal convolution over time: x (B, T, C), weight (C, w) -> y (B, T, C), y_t sees
    x_{t-w+1} .. x_t; and the last w-1 inputs (B, w-1, C), the next call's past. past: the w-1
    inputs before x (None: zeros, the sequence starts here). The short convolution gated linear
    attention layers put before q, k, v."""
    w = weight.shape[1]
    xt = x.transpose(1, 2)                                                        # (B, C, T)
    xt = F.pad(xt, (w - 1, 0)) if past is None else torch.cat([past.transpose(1, 2), xt], 2)
    y = F.conv1d(xt, weight[:, None], groups=x.shape[2]).transpose(1, 2)
    return y, xt[..., xt.shape[2] - (w - 1):].transpose(1, 2)


class ShortConvMemory(nn.Module):
    """wm_kind="conv": a gated short causal convolution after Zoology's BaseConv with a kernel of 3
    (which gates the convolved input itself, with no projections around it),
        y_t = W_o ((w_0 u_t + w_1 u_{t-1} + w_2 u_{t-2}) * g_t),   u = W_u x, g = W_g x.
    It holds nothing beyond two tokens back, so as a working memory it recalls nothing; what it
    gives attention is the tokens just before: the attention baseline of Zoology's current MQAR
    configs is this layer then attention, with no position embeddings, and with it a value's
    position carries its key."""

    def __init__(self, cfg, width=3):
        super().__init__()
        d = cfg.n_embd
        self.in_proj = nn.Linear(d, 2 * d)
        bound = width ** -0.5                                                 # nn.Conv1d's init
        self.conv = nn.Parameter(torch.empty(d, width).uniform_(-bound, bound))
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, dtau=None):
        """x: (B, T, d) -> (B, T, d); the time gaps play no part in a convolution over tokens."""
        return self.extend(x, dtau)[0]

    def extend(self, x, dtau=None, past=None):
        """The same after the inputs past (B, width-1, d) of the convolution (None: the start)
        -> y (B, T, d) and the last width-1 inputs, the state."""
        u, g = self.in_proj(x).chunk(2, -1)
        c, past = causal_conv(u, self.conv, past)
        return self.out_proj(c * g), past


def palimpsa_scan_sequential(log_a, v, k, b, q, prior, scale, state=None, return_state=False):
    """Palimpsa's recurrence (arXiv 2602.09075), one token at a time per head (the test oracle,
    and generation's step):
        M_t = a_t M_{t-1} + v_t k_t^T,   Ibar_t = a_t Ibar_{t-1} + b_t (k_t^2)^T,
        mu_t = M_t / (Ibar_t + I_prior),   y_t = scale * mu_t q_t
    with M = I * mu and Ibar = I - I_prior carried instead of mu and I. log_a: (B, T, H); v, b:
    (B, T, H, Dv); k, q: (B, T, H, Dk) -> y (B, T, H, Dv). b = 0 keeps Ibar = 0: gated linear
    attention with the decay a_t (Mamba2's, in the authors' parametrisation); b = None skips it.
    state: (M, Ibar), each (B, H, Dv, Dk) or Ibar None, before the first token (None: zeros);
    return_state: also return the state after the last token, Ibar None when b is None."""
    B, T, H, Dv = v.shape
    M, Ibar = state if state is not None else (v.new_zeros(B, H, Dv, k.shape[-1]), None)
    Ibar = torch.zeros_like(M) if Ibar is None else Ibar
    out = []
    for t in range(T):
        a = log_a[:, t].exp()[..., None, None]                                # (B, H, 1, 1)
        M = a * M + v[:, t, :, :, None] * k[:, t, :, None, :]
        if b is not None:
            Ibar = a * Ibar + b[:, t, :, :, None] * k[:, t, :, None, :] ** 2
        out.append(scale * ((M / (Ibar + prior)) @ q[:, t, :, :, None])[..., 0])
    y = torch.stack(out, 1)
    return (y, (M, Ibar if b is not None else None)) if return_state else y


def segment_decays(log_a):
    """log_a: (..., C) per-step log decays of one chunk -> W: (..., C, C), W[t, s] = exp(sum of
    log_a over s+1 .. t) for s <= t, else 0: how much of what step s wrote is left at step t.
    The sums are cumulative sums of a masked copy, not differences of one cumulative sum: a
    difference of two large sums (a long time gap) would lose the small decays between them."""
    C = log_a.shape[-1]
    below = torch.ones(C, C, dtype=torch.bool, device=log_a.device).tril(-1)  # s < t
    seg = log_a[..., :, None].expand(*log_a.shape, C).masked_fill(~below, 0.0).cumsum(-2)
    return seg.masked_fill(~below.logical_or(torch.eye(C, dtype=torch.bool, device=log_a.device)),
                           float("-inf")).exp()


def palimpsa_scan_chunked(log_a, v, k, b, q, prior, scale, chunk, return_state=False):
    """palimpsa_scan_sequential a chunk of C tokens at a time. M and Ibar share one decay per
    head, so inside a chunk every token's state is a decay-weighted sum of the chunk's inputs
    plus the decayed state the chunk started from, one matmul with the (C x C) decays W of
    segment_decays:
        M_t = sum_{s <= t} W[t, s] v_s k_s^T + exp(L_t) M_start,   L_t = log_a summed to t,
    the same for Ibar with b_s (k_s^2)^T; the chunk's last state starts the next chunk. Every
    token's state is materialised, since mu = M / (Ibar + I_prior) divides entry by entry and has
    no attention-like form (memory O(T H Dv Dk), the price of metaplasticity in plain PyTorch).
    Chunk by chunk those states stay in cache, which is what makes this form beat the token loop
    on a CPU (bench.py --memories). b = None (no importance, mamba2): linear_attention_chunked,
    which needs no per-token state. return_state: also return (M, Ibar) after the last token,
    each (B, H, Dv, Dk), Ibar None when b is None, as palimpsa_scan_sequential."""
    B, T, H, Dv = v.shape
    Dk = k.shape[-1]
    if b is None:
        y, M = linear_attention_chunked(log_a, v, k, q, chunk, return_state=True)
        y = scale / prior * y
        return (y, (M, None)) if return_state else y
    M = v.new_zeros(B, H, 1, Dv * Dk)                               # the state entering a chunk
    Ibar = torch.zeros_like(M)
    ys = []
    for s in range(0, T, chunk):
        la, v_, k_, b_, q_ = (x[:, s:s + chunk].transpose(1, 2)
                              for x in (log_a, v, k, b, q))               # (B, H, C, ...)
        W = segment_decays(la)                                             # (B, H, C, C)
        decay_in = la.cumsum(-1).exp()[..., None]                          # exp(L_t): (B, H, C, 1)
        M = W @ (v_[..., :, None] * k_[..., None, :]).flatten(-2) + decay_in * M  # (B, H, C, Dv Dk)
        Ibar = W @ (b_[..., :, None] * (k_ ** 2)[..., None, :]).flatten(-2) + decay_in * Ibar
        mu = (M / (Ibar + prior)).unflatten(-1, (Dv, Dk))
        ys.append((mu @ q_[..., None])[..., 0].transpose(1, 2))           # (B, C, H, Dv)
        M, Ibar = M[..., -1:, :], Ibar[..., -1:, :]
    y = scale * torch.cat(ys, 1)
    if not return_state:
        return y
    return y, (M.reshape(B, H, Dv, Dk).clone(), Ibar.reshape(B, H, Dv, Dk).clone())


def linear_attention_chunked(log_a, v, k, q, chunk, return_state=False):
    """Gated linear attention, y_t = sum_{s <= t} exp(L_t - L_s) (q_t . k_s) v_s, in chunks (the
    chunked form of Mamba2's SSD): inside a chunk as attention with the decays W, from earlier
    chunks through the (Dv x Dk) state entering the chunk, those states scanned across chunks by
    doubling_scan. All chunks at once: only a state per chunk is materialised. log_a: (B, T, H);
    v, k, q: (B, T, H, D) -> y (B, T, H, Dv); return_state: and the state after the last token,
    sum_s exp(L_T - L_s) v_s k_s^T, (B, H, Dv, Dk)."""
    B, T, H, Dv = v.shape
    n = -(-T // chunk)
    pad = lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (0, n * chunk - T))  # zeros: a = 1, no write
    la, v, k, q = (pad(x).view(B, n, chunk, *x.shape[2:]).transpose(2, 3)
                   for x in (log_a, v, k, q))
    W = segment_decays(la)                                                 # (B, n, H, C, C)
    L = la.cumsum(-1)                                                      # (B, n, H, C)
    y = ((q @ k.transpose(-1, -2)) * W) @ v                                # within the chunk
    ends = (v * W[..., -1, :, None]).transpose(-1, -2) @ k  # a chunk's own state, (B, n, H, Dv, Dk)
    flat = lambda x: x.transpose(1, 2).reshape(B * H, n, -1)
    ends_all = doubling_scan(flat(L[..., -1, None]), flat(ends))  # after chunk j, (B H, n, Dv Dk)
    start = F.pad(ends_all, (0, 0, 1, 0))[:, :-1]                 # entering chunk j: start_{j+1} =
    start = start.view(B, H, n, *ends.shape[-2:]).transpose(1, 2)  # a_j start_j + ends_j
    y = y + L.exp()[..., None] * (q @ start.transpose(-1, -2))             # from earlier chunks
    y = y.transpose(2, 3).reshape(B, n * chunk, H, Dv)[:, :T]
    if not return_state:
        return y
    return y, ends_all[:, -1].reshape(B, H, *ends.shape[-2:]).clone()  # padding wrote nothing


class PalimpsaMemory(nn.Module):
    """Palimpsa (arXiv 2602.09075) as working memory: multi-head gated linear attention whose every
    state entry has an importance Ibar; a synapse's learning rate is b / (Ibar + I_prior), so what
    was written hard is overwritten slowly (metaplasticity). wm_kind="palimpsa"; "mamba2" is the
    same layer with b = 0, where Ibar stays 0 and it is gated linear attention with Mamba2's decay.

    Two parametrisations of (a_t, v_t, b_t, I_prior), cfg.palimpsa_param:
      "code" (default, the authors' public code): a_t = exp(-dt_t A) per head, dt_t =
        softplus(W_dt x + b_dt), A = exp(A_log); v = bs * v', bs = sigmoid(W_bs x) per head;
        b = sigmoid(low-rank(x)) * softplus(b_scale) * bs; I_prior = 1; y = mu q / sqrt(Dk).
        The default because it is what the paper's experiments ran. At b = 0 it is gated linear
        attention with Mamba2's decay: Mamba2-style (Mamba2 itself also scales the input by dt,
        has no q/k normalisation and adds a skip term).
      "paper" (its appendix derivation): gamma = sigmoid(W_g x) per head, beta = gamma *
        sigmoid(W_b x) per value channel (W_b low rank here, d/16, as the code's b), a_t = 1 -
        gamma / N (N > 1 a learned window per head),
        v = beta * v', b = beta, I_prior = cfg.palimpsa_prior; y = mu q. As I_prior grows, Ibar
        matters less and I_prior * y tends to the plain gated linear recurrence.
    Both take the time gap: a_t is raised to the power dtau_t (log a_t * dtau_t), as the gated
    memory decays over the gap. q and k are L2-normalised per head after a short causal
    convolution (4).
    """

    def __init__(self, cfg, metaplastic=True):
        super().__init__()
        d, H = cfg.n_embd, cfg.n_head
        self.H, self.D, self.param, self.metaplastic = H, d // H, cfg.palimpsa_param, metaplastic
        code = cfg.palimpsa_param == "code"
        self.chunk, self.prior = cfg.wm_chunk, 1.0 if code else cfg.palimpsa_prior
        self.in_proj = nn.Linear(d, 4 * d)                   # q, k, v and the output gate g
        self.conv = nn.Parameter(torch.zeros(3 * d, 4))      # short causal convolution of q, k, v
        self.gate_proj = nn.Linear(d, (2 if code else 1) * H)  # code: dt and bs; paper: gamma
        if metaplastic or not code:                          # b (code) or beta (paper), low rank
            self.b_down = nn.Linear(d, max(1, d // 16))
            self.b_up = nn.Linear(max(1, d // 16), d)
        if code:
            self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))  # decay rates A
            self.b_scale = nn.Parameter(torch.zeros(H)) if metaplastic else None  # b's scale
        else:
            self.N_raw = nn.Parameter(torch.linspace(0.0, 4.0, H))  # window N = 1 + exp(N_raw)
        self.out_proj = nn.Linear(d, d)
        with torch.no_grad():
            self.conv[:, -1] = 1.0                           # starts as the identity

    def low_rank_gate(self, x):
        """sigmoid(W_up gelu(W_down x)) per head and value channel: (B, T, H, D)."""
        B, T, _ = x.shape
        return torch.sigmoid(self.b_up(F.gelu(self.b_down(x))).float()).view(B, T, self.H, self.D)

    def gates(self, x, dtau):
        """-> log_a (B, T, H), the value scale (B, T, H, 1 or D), and b (B, T, H, D) or None (no
        importance: the Ibar scan is skipped)."""
        B, T, _ = x.shape
        if self.param == "code":
            g_dt, g_bs = self.gate_proj(x).float().view(B, T, 2, self.H).unbind(2)
            dt = F.softplus(g_dt - 4.0)                      # bias -4: dt ~ 0.02 at init
            log_a = -dt * self.A_log.exp() * dtau[..., None]
            bs = torch.sigmoid(g_bs)[..., None]              # (B, T, H, 1)
            if not self.metaplastic:
                return log_a, bs, None
            return log_a, bs, self.low_rank_gate(x) * F.softplus(self.b_scale)[:, None] * bs
        gamma = torch.sigmoid(self.gate_proj(x).float())     # (B, T, H)
        log_a = torch.log1p(-gamma / (1 + self.N_raw.exp())) * dtau[..., None]
        beta = gamma[..., None] * self.low_rank_gate(x)      # (B, T, H, D)
        return log_a, beta, beta if self.metaplastic else None

    def forward(self, x, dtau, scan=None):
        """x: (B, T, d), dtau: (B, T) time gaps -> (B, T, d). scan: palimpsa_scan_sequential to
        use the twin (tests); default the chunked form."""
        return self.extend(x, dtau, None, scan)[0]

    def extend(self, x, dtau, state=None, scan=None):
        """The same, on from state = (the convolution's last 3 inputs (B, 3, 3d), M, Ibar), M and
        Ibar (B, H, D, D), Ibar None for mamba2 (None: the start) -> y (B, T, d) and the state
        after x. From the start by the chunked scan, from a state by the token loop."""
        B, T, d = x.shape
        past, M = (None, None) if state is None else (state[0], state[1:])
        qkv, g = self.in_proj(x).split([3 * d, d], -1)
        qkv, past = causal_conv(qkv, self.conv, past)                      # (B, T, 3d)
        q, k, v = F.silu(qkv).float().view(B, T, 3, self.H, self.D).unbind(2)  # (B, T, H, D)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        log_a, v_scale, b = self.gates(x, dtau)
        scale = self.D ** -0.5 if self.param == "code" else 1.0
        if M is not None:
            scan = functools.partial(palimpsa_scan_sequential, state=M)
        scan = scan or functools.partial(palimpsa_scan_chunked, chunk=self.chunk)
        with torch.autocast(x.device.type, enabled=False):  # fp32 states: autocast would run the
            y, M = scan(log_a, v * v_scale, k, b, q, self.prior, scale,  # chunks' matmuls in bf16
                        return_state=True)
        return self.out_proj((y.reshape(B, T, d) * F.silu(g.float())).to(x.dtype)), (past, *M)
