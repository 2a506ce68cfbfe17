"""
CRAM: Consolidation-based Routing for Adaptive Memory, the whole model in one file.

Every layer has three memories and a router. Working memory (a continuous-time recurrence) always
runs; per token the router adds nothing more (tier W), an exact retrieval by causal attention over
a window (tier E, episodic) or the output of a small low-rank MLP (tier S, semantic). The
consolidation loss distils attention's answers into the MLP, so recurring retrievals stop needing
attention during training, and attention is computed only for the tokens routed to it.

Classes, leaf first as in nanoGPT: CramConfig; the kernels' plain twins (routed_attention,
gated_scan_sequential / gated_scan_chunked); the tiers GatedCTMemory / CTRNNMemory (working),
EpisodicMemory, SemanticMemory; Router; Block; CRAM (embedding, layers, heads, losses, stats).

Glossary, code name -> paper symbol -> DESIGN.md:
    dt, dtau       dtau_t, the time gap since the previous observation        (sec. 3)
    CTRNNMemory    h^(k+1) = h^(k) + (1/K) sigmoid(W_tau log(1+dtau)) tanh(W1 h + W2 x)  (sec. 3;
                   the paper's inner Euler step "dt" is 1/K here)
    GatedCTMemory  h_t = a_t h_{t-1} + (1 - a_t) u_t, a_t = exp(-dtau_t lambda_t)   (sec. 4.4)
    r_E            episodic (attention) output at a token                     (sec. 3)
    f_sem          semantic memory, SemanticMemory                            (sec. 3)
    q, q_hat       consolidation quality q_t = exp(-||f_sem(h_t) - r_E||^2 / sigma^2) and the
                   q-head's estimate of it from h_t alone                      (sec. 3, 4.1)
    z              the router's straight-through one-hot decision over (W, E, S)  (sec. 3)
    eps            spot-check rate: extra attention targets during training   (sec. 4.2)
    attn_frac      share of tokens that used attention in at least one layer  (sec. 5)
"""
import math
from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

TIERS = ("working", "episodic", "semantic")
W, E, S = 0, 1, 2  # tier indices in the router's output
ROUTER_MODES = ("learned", "always", "never", "static", "fixed")
WM_KINDS = ("gated", "ctrnn")
CLASSES = ("other", "recurring", "novel")  # token classes for the routing statistics


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key and what it takes."""


@dataclass
class CramConfig:
    vocab_size: int = 512
    n_cont: int = 2          # continuous inputs per token (SRCD: previous observation, log gap)
    n_pred: int = 1          # regression outputs per token (SRCD: the next observation)
    n_embd: int = 64         # d
    n_layer: int = 2
    n_head: int = 4
    window: int = 512        # episodic buffer: a query at t sees keys t-window+1 .. t
    use_kernel: bool = True  # on CUDA, kernel.py's Triton routed attention; False: the twin here
    sem_rank: int = 0        # semantic memory rank; 0 means d/16 as in the paper
    wm_kind: str = "gated"   # "gated": chunked-scan linear recurrence; "ctrnn": the paper's update
    wm_chunk: int = 16       # chunk length of the parallel scan
    ctrnn_steps: int = 2     # K, Euler steps per token of the paper's update
    router_mode: str = "learned"
    fixed_every: int = 16    # router_mode="fixed": attention on every k-th token
    tau_start: float = 1.0   # Gumbel-softmax temperature, annealed to tau_end over training
    tau_end: float = 0.3
    sigma2: float = 0.2      # sigma^2 in q = exp(-||f_sem - r_E||^2 / sigma^2), errors relative
                             # to the spread of r_E over the tokens where attention ran
    spot_check: float = 0.03 # eps: share of non-routed tokens that still run attention in training
    w_pred: float = 1.0      # loss weights: regression (dynamics MSE),
    w_consol: float = 1.0    #   consolidation ||f_sem - sg(r_E)||^2,
    w_qhead: float = 0.1     #   q-head BCE toward sg(q),
    w_compute: float = 0.5   #   compute penalty on the router's attention probability
    attn_prior: float = 0.9  # the router's initial probability of E: attention use starts high
    penalty_q: bool = True   # charge the penalty in proportion to q_hat, so retrievals the
                             # semantic memory cannot answer are never pushed off attention
    dropout: float = 0.0

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
            ("sem_rank", 0 <= self.sem_rank <= self.n_embd, f"0 (= d/16) .. n_embd={self.n_embd}"),
            ("wm_kind", self.wm_kind in WM_KINDS, f"one of {WM_KINDS}"),
            ("wm_chunk", self.wm_chunk > 0, "a positive int"),
            ("ctrnn_steps", self.ctrnn_steps > 0, "a positive int"),
            ("router_mode", self.router_mode in ROUTER_MODES, f"one of {ROUTER_MODES}"),
            ("fixed_every", self.fixed_every > 0, "a positive int"),
            ("tau_start", self.tau_start > 0, "> 0"),
            ("tau_end", self.tau_end > 0, "> 0"),
            ("sigma2", self.sigma2 > 0, "> 0"),
            ("spot_check", 0 <= self.spot_check <= 1, "in [0, 1]"),
            ("attn_prior", 0 < self.attn_prior < 1, "in (0, 1)"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
        ] + [(w, getattr(self, w) >= 0, ">= 0") for w in ("w_pred", "w_consol", "w_qhead", "w_compute")]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"config {name}={getattr(self, name)!r}: expected {want}")

    @property
    def rank(self):
        return self.sem_rank or max(1, self.n_embd // 16)


# ---------------------------------------------------------------------------------------------
# Plain PyTorch twins of the kernels. kernel.py's Triton routed_attention keeps this signature; the
# scans have no Triton version yet (their chunked form is the layout one would use).

attention_work = Counter()  # what routed_attention computed: "queries", "scores"


def routed_attention(q, k, v, b_idx, t_idx, window):
    """Causal windowed softmax attention for a subset of query positions (DESIGN.md sec. 4.3).

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
        outs.append(torch.einsum("hml,hld->mhd", p, v[b, :, lo:hi]))           # (m, H, D)
        attention_work["scores"] += s.numel()
    return torch.cat(outs)


