"""
The whole model's forward, routed against dense: CRAM with attention on every 64th token (about the
share a consolidated SRCD model keeps) against the same weights with attention on every token (the
dense hybrid), computed by one SDPA call, the fastest exact dense hybrid. Both through cfg.attn_impl:
the routed side with each implementation this machine has (the twin; on CUDA also the kernel).
On CUDA the forward runs as train.py runs it: bf16 autocast, TF32 matmuls; on a CPU in fp32.

    python bench.py [--n=4096] [--json FILE]
    python bench.py --memories [--batch=16] [--len=512] [--json FILE]

--memories times the working memories instead, forward + backward per token: each in its fast form
(the chunked scans) against its plain twin (the token loop), as train.py runs them (fp32 on a CPU,
bf16 autocast on CUDA).

Routed attention alone, against SDPA, is kernel.py's benchmark (python kernel.py); the timers and
the table printer that both benchmarks use live here.
"""
import argparse
import contextlib
import json
import time

import torch

import cram


def cpu_timer(reps):
    def timer(fn):
        """(median wall ms of fn() after one warm-up call, None: no memory count on the CPU)."""
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[len(times) // 2], None
    return timer


def gpu_timer(fn):
    """(median ms by triton.testing.do_bench, peak MiB allocated during one call above baseline)."""
    import triton.testing
    ms = triton.testing.do_bench(fn, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def print_table(rows, json_path=None):
    """One line per row: routed ms against dense ms, their ratio, the ideal 1/p, memory on a GPU."""
    print(f"{'device':6} {'impl':24} {'T':>6} {'p':>5} {'pass':8} {'ms':>9} {'ms_dense':>9} "
          f"{'ratio':>7} {'ideal':>5} {'MiB':>7} {'MiB_dense':>9}")
    for r in rows:
        ideal = "-" if r["ideal"] is None else f"{r['ideal']:.0f}"
        mem = "-" if r["mem_MiB"] is None else f"{r['mem_MiB']:7.0f} {r['mem_dense_MiB']:9.0f}"
        print(f"{r['device']:6} {r['impl']:24} {r['T']:6d} {'1/%d' % round(1 / r['p']):>5} {r['pass_']:8} "
              f"{r['ms']:9.2f} {r['ms_dense']:9.2f} {r['ratio']:7.2f} {ideal:>5} {mem}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows], f, indent=1)


def whole_model(device, timer, impl, N, every=64):
    """CRAM forward (eval, B=1, N tokens, window N), SRCD-shaped inputs: router_mode="fixed"
    (attention on every `every`-th token) with attn_impl=impl, against router_mode="always" with
    attn_impl="dense", the same weights."""
    make = lambda mode, impl: cram.CRAM(cram.CramConfig(
        vocab_size=366, n_cont=2, n_pred=1, window=N, router_mode=mode, fixed_every=every,
        attn_impl=impl)).to(device).eval()
    torch.manual_seed(0)
    routed = make("fixed", impl)
    dense = make("always", "dense")
    dense.load_state_dict(routed.state_dict())
    x = dict(tokens=torch.randint(0, 366, (1, N, 2), device=device),
             dtau=torch.rand(1, N, device=device), cont=torch.randn(1, N, 2, device=device))
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        ms, mem = timer(lambda: routed(**x))
        md, memd = timer(lambda: dense(**x))
    cfg = routed.cfg
    return dict(impl=f"cram {impl} vs dense", T=N, p=1 / every, pass_="fwd", ms=ms, ms_dense=md,
                ratio=md / ms, ideal=None, mem_MiB=mem, mem_dense_MiB=memd, B=1, H=cfg.n_head,
                D=cfg.n_embd // cfg.n_head, dtype="bfloat16 autocast" if cuda else "float32")


# (row name, config, plain twin). "mamba2, 2 heads" has Palimpsa's state size: Palimpsa carries M and
# Ibar, 2 H D^2 numbers with D = n_embd / H; Mamba2-style carries M alone, so half the heads.
MEMORY_FORMS = [("gated", dict(wm_kind="gated"), cram.gated_scan_sequential),
                ("palimpsa", dict(wm_kind="palimpsa"), cram.palimpsa_scan_sequential),
                ("mamba2", dict(wm_kind="mamba2"), cram.palimpsa_scan_sequential),
                ("mamba2, 2 heads", dict(wm_kind="mamba2", n_head=2), cram.palimpsa_scan_sequential),
                ("palimpsa, 2 heads", dict(wm_kind="palimpsa", n_head=2), cram.palimpsa_scan_sequential)]


def working_memories(device, timer, B, T):
    """Forward + backward of one working-memory layer (SRCD's default width: n_embd 64, 4 heads
    unless the row says, chunk 16) on (B, T) tokens, chunked and sequential: a row each, ms per
    call and us per token."""
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    rows = []
    for name, settings, twin in MEMORY_FORMS:
        torch.manual_seed(0)
        cfg = cram.CramConfig(vocab_size=366, n_cont=2, n_pred=1, **settings)
        wm = cram.CRAM(cfg).blocks[0].wm.to(device)
        x = torch.randn(B, T, cfg.n_embd, device=device, requires_grad=True)
        dtau = torch.rand(B, T, device=device)
        for form, scan in [("chunked", None), ("sequential", twin)]:
            def step():
                with autocast:
                    y = wm(x, dtau, scan=scan)
                y.float().sum().backward()
            ms, mem = timer(step)
            rows.append(dict(device=device, memory=name, form=form, H=cfg.n_head, B=B, T=T, ms=ms,
                             us_per_token=1e3 * ms / (B * T), mem_MiB=mem))
    base = rows[0]["ms"]
    for r in rows:
        r["vs_gated"] = r["ms"] / base
    return rows


def print_memories(rows, json_path=None):
    """One line per (memory, form): ms per call, us per token, time relative to the gated memory's chunked scan."""
    print(f"{'device':6} {'memory':17} {'form':10} {'H':>2} {'B':>3} {'T':>5} {'ms':>9} {'us/token':>9} "
          f"{'x gated':>8} {'MiB':>7}")
    for r in rows:
        mem = "-" if r["mem_MiB"] is None else f"{r['mem_MiB']:.0f}"
        print(f"{r['device']:6} {r['memory']:17} {r['form']:10} {r['H']:2d} {r['B']:3d} {r['T']:5d} {r['ms']:9.1f} "
              f"{r['us_per_token']:9.2f} {r['vs_gated']:8.2f} {mem:>7}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description="the whole CRAM forward, routed vs dense")
    ap.add_argument("--n", type=int, default=4096, help="sequence length")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    ap.add_argument("--memories", action="store_true", help="time the working memories instead")
    ap.add_argument("--batch", type=int, default=16, help="--memories: batch size")
    ap.add_argument("--len", type=int, default=512, help="--memories: tokens per sequence")
    args = ap.parse_args()
    if min(args.n, args.batch, args.len) < 1:
        ap.error("--n, --batch and --len take positive ints")
    if torch.cuda.is_available():
        dev, timer = "cuda", gpu_timer
        impls = ["twin"] + (["kernel"] if cram.triton_attention() else [])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    else:
        dev, timer, impls = "cpu", cpu_timer(5), ["twin"]
        torch.set_num_threads(1)  # CPU timings on one thread: repeatable, and fair to both sides
    if args.memories:
        print(f"# {dev}: one working-memory layer (n_embd=64, H heads, chunk 16), forward + backward, "
              f"B={args.batch}, T={args.len}, {'bf16 autocast' if dev == 'cuda' else 'fp32, one thread'}")
        return print_memories(working_memories(dev, timer, args.batch, args.len), args.json)
    print(f"# {dev}: CRAM n_embd=64 H=4 n_layer=2, {'bf16 autocast' if dev == 'cuda' else 'fp32'}, B=1, N={args.n}: attention on every 64th "
          f"token (router_mode=fixed) vs every token (router_mode=always, one SDPA call)")
    print_table([dict(device=dev, **whole_model(dev, timer, impl, args.n)) for impl in impls], args.json)


if __name__ == "__main__":
    main()
