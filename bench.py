"""
The whole model's forward, routed against dense: CRAM with attention on every 64th token (about the
share a consolidated SRCD model keeps) against the same weights with attention on every token (the
dense hybrid), computed by one SDPA call, the fastest exact dense hybrid. Both through cfg.attn_impl:
the routed side with each implementation this machine has (the twin; on CUDA also the kernel).
On CUDA the forward runs as train.py runs it: bf16 autocast, TF32 matmuls; on a CPU in fp32.

    python bench.py [--n=4096] [--json FILE]

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


def main():
    ap = argparse.ArgumentParser(description="the whole CRAM forward, routed vs dense")
    ap.add_argument("--n", type=int, default=4096, help="sequence length")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    args = ap.parse_args()
    if torch.cuda.is_available():
        dev, timer = "cuda", gpu_timer
        impls = ["twin"] + (["kernel"] if cram.triton_attention() else [])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    else:
        dev, timer, impls = "cpu", cpu_timer(5), ["twin"]
        torch.set_num_threads(1)  # CPU timings on one thread: repeatable, and fair to both sides
    print(f"# {dev}: CRAM n_embd=64 H=4 n_layer=2, {'bf16 autocast' if dev == 'cuda' else 'fp32'}, B=1, N={args.n}: attention on every 64th "
          f"token (router_mode=fixed) vs every token (router_mode=always, one SDPA call)")
    print_table([dict(device=dev, **whole_model(dev, timer, impl, args.n)) for impl in impls], args.json)


if __name__ == "__main__":
    main()