def dense_attention(q, k, v, window):
    """Every query attends: causal windowed softmax attention, q, k, v (B, H, T, D) -> (B, H, T, D),
    one fused SDPA call. The reference routed_attention is tested against, and the baseline."""
    T = q.shape[2]
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(T, device=q.device)
    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def dense_routed_attention(q, k, v, b_idx, t_idx, window):
    """dense_attention in routed_attention's signature, for when every token is routed
    (router_mode="always"): the model as a dense hybrid, for tests and benchmarks."""
    B, H, T, D = k.shape
    if len(b_idx) != B * T:
        raise ValueError(f"dense_routed_attention: {len(b_idx)} routed of {B * T} tokens; it needs all")
    y = dense_attention(q.view(B, T, H, D).transpose(1, 2), k, v, window)
    return y.transpose(1, 2).reshape(-1, H, D)


def gated_scan_sequential(log_a, x):
    """h_t = exp(log_a_t) * h_{t-1} + x_t with h_{-1} = 0, one step at a time (the test oracle).
    log_a, x: (B, T, C) -> h: (B, T, C)."""
    h, out = torch.zeros_like(x[:, 0]), []
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
    log_a, x: (B, T, C) -> h: (B, T, C).
    """
    B, T, D = x.shape
    n = -(-T // chunk)
    pad = (0, 0, 0, n * chunk - T)  # log_a = 0, x = 0 on padding: the state passes unchanged
    la = F.pad(log_a, pad).view(B * n, chunk, D)
    h = doubling_scan(la, F.pad(x, pad).view(B * n, chunk, D))             # (B n, C, D)
    L = la.cumsum(1).view(B, n, chunk, D)
    ends = doubling_scan(L[:, :, -1], h[:, -1].view(B, n, D))              # (B, n, D)
    start = F.pad(ends, (0, 0, 1, 0))[:, :-1]                              # entering chunk j
    h = h.view(B, n, chunk, D) + L.exp() * start[:, :, None]
    return h.view(B, n * chunk, D)[:, :T]


# ---------------------------------------------------------------------------------------------
# Working memory: two continuous-time recurrences driven by the time gaps dtau.

class GatedCTMemory(nn.Module):
    """Default working memory: a time-gap-aware gated linear recurrence (a diagonal CT-SSM).

    dh/dtau = -lambda_t (h - u_t), solved exactly over the gap dtau_t (zero-order hold):
        a_t = exp(-dtau_t lambda_t),  h_t = a_t h_{t-1} + (1 - a_t) u_t,  y_t = W_o (h_t * silu(g_t))
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

    def forward(self, x, dt, scan=None):
        """x: (B, T, d), dt: (B, T) gaps -> (B, T, d). scan: override the scan (tests)."""
        u, rate, g = self.in_proj(x).chunk(3, dim=-1)
        log_a = -dt[..., None] * F.softplus(rate)                       # (B, T, d), <= 0
        xin = -torch.expm1(log_a) * u                                    # (1 - a_t) u_t
        h = scan(log_a, xin) if scan else gated_scan_chunked(log_a, xin, self.chunk)
        return self.out_proj(h * F.silu(g))


