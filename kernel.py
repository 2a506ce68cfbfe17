"""
Routed attention in Triton: causal windowed softmax attention for a subset of query positions.

Math (the twin is cram.routed_attention, same signature, plain PyTorch): for routed query i at
batch row b_i, position t_i, head h, with scale c = 1/sqrt(D),
    s_ij = c q_i . k_j  for keys j in (t_i - window, t_i],   o_i = sum_j softmax_j(s_ij) v_j
and the flash-attention 2 backward, with P the softmax, dO the output gradient:
    delta_i = rowsum(dO_i * O_i),  dS = P * (dO V^T - delta),
    dQ = c dS K,  dK = c dS^T Q,  dV = P^T dO
Work is O(M window D) for M routed queries, never O(T^2 D), and no T x T matrix is stored.

Layout. The routed queries are sorted by (b, t), so each batch row's queries are one contiguous run.
The host cuts each run into query blocks of BLOCK_M consecutive routed queries (a block never
crosses a row); a program (query block, head) walks the key blocks from t_first - window + 1 to
t_last with an online softmax and masks per query (causal and window). The forward saves the
log-sum-exp (base 2) per query and head for the backward. BLOCK_M is chosen per call from the
routed density: a block spans BLOCK_M / p positions and every query in it pays for the whole span,
so sparse routing gets small blocks (16, the smallest tl.dot tile) and full routing big ones.

Backward, two deterministic passes, no atomics:
  _bwd_dkdv_kernel, program (key block, head, batch row): loops over the routed queries of its row
      that can see the block, t in [key_start, key_end + window - 1]: one contiguous run of the
      sorted queries, found on the host with torch.searchsorted. Every key gets a written gradient
      (zero when nothing sees it).
  _bwd_dq_kernel, program (query block, head): the forward's loop again, accumulating dQ.
Why not flash-attention 2's single pass with atomic adds into an fp32 dQ: P is then formed once
instead of twice, but the result depends on the order of the atomics (runs are not bitwise
repeatable), it needs an fp32 dQ buffer plus a cast, and with sparse routing many key blocks
would hit the same few dQ rows. The two passes cost 7 tile matmuls per (query, key) tile instead
of 5 (S and dP are formed twice). The atomic variant was not built or timed: no GPU here.

Precision: fp32, fp16 or bf16 inputs; accumulation and the softmax statistics in fp32. fp32 inputs
follow torch.backends.cuda.matmul.allow_tf32 (default off: exact fp32 tl.dot, as the twin).
D: any head width up to 128; tiles are padded to BLOCK_D = max(16, next power of two).
Offsets within one batch row (h * stride_h + t * stride_t) are int32: a row of K or V must hold
fewer than 2^31 elements (T * 2 * n_embd for EpisodicMemory's packed k, v); rows are int64.

Imports torch and triton only: the model imports this file, never the other way round.

    TRITON_INTERPRET=1 python -m pytest -q test_cram.py -k kernel   # tests (interpreted, CPU)
    python bench.py --kernel [--quick] [--json FILE]   # benchmark table against SDPA (bench.py)
    python kernel.py --ptxas 90 [--quick]              # compile for sm_90: registers, spills
"""
import argparse
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Kernels. Strides are in elements; the head dimension must be contiguous (stride 1).