class CTRNNMemory(nn.Module):
    """The paper's working memory (DESIGN.md sec. 3), K Euler steps per token:
        h^(k+1) = h^(k) + (1/K) sigmoid(W_tau log(1 + dtau_t)) * tanh(W1 h^(k) + W2 x_t)
    A nonlinear RNN: exact to the paper, sequential, slow. Select with wm_kind="ctrnn"."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.W1 = nn.Linear(d, d, bias=False)
        self.W2 = nn.Linear(d, d)
        self.W_tau = nn.Linear(1, d)
        self.out_proj = nn.Linear(d, d)
        self.K = cfg.ctrnn_steps

    def step(self, h, x_t, dt_t):
        """One token: h (B, d), x_t (B, d), dt_t (B,) -> the next h (B, d)."""
        rate = torch.sigmoid(self.W_tau(torch.log1p(dt_t)[:, None]))  # time-gap gate
        drive = self.W2(x_t)
        for _ in range(self.K):
            h = h + rate * torch.tanh(self.W1(h) + drive) / self.K
        return h

    def forward(self, x, dt):
        h, out = x.new_zeros(x.shape[0], x.shape[2]), []
        for t in range(x.shape[1]):
            h = self.step(h, x[:, t], dt[:, t])
            out.append(h)
        return self.out_proj(torch.stack(out, 1))


# ---------------------------------------------------------------------------------------------
# Episodic and semantic memory.

class EpisodicMemory(nn.Module):
    """Causal softmax attention over a window, run only for the routed tokens (r_E).
    Keys and values for every token (O(T d^2)); queries, scores and sums for routed ones only."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.window, self.use_kernel = cfg.n_head, cfg.window, cfg.use_kernel
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_embd)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def attend(self, u):
        """kernel.py's Triton routed attention on CUDA (use_kernel, triton installed, head width
        <= 128), else the PyTorch twin above."""
        if self.use_kernel and u.is_cuda and u.shape[-1] // self.n_head <= 128:
            try:
                from kernel import routed_attention as triton_attention  # only where it can run
                return triton_attention
            except ImportError:
                pass
        return routed_attention

    def forward(self, u, b_idx, t_idx):
        """u: (B, T, d); b_idx, t_idx: (M,) routed tokens sorted by (b, t) -> r_E: (M, d)."""
        B, T, d = u.shape
        H = self.n_head
        k, v = self.kv_proj(u).view(B, T, 2, H, d // H).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        q = self.q_proj(u[b_idx, t_idx]).view(-1, H, d // H)                     # (M, H, D)
        y = self.attend(u)(q, k, v, b_idx, t_idx, self.window)                   # (M, H, D)
        return self.out_proj(y.reshape(-1, d))


class SemanticMemory(nn.Module):
    """f_sem: a low-rank MLP, d -> rank (= d/16) -> d, trained toward sg(r_E) by consolidation."""

    def __init__(self, cfg):
        super().__init__()
        self.down = nn.Linear(cfg.n_embd, cfg.rank)
        self.up = nn.Linear(cfg.rank, cfg.n_embd)

    def forward(self, u):
        return self.up(F.gelu(self.down(u)))


class Router(nn.Module):
    """Three-way Gumbel-softmax router over (W, E, S) with straight-through hard decisions.

    The paper routes on q, but q needs r_E, i.e. attention would have to run before the router
    could skip it. Here a q-head predicts q from the hidden state alone (DESIGN.md sec. 4.1); it
    learns from the tokens where r_E is known (routed plus spot checks) and the router reads its
    estimate q_hat. The q-head is a probe: it sees u detached, so it never reshapes the model.
    """

    def __init__(self, cfg):
        super().__init__()
        self.q_head = nn.Linear(cfg.n_embd, 1)
        self.logits = nn.Linear(cfg.n_embd + 1, 3)
        self.attn_prior = cfg.attn_prior

    def forward(self, u, use_q=True):
        """u: (B, T, d) -> logits (B, T, 3), q_hat (B, T)."""
        q_hat = torch.sigmoid(self.q_head(u.detach())).squeeze(-1)
        q_in = q_hat.detach() if use_q else torch.zeros_like(q_hat)
        return self.logits(torch.cat([u, q_in[..., None]], -1)), q_hat


def route(logits, mode, tau, training, fixed_every):
    """The router's decision z (B, T, 3), one-hot; straight-through Gumbel-softmax when learning.
    The modes: learned/static choose freely; always forces E; never forbids E; fixed forces E on
    every k-th token and forbids it elsewhere (W vs S is still chosen by the router)."""
    B, T, _ = logits.shape
    if mode == "always":
        return F.one_hot(torch.full((B, T), E, device=logits.device), 3).to(logits.dtype)
    forced = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
    if mode in ("never", "fixed"):
        logits = logits.clone()
        logits[..., E] = float("-inf")
        if mode == "fixed":
            forced[:, fixed_every - 1::fixed_every] = True
    if training:
        z = F.gumbel_softmax(logits, tau=tau, hard=True)
    else:
        z = F.one_hot(logits.argmax(-1), 3).to(logits.dtype)
    return torch.where(forced[..., None], F.one_hot(torch.tensor(E), 3).to(z), z)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One CRAM layer:
        h   = x + WM(ln1(x), dtau)                      working memory, every token
        u   = ln2(h);  z = route(u, q_hat(u))           decision over (W, E, S)
        h   = h + z_E r_E(u) + z_S f_sem(u)             W adds nothing beyond working memory
        out = h + MLP(ln3(h))
    r_E is computed only where the router chose E, plus (in training) a spot-check sample whose
    output is not added: z_E = 0 there, but it gives the consolidation targets and, through the
    straight-through z_E, the router's gradient for attention on tokens it did not pick.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.n_embd) for _ in range(3))
        self.wm = GatedCTMemory(cfg) if cfg.wm_kind == "gated" else CTRNNMemory(cfg)
        self.episodic = EpisodicMemory(cfg)
        self.semantic = SemanticMemory(cfg)
        self.router = Router(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, dt, tau, mode):
        """x: (B, T, d), dt: (B, T) -> (B, T, d), and this layer's loss terms and routing tensors."""
        cfg = self.cfg
        h = x + self.wm(self.ln1(x), dt)
        u = self.ln2(h)
        logits, q_hat = self.router(u, use_q=mode != "static")
        z = route(logits, mode, tau, self.training, cfg.fixed_every)             # (B, T, 3)
        ran = z[..., E] > 0                                                      # attention runs
        if self.training and mode in ("learned", "static") and cfg.spot_check > 0:
            ran = ran | (torch.rand(ran.shape, device=x.device) < cfg.spot_check)
        b_idx, t_idx = ran.nonzero(as_tuple=True)                                # sorted by (b, t)
        r_E = self.episodic(u, b_idx, t_idx)                                     # (M, d)
        r_full = torch.zeros_like(u).index_put((b_idx, t_idx), r_E)              # (B, T, d)
        f_sem = self.semantic(u)                                                 # (B, T, d)
        h = h + z[..., E, None] * r_full + z[..., S, None] * f_sem
        out = h + self.mlp(self.ln3(h))

        # consolidation: f_sem -> sg(r_E) where attention ran; the q-head learns q there
        terms = dict(consol=u.new_zeros(()), qhead=u.new_zeros(()))
        if len(b_idx) > 1 and mode != "static":  # q needs the spread of r_E over >= 2 tokens
            # errors relative to the spread of r_E: early on attention's outputs are near zero,
            # and an absolute error would call that trivially "consolidated" (q ~ 1 everywhere)
            r = r_E.detach()
            err = (self.semantic(u.detach()[b_idx, t_idx]) - r).pow(2).mean(-1)   # (M,)
            spread = (r - r.mean(0)).pow(2).mean() + 1e-12
            q = torch.exp(-err.detach() / (cfg.sigma2 * spread))                  # q_t (M,)
            terms["consol"] = err.mean()
            terms["qhead"] = F.binary_cross_entropy(q_hat[b_idx, t_idx], q)
        # compute penalty on the router's attention probability; with penalty_q it is charged in
        # proportion to q_hat, so an unconsolidated retrieval is never pushed off attention
        p_E = logits.softmax(-1)[..., E]
        cost = p_E * q_hat.detach() if cfg.penalty_q and mode == "learned" else p_E
        terms["compute"] = cost.mean() if mode in ("learned", "static") else u.new_zeros(())
        return out, terms, dict(z=z.detach(), q_hat=q_hat.detach())


class CRAM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.cont_proj = nn.Linear(cfg.n_cont, cfg.n_embd) if cfg.n_cont else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.pred_head = nn.Linear(cfg.n_embd, cfg.n_pred) if cfg.n_pred else None
        self.apply(self._init)

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
            p = m.attn_prior  # softmax(0, b, 0)[E] = p  <=>  b = log(2p / (1 - p))
            nn.init.constant_(m.logits.bias[E], math.log(2 * p / (1 - p)))
        if isinstance(m, EpisodicMemory):
            # W_q = W_k at init, std 1/sqrt(d): a repeated key then scores ||W_q u||^2 against its
            # binding from the first step, instead of ~0 like every other key. At init on SRCD a
            # query puts 3-4x the uniform weight on its binding (1.1x untied, 1.0x with PyTorch's
            # default biases; test_at_init_a_query_attends_to_the_binding_of_its_key), and forced
            # attention at N=512 retrieves novel keys at 99% by step 200 (it was 3% at step 500).
            d = m.q_proj.weight.shape[1]
            nn.init.normal_(m.q_proj.weight, std=d ** -0.5)
            with torch.no_grad():
                m.kv_proj.weight[:d].copy_(m.q_proj.weight)

    def forward(self, tokens, dt=None, cont=None, targets=None, pred_targets=None,
                token_class=None, tau=1.0, router_mode=None):
        """
        tokens: (B, T) or (B, T, S) ids, S token slots per position whose embeddings are summed
        (SRCD puts key and value of a binding at one position); dt: (B, T) time gaps (default 1);
        cont: (B, T, n_cont) continuous inputs; targets: (B, T) ids, -1 = no target;
        pred_targets: (B, T, n_pred) regression targets, NaN = no target; token_class: (B, T) in
        0 other / 1 recurring query / 2 novel query, for the statistics only; tau: router temperature;
        router_mode: overrides cfg.router_mode for this call (train.py's attention warm-up).
        Returns a dict: logits (B, T, V), pred (B, T, n_pred) or None, loss (scalar, if targets),
        terms (each loss term), stats (routing statistics, python floats).
        """
        cfg = self.cfg
        if tokens.dim() == 2:
            tokens = tokens[..., None]
        B, T, _ = tokens.shape
        dt = torch.ones(B, T, device=tokens.device) if dt is None else dt
        x = self.tok_emb(tokens).sum(2)                                          # (B, T, d)
        if self.cont_proj is not None:
            x = x + self.cont_proj(cont)
        x = self.drop(x)
        terms, routing = Counter(), []
        for block in self.blocks:
            x, t, r = block(x, dt, tau, router_mode or cfg.router_mode)
            terms.update(t)
            routing.append(r)
        x = self.ln_f(x)
        logits = self.lm_head(x)
        pred = self.pred_head(x) if self.pred_head is not None else None
        out = dict(logits=logits, pred=pred, stats=routing_stats(routing, token_class))
        if targets is not None:
            terms = {k: v / cfg.n_layer for k, v in terms.items()}
            terms["ce"] = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
            terms["mse"] = logits.new_zeros(())
            if pred is not None and pred_targets is not None:
                have = ~pred_targets.isnan()
                terms["mse"] = F.mse_loss(pred[have], pred_targets[have])
            out["loss"] = (terms["ce"] + cfg.w_pred * terms["mse"] + cfg.w_consol * terms["consol"]
                           + cfg.w_qhead * terms["qhead"] + cfg.w_compute * terms["compute"])
            out["terms"] = {k: v.item() for k, v in terms.items()}
        return out

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def routing_stats(routing, token_class=None):
    """Per layer the share of tokens on each tier and mean q_hat; attn_frac, the share of tokens
    that used attention in at least one layer (DESIGN.md sec. 5); and, given token classes, the
    attention and semantic shares and mean q_hat of each class."""
    z = torch.stack([r["z"] for r in routing])                # (layers, B, T, 3)
    q_hat = torch.stack([r["q_hat"] for r in routing])        # (layers, B, T)
    any_attn = z[..., E].amax(0) > 0                          # (B, T)
    stats = dict(attn_frac=any_attn.float().mean().item(),
                 attn_pair_frac=z[..., E].mean().item(),
                 sem_frac=z[..., S].mean().item())
    for i in range(z.shape[0]):
        for j, tier in enumerate(TIERS):
            stats[f"L{i}_{tier}"] = z[i, ..., j].mean().item()
        stats[f"L{i}_q"] = q_hat[i].mean().item()
    if token_class is not None:
        for c, name in enumerate(CLASSES):
            m = token_class == c
            if m.any():
                stats[f"attn_{name}"] = any_attn[m].float().mean().item()
                stats[f"sem_{name}"] = z[..., S][:, m].mean().item()
                stats[f"q_{name}"] = q_hat[:, m].mean().item()
    return stats


def router_tau(cfg, frac):
    """Temperature at a fraction frac in [0, 1] of training: geometric from tau_start to tau_end."""
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** min(max(frac, 0.0), 1.0)