@triton.jit
def _query_block(Q, T_IDX, BLK_ROW, BLK_LO, BLK_HI, stride_qm, stride_qh,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query block: batch row, rows (indices into the M routed queries), their
    positions t, the q tile (BLOCK_M, BLOCK_D), the tile mask, and t_first, t_last."""
    blk, h = tl.program_id(0), tl.program_id(1)
    b = tl.load(BLK_ROW + blk).to(tl.int64)
    m_lo, m_hi = tl.load(BLK_LO + blk), tl.load(BLK_HI + blk)
    rows = m_lo + tl.arange(0, BLOCK_M)
    valid = rows < m_hi
    t_first, t_last = tl.load(T_IDX + m_lo), tl.load(T_IDX + m_hi - 1)
    t = tl.load(T_IDX + rows, mask=valid, other=0)
    # padding rows copy the last query: a finite softmax, never stored
    t = tl.where(valid, t, t_last)
    dd = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (dd[None, :] < D)
    q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_qm + h * stride_qh + dd[None, :],
                mask=mask, other=0.0)
    return b, h, rows, valid, t, q, mask, t_first, t_last


@triton.jit
def _fwd_kernel(Q, K, V,                   # q (M, H, D); k, v (B, H, T, D)
                O, LSE,  # noqa: E741      o like q; lse (M, H) fp32, log-sum-exp in base 2
                T_IDX,                     # (M,) int32 position of each routed query
                BLK_ROW, BLK_LO, BLK_HI,   # per query block: batch row, first and past-last query
                stride_qm, stride_qh, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_om, stride_oh,
                H, window, qk_scale,       # qk_scale = log2(e) / sqrt(D): softmax in base 2
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    b, h, rows, valid, t, q, mask, t_first, t_last = _query_block(
        Q, T_IDX, BLK_ROW, BLK_LO, BLK_HI, stride_qm, stride_qh, D, BLOCK_M, BLOCK_D)
    dd = tl.arange(0, BLOCK_D)
    kp = K + b * stride_kb + h * stride_kh + dd[None, :]
    vp = V + b * stride_vb + h * stride_vh + dd[None, :]
    # finite start: a row that sees nothing in a key block keeps m = -1e30, p = 0, alpha = 1
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(t_first - window + 1, 0) // BLOCK_N * BLOCK_N  # aligned loads
    for n0 in range(lo, t_last + 1, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = (keys <= t_last)[:, None] & (dd[None, :] < D)  # t_last < T: no read past the row
        k = tl.load(kp + keys[:, None] * stride_kt, mask=kmask, other=0.0)
        v = tl.load(vp + keys[:, None] * stride_vt, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale          # (BLOCK_M, BLOCK_N)
        see = (keys[None, :] <= t[:, None]) & (keys[None, :] > t[:, None] - window)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # every query sees at least its own key, so l_i >= 1 here
    o = acc / l_i[:, None]
    tl.store(O + rows.to(tl.int64)[:, None] * stride_om + h * stride_oh + dd[None, :],
             o.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + rows * H + h, m_i + tl.math.log2(l_i), mask=valid)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,   # do, dq like q; lse, delta (M, H) fp32
                   T_IDX, BLK_ROW, BLK_LO, BLK_HI,  # as in the forward
                   stride_qm, stride_qh, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_om, stride_oh,  # o: do's and dq's
                   H, window, qk_scale, sm_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    b, h, rows, valid, t, q, mask, t_first, t_last = _query_block(
        Q, T_IDX, BLK_ROW, BLK_LO, BLK_HI, stride_qm, stride_qh, D, BLOCK_M, BLOCK_D)
    dd = tl.arange(0, BLOCK_D)
    optr = rows.to(tl.int64)[:, None] * stride_om + h * stride_oh + dd[None, :]
    do = tl.load(DO + optr, mask=mask, other=0.0)
    lse = tl.load(LSE + rows * H + h, mask=valid, other=0.0)
    delta = tl.load(DELTA + rows * H + h, mask=valid, other=0.0)
    kp = K + b * stride_kb + h * stride_kh + dd[None, :]
    vp = V + b * stride_vb + h * stride_vh + dd[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(t_first - window + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(lo, t_last + 1, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = (keys <= t_last)[:, None] & (dd[None, :] < D)
        k = tl.load(kp + keys[:, None] * stride_kt, mask=kmask, other=0.0)
        v = tl.load(vp + keys[:, None] * stride_vt, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        see = (keys[None, :] <= t[:, None]) & (keys[None, :] > t[:, None] - window)
        p = tl.math.exp2(tl.where(see, s, float("-inf")) - lse[:, None])  # P, (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + optr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,  # dk, dv (B, H, T, D) contiguous
                     T_IDX,                # (M,) int32
                     Q_LO, Q_HI,  # (B, n_key_blocks) int32: the routed queries that see a key block
                     stride_qm, stride_qh, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_om, stride_oh,
                     H, T, window, qk_scale, sm_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    nb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    keys = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    kmask = (keys < T)[:, None] & (dd[None, :] < D)
    b64 = b.to(tl.int64)
    k = tl.load(K + b64 * stride_kb + h * stride_kh + keys[:, None] * stride_kt + dd[None, :],
                mask=kmask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h * stride_vh + keys[:, None] * stride_vt + dd[None, :],
                mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_lo = tl.load(Q_LO + b * tl.num_programs(0) + nb)
    q_hi = tl.load(Q_HI + b * tl.num_programs(0) + nb)
    for m0 in range(q_lo, q_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        valid = rows < q_hi
        mask = valid[:, None] & (dd[None, :] < D)
        optr = rows.to(tl.int64)[:, None] * stride_om + h * stride_oh + dd[None, :]
        q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_qm + h * stride_qh + dd[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + optr, mask=mask, other=0.0)
        t = tl.load(T_IDX + rows, mask=valid, other=0)
        lse = tl.load(LSE + rows * H + h, mask=valid, other=0.0)
        delta = tl.load(DELTA + rows * H + h, mask=valid, other=0.0)
        # transposed scores, keys x queries, so dK and dV accumulate without a transpose
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        see = valid[None, :] & (keys[:, None] <= t[None, :]) & (keys[:, None] > t[None, :] - window)
        pT = tl.math.exp2(tl.where(see, sT, float("-inf")) - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    out = (b64 * H + h) * T * D + keys[:, None] * D + dd[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)


# ---------------------------------------------------------------------------------------------
# Host side: checks, block layout, launchers, autograd.

def _fail(msg):
    raise ValueError(f"kernel.routed_attention: {msg}")


def _check(q, k, v, b_idx, t_idx, window):
    """One clear line for each misuse, before any launch."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        _fail(f"want q (M, H, D) and k, v (B, H, T, D); got {tuple(q.shape)}, "
              f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1:] != (k.shape[1], k.shape[3]):
        _fail(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on H or D")
    halves = (torch.float32, torch.float16, torch.bfloat16)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in halves:
        _fail(f"q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] > 128:
        _fail(f"head width D={q.shape[2]} > 128 is not supported; use cram.routed_attention")
    if not isinstance(window, int) or window < 1:
        _fail(f"window={window!r}: expected a positive int")
    if b_idx.shape != (q.shape[0],) or t_idx.shape != (q.shape[0],):
        _fail(f"b_idx, t_idx must be ({q.shape[0]},); got {tuple(b_idx.shape)}, "
              f"{tuple(t_idx.shape)}")
    if q.device.type != "cuda" and not INTERPRET:
        _fail(f"tensors on {q.device}: needs CUDA, "
              "or TRITON_INTERPRET=1 set before importing triton")


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def block_sizes(M, B, T, window, D, dtype):
    """Tiles as (BLOCK_M, BLOCK_N, num_warps): "fwd" for the forward and dq kernels (query blocks of
    BLOCK_M, key blocks of BLOCK_N), "dkdv" for the key-block pass (BLOCK_N keys, BLOCK_M queries).
    A query block spans about BLOCK_M / p positions (p = routed density) and each of its queries
    pays for that span on top of its own min(t, window) keys, so BLOCK_M is the largest power of
    two in [16, 128] with span <= min(T, window) / 4 (extra work below ~1/8 of the ideal on
    average). The warps and the caps by D are what ptxas compiles for sm_90 without register
    spills (python kernel.py --ptxas 90: none but 16 B in fp32 D=16 dkdv; sm_80 spills 8-104 B in
    a few backward configs). Untimed: there was no GPU to tune on.
    Exact fp32 tl.dot has no tensor cores and spills kilobytes at 32 x 64 already: 16 x 16, the
    smallest legal tile, as under the interpreter, where it makes small tests cross block edges."""
    if INTERPRET or _prec(dtype) == "ieee":
        return dict(fwd=(16, 16, 4), dkdv=(16, 16, 4))
    bd = max(16, triton.next_power_of_2(D))
    reach = M / (B * T) * min(T, window) / 4
    bm = 16
    while bm < min(128, 8192 // bd) and 2 * bm <= reach:
        bm *= 2
    return dict(fwd=(bm, 64, 8 if bm * bd >= 4096 else 4),
                dkdv=(32, 64, 4) if bd <= 64 else (32, 32, 8))


def query_blocks(b_idx, t_idx, B, T, block_m):
    """Cut each batch row's run of sorted routed queries into blocks of block_m: (row, lo, hi)
    int32 per block, queries lo..hi-1. Also checks, in the same host sync, that (b, t) is sorted
    and in range, since a wrong order would silently mix rows."""
    counts = torch.bincount(b_idx.clamp(0, B - 1), minlength=B)          # (B,)
    nblk = (counts + block_m - 1) // block_m
    key = b_idx * T + t_idx
    bad = ((key[1:] < key[:-1]).any() | (b_idx < 0).any() | (b_idx >= B).any()
           | (t_idx < 0).any() | (t_idx >= T).any())
    n, bad = torch.stack([nblk.sum(), bad.long()]).tolist()
    if bad:
        _fail(f"b_idx, t_idx must be sorted by (b, t) with 0 <= b < {B}, 0 <= t < {T}")
    row = torch.repeat_interleave(torch.arange(B, device=b_idx.device), nblk, output_size=n)
    j = torch.arange(n, device=b_idx.device) - (nblk.cumsum(0) - nblk)[row]  # block within its row
    start = (counts.cumsum(0) - counts)[row]
    lo = start + j * block_m
    hi = torch.minimum(lo + block_m, start + counts[row])
    return row.int(), lo.int(), hi.int()


def key_block_queries(b_idx, t_idx, B, T, window, block_n):
    """For key block j of row b (keys j*block_n .. +block_n-1), the run lo..hi-1 of sorted routed
    queries that can see any of its keys: row b, t in [j*block_n, j*block_n + block_n + window - 2].
    Returns lo, hi as (B, n_key_blocks) int32."""
    key = (b_idx * T + t_idx).contiguous()
    start = torch.arange(0, T, block_n, device=key.device)
    last = torch.clamp(start + block_n + window - 2, max=T - 1)
    row = torch.arange(B, device=key.device)[:, None] * T
    lo = torch.searchsorted(key, row + start)
    hi = torch.searchsorted(key, row + last, right=True)
    return lo.int().contiguous(), hi.int().contiguous()


def _strides(q, k, v, o):
    return (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1))


def _prec(dtype):
    """fp32 inputs follow PyTorch's matmul setting (default: exact fp32, as the twin computes)."""
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"  # ignored for fp16/bf16 operands


def _meta(q):
    D = q.shape[2]
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(q.dtype))


class RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, b_idx, t_idx, window, blocks=None, alloc=torch.empty):
        """blocks, alloc: as routed_attention's."""
        _check(q, k, v, b_idx, t_idx, window)
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        (M, H, D), (B, _, T, _) = q.shape, k.shape
        blocks = blocks or block_sizes(M, B, T, window, D, q.dtype)
        assert min(min(c[:2]) for c in blocks.values()) >= 16, "tl.dot needs tiles >= 16 on GPUs"
        bm, bn, nw = blocks["fwd"]
        ctx.meta = (window, blocks, M, alloc)
        if M == 0:
            ctx.save_for_backward(q, k, v)
            return q.new_zeros(0, H, D)
        row, lo, hi = query_blocks(b_idx, t_idx, B, T, bm)
        t32 = t_idx.int().contiguous()
        # longest key loops first, so the grid's tail is short programs (causal: late blocks)
        span = t32[hi.long() - 1] - (t32[lo.long()] - window + 1).clamp_min(0)
        order = span.argsort(descending=True)
        row, lo, hi = row[order], lo[order], hi[order]
        o = alloc(M, H, D, device=q.device, dtype=q.dtype)
        lse = alloc(M, H, device=q.device, dtype=torch.float32)
        _fwd_kernel[(len(row), H)](q, k, v, o, lse, t32, row, lo, hi, *_strides(q, k, v, o),
                                   H, window, LOG2E / math.sqrt(D), BLOCK_M=bm, BLOCK_N=bn,
                                   num_warps=nw, **_meta(q))
        ctx.save_for_backward(q, k, v, o, lse, b_idx, t32, row, lo, hi)
        return o

    @staticmethod
    def backward(ctx, do):
        window, blocks, M, alloc = ctx.meta
        if M == 0:
            q, k, v = ctx.saved_tensors
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                    None, None, None, None, None)
        q, k, v, o, lse, b_idx, t32, row, lo, hi = ctx.saved_tensors
        (_, H, D), (B, _, T, _) = q.shape, k.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)                         # (M, H), FA2's D_i
        scale = 1 / math.sqrt(D)
        dq = alloc(M, H, D, device=q.device, dtype=q.dtype)
        dk = alloc(B, H, T, D, device=q.device, dtype=k.dtype)
        dv = alloc(B, H, T, D, device=q.device, dtype=v.dtype)
        # dq is laid out as do (contiguous (M, H, D)): one set of strides serves both
        strides = _strides(q, k, v, do)
        bm, bn, nw = blocks["fwd"]
        _bwd_dq_kernel[(len(row), H)](q, k, v, do, dq, lse, delta, t32, row, lo, hi, *strides,
                                      H, window, scale * LOG2E, scale, BLOCK_M=bm, BLOCK_N=bn,
                                      num_warps=nw, **_meta(q))
        bm, bn, nw = blocks["dkdv"]
        q_lo, q_hi = key_block_queries(b_idx, t32, B, T, window, bn)
        _bwd_dkdv_kernel[(q_lo.shape[1], H, B)](q, k, v, do, dk, dv, lse, delta, t32, q_lo, q_hi,
                                                *strides, H, T, window, scale * LOG2E, scale,
                                                BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, **_meta(q))
        return dq, dk, dv, None, None, None, None, None


def routed_attention(q, k, v, b_idx, t_idx, window, blocks=None, alloc=torch.empty):
    """The Triton twin of cram.routed_attention: q (M, H, D) routed queries; b_idx, t_idx (M,)
    sorted by (b, t); k, v (B, H, T, D); a query at t sees keys t-window+1 .. t. -> (M, H, D).
    blocks: block_sizes' dict, to override its choice (tests). alloc(*shape, device, dtype) makes
    every buffer a kernel must fill, torch.empty by default; the tests pass one that fills with
    NaN, so an element a kernel forgets to write fails the comparison instead of passing."""
    return RoutedAttention.apply(q, k, v, b_idx, t_idx, window, blocks, alloc)


# ---------------------------------------------------------------------------------------------
# Compiled for a GPU without one: python kernel.py --ptxas 90 [--quick]

NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HAS_PTXAS = os.path.exists(os.path.join(NV_BIN, "cuobjdump"))
POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "T_IDX": "*i32", "BLK_ROW": "*i32", "BLK_LO": "*i32",
           "BLK_HI": "*i32", "Q_LO": "*i32", "Q_HI": "*i32"}  # the other tensors have q's dtype


def ptxas_usage(fn, dtype, consts, num_warps, arch):
    """Compile a kernel for an NVIDIA GPU of compute capability arch with no GPU present
    (triton.compile and its bundled ptxas): (registers, spilled stack bytes) per thread."""
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    ty = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    sig = {n: "constexpr" if n in consts
           else POINTER.get(n, ty) if n.isupper() and n not in ("H", "T")
           else "fp32" if n.endswith("scale") else "i32" for n in names}  # H, T: ints
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kern = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(NV_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    use = dict(kv.split(":") for kv in out[out.index("REG:"):].split()[:2])
    return int(use["REG"]), int(use["STACK"])


def ptxas_table(arch, quick):
    """Registers and spills of every tile set block_sizes picks on a GPU (T = 4096, window = T)."""
    assert not INTERPRET, "run without TRITON_INTERPRET: interpreted kernels cannot be compiled"
    cases = ([(torch.bfloat16, 64, 1 / 64), (torch.bfloat16, 64, 1.0), (torch.float16, 16, 1 / 4),
              (torch.bfloat16, 128, 1.0)] if quick else
             [(dt, D, p) for dt in (torch.bfloat16, torch.float16, torch.float32)
              for D in (16, 32, 64, 128)
              for p in (1 / 64, 1 / 16, 1 / 4, 1.0)])
    for dtype, D, p in cases:
        blocks = block_sizes(int(p * 4096), 1, 4096, 4096, D, dtype)
        meta = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(dtype))
        for fn, (bm, bn, nw) in ((_fwd_kernel, blocks["fwd"]), (_bwd_dq_kernel, blocks["fwd"]),
                                 (_bwd_dkdv_kernel, blocks["dkdv"])):
            regs, stack = ptxas_usage(fn, dtype, dict(meta, BLOCK_M=bm, BLOCK_N=bn), nw, arch)
            print(f"sm_{arch} {str(dtype)[6:]:8} D={D:<3} p=1/{round(1 / p):<2} {fn.__name__:16} "
                  f"{bm:3}x{bn:<3} {nw} warps | regs {regs} | stack {stack}", flush=True)


def main():
    ap = argparse.ArgumentParser(description="compile every tile set block_sizes picks for an "
                                 "NVIDIA GPU (no GPU needed): registers and spills per kernel")
    ap.add_argument("--ptxas", metavar="ARCH", type=int, required=True,
                    help="the compute capability to compile for, e.g. 90")
    ap.add_argument("--quick", action="store_true", help="four cases instead of all 48")
    args = ap.parse_args()
    ptxas_table(args.ptxas, args.quick)


if __name__ == "__main__":
    main()
