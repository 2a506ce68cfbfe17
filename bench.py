"""
Benchmarks, one per flag; the timers and table printers they share live here.

    python bench.py [--n=4096] [--json FILE]                        # the whole model's forward
    python bench.py --memories [--batch=16] [--len=512] [--json FILE]
    python bench.py --kernel [--quick] [--json FILE]                # routed attention alone
    python bench.py --generate [--quick] [--wide] [--json FILE]     # generation from a cache

Default: the whole model's forward, routed against dense: CRAM with attention on every 64th token
(about the share a consolidated SRCD model keeps) against the same weights with attention on
every token (the dense hybrid), computed by one SDPA call, the fastest exact dense hybrid. Both
through cfg.attn_impl: the routed side with each implementation this machine has (the twin; on
CUDA also the kernel). On CUDA the forward runs as train.py runs it: bf16 autocast, TF32 matmuls;
on a CPU in fp32.

--memories times the working memories instead, forward + backward per token: each in its fast form
(the chunked scans) against its plain twin (the token loop), as train.py runs them (fp32 on a CPU,
bf16 autocast on CUDA).

--kernel times routed attention alone against dense causal SDPA: kernel.py's Triton kernel in bf16
on CUDA, its PyTorch twin cram.routed_attention in fp32 on a CPU.

--generate times generation (CRAM.prefill, then CRAM.step): per model, context (the prompt already
in the cache) and batch, tokens/s, ms per step and the bytes the state and the key-value ring hold
per sequence, for CRAM with attention on every 64th token, the dense hybrid, a transformer of the
same size with a KV cache, and the recompute sample.py --no_cache does (small contexts only: it is
quadratic). --wide: n_embd 256 and 4 layers instead of 64 and 2.
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


def write_json(rows, json_path):
    """--json FILE: the rows a table printed, as a JSON list (nothing without a path)."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def print_table(rows, json_path=None):
    """One line per row: routed ms against dense ms, their ratio, the ideal 1/p, memory on a GPU."""
    print(f"{'device':6} {'impl':24} {'T':>6} {'p':>5} {'pass':8} {'ms':>9} {'ms_dense':>9} "
          f"{'ratio':>7} {'ideal':>5} {'MiB':>7} {'MiB_dense':>9}")
    for r in rows:
        ideal = "-" if r["ideal"] is None else f"{r['ideal']:.0f}"
        mem = "-" if r["mem_MiB"] is None else f"{r['mem_MiB']:7.0f} {r['mem_dense_MiB']:9.0f}"
        print(f"{r['device']:6} {r['impl']:24} {r['T']:6d} {'1/%d' % round(1 / r['p']):>5} "
              f"{r['pass_']:8} "
              f"{r['ms']:9.2f} {r['ms_dense']:9.2f} {r['ratio']:7.2f} {ideal:>5} {mem}")
    write_json([{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows],
               json_path)


def routed_positions(B, T, p, device):
    """Every (1/p)-th position routed in each row, as router_mode="fixed" does: (b_idx, t_idx)."""
    k = round(1 / p)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, k - 1::k] = True
    return mask.nonzero(as_tuple=True)


def fwd_and_bwd(f, inputs, timer):
    """{"fwd": timer(f under no_grad), "fwd+bwd": timer(f then backward)}, each (ms, MiB)."""
    with torch.no_grad():
        fwd = timer(f)
    do = torch.randn_like(f())

    def step():
        for x in inputs:
            x.grad = None
        f().backward(do)
    return {"fwd": fwd, "fwd+bwd": timer(step)}


def attention_rows(device, B, H, T, D, dtype, ps, attn, timer):
    """attn (the kernel or the twin) on a routed share p vs dense causal SDPA on every query;
    window = T, so both compute the same causal attention on the routed rows."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    dense = fwd_and_bwd(lambda: cram.dense_attention(q, k, v, T), (q, k, v), timer)
    rows = []
    for p in ps:
        b, t = routed_positions(B, T, p, device)
        qr = q.detach()[b, :, t].requires_grad_()                          # (M, H, D)
        routed = fwd_and_bwd(lambda: attn(qr, k, v, b, t, T), (qr, k, v), timer)  # noqa: B023
        for name in ("fwd", "fwd+bwd"):
            (ms, mem), (md, memd) = routed[name], dense[name]
            rows.append(dict(T=T, p=p, pass_=name, ms=ms, ms_dense=md, ratio=md / ms, ideal=1 / p,
                             mem_MiB=mem, mem_dense_MiB=memd, B=B, H=H, D=D, M=len(b)))
    return rows


def routed_attention_table(quick, json_path):
    """Routed attention alone against dense causal SDPA: the Triton kernel in bf16 on CUDA, the
    PyTorch twin in fp32 on a CPU."""
    ps = (1, 1 / 4, 1 / 16, 1 / 64)
    if torch.cuda.is_available() and cram.triton_attention() is not None:
        # bf16, B*H = 96 as GPT-2 small's 12 heads of 64, B=8
        dev, B, H, D, dtype, timer = "cuda", 8, 12, 64, torch.bfloat16, gpu_timer
        runs = [(T, ps) for T in ((1024, 4096) if quick else (1024, 4096, 16384))]
        impl, attn = "kernel", cram.triton_attention()
    else:  # the twin forms (H, m, span) scores per row, so the dense end (p = 1 at T = 4096:
        # 256 MiB per pass) is left to the full run
        dev, B, H, D, dtype, timer = "cpu", 1, 4, 64, torch.float32, cpu_timer(3 if quick else 5)
        runs = ([(1024, ps), (4096, ps[2:])] if quick
                else [(1024, ps), (4096, ps), (16384, ps[2:])])
        impl, attn = "twin", cram.routed_attention
    print(f"# {dev}: B={B} H={H} D={D} {str(dtype)[6:]}, window=T, routed = every (1/p)-th "
          "position, dense = SDPA(is_causal=True) on all T")
    rows = []
    for T, tps in runs:
        rows += [dict(device=dev, impl=impl, dtype=str(dtype)[6:], **r)
                 for r in attention_rows(dev, B, H, T, D, dtype, tps, attn, timer)]
    print_table(rows, json_path)


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


# (row name, config, plain twin). "mamba2, 2 heads" has Palimpsa's state size: Palimpsa carries M
# and
# Ibar, 2 H D^2 numbers with D = n_embd / H; Mamba2-style carries M alone, so half the heads.
MEMORY_FORMS = [("gated", dict(wm_kind="gated"), cram.gated_scan_sequential),
                ("palimpsa", dict(wm_kind="palimpsa"), cram.palimpsa_scan_sequential),
                ("mamba2", dict(wm_kind="mamba2"), cram.palimpsa_scan_sequential),
                ("mamba2, 2 heads", dict(wm_kind="mamba2", n_head=2),
                 cram.palimpsa_scan_sequential),
                ("palimpsa, 2 heads", dict(wm_kind="palimpsa", n_head=2),
                 cram.palimpsa_scan_sequential)]


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
            def step(wm=wm, x=x, dtau=dtau, scan=scan):
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
    """One line per (memory, form): ms per call, us per token, time relative to the gated
    memory's chunked scan."""
    print(f"{'device':6} {'memory':17} {'form':10} {'H':>2} {'B':>3} {'T':>5} {'ms':>9} "
          f"{'us/token':>9} "
          f"{'x gated':>8} {'MiB':>7}")
    for r in rows:
        mem = "-" if r["mem_MiB"] is None else f"{r['mem_MiB']:.0f}"
        print(f"{r['device']:6} {r['memory']:17} {r['form']:10} {r['H']:2d} {r['B']:3d} "
              f"{r['T']:5d} {r['ms']:9.1f} "
              f"{r['us_per_token']:9.2f} {r['vs_gated']:8.2f} {mem:>7}")
    write_json(rows, json_path)


# (row name, config): CRAM with attention forced on every 64th token, the dense hybrid (the same
# model with attention on every token), a transformer of the same size (no working memory,
# position embeddings, attention everywhere: its cache is the KV cache). Every window covers the
# whole sequence, so all three can see all of it.
GEN_MODELS = [("cram 1/64", dict(router_mode="fixed", fixed_every=64)),
              ("dense hybrid", dict(router_mode="always")),
              ("transformer", dict(wm_kind="none", router_mode="always"))]


def expand(x, B):
    """A cache's tensors (or tuples of them) with their one row repeated B times."""
    if isinstance(x, tuple):
        return tuple(expand(y, B) for y in x)
    return x.expand(B, *x.shape[1:]).contiguous() if torch.is_tensor(x) else x


def timed_steps(model, cache1, B, steps):
    """(seconds, cache) of `steps` steps from cache1 repeated to B rows, a fresh copy each time.
    Seconds of this process's CPU time: on one thread that is the compute, without the time slices
    other jobs on a shared machine take (wall time counts them)."""
    cache = cram.Cache(cache1.pos, [cram.LayerCache(expand(c.wm, B), expand(c.k, B),
                                                    expand(c.v, B)) for c in cache1.layers])
    nxt = torch.randint(0, model.cfg.vocab_size, (B, 1))
    t0 = time.process_time()
    for _ in range(steps):
        model.step(nxt, cache=cache)
    return time.process_time() - t0, cache


def generation_rows(name, settings, context, batches, n_embd, n_layer, steps, timer):
    """Steps of one model after a prompt of `context` tokens, for each batch size: tokens/s,
    ms per step (a token in each row), and the cache's bytes per sequence. The prompt is
    prefilled once, for one row, and its cache repeated for the batch: the rows' contents do not
    change the work of a step, and a dense prefill of 16 x 8192 tokens would dominate the run."""
    length = context + steps + 1
    cfg = cram.CramConfig(n_embd=n_embd, n_layer=n_layer, window=length,
                          n_positions=length if settings.get("wm_kind") == "none" else 0,
                          **settings)
    torch.manual_seed(0)
    model = cram.CRAM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, context))
    _, cache1 = model.prefill(prompt)
    rows = []
    for B in batches:
        timed_steps(model, cache1, B, steps)                       # warm-up
        seconds = min(timed_steps(model, cache1, B, steps)[0] for _ in range(timer))
        state, kv = timed_steps(model, cache1, B, 1)[1].nbytes()
        rows.append(dict(model=name, context=context, batch=B, tokens_per_s=B * steps / seconds,
                         ms_per_step=1e3 * seconds / steps, state_KiB=state / B / 2**10,
                         kv_KiB=kv / B / 2**10, n_embd=n_embd, n_layer=n_layer))
    return rows


def recompute_rows(context, batches, n_embd, n_layer, steps, timer):
    """sample.py --no_cache's way for CRAM 1/64: the whole context rerun for every token."""
    cfg = cram.CramConfig(n_embd=n_embd, n_layer=n_layer, window=context, router_mode="fixed",
                          fixed_every=64)
    torch.manual_seed(0)
    model = cram.CRAM(cfg).eval()
    rows = []
    for B in batches:
        ids = torch.randint(0, cfg.vocab_size, (B, context))
        with torch.no_grad():
            model(ids)                                             # warm-up
            times = []
            for _ in range(timer):
                t0 = time.process_time()                           # as timed_steps
                for _ in range(steps):
                    model(ids)
                times.append(time.process_time() - t0)
        seconds = min(times)
        rows.append(dict(model="recompute", context=context, batch=B,
                         tokens_per_s=B * steps / seconds, ms_per_step=1e3 * seconds / steps,
                         state_KiB=None, kv_KiB=None, n_embd=n_embd, n_layer=n_layer))
    return rows


def generation_table(quick, wide, json_path):
    """Generation from a cache against the recompute, printed and optionally written as JSON."""
    n_embd, n_layer = (256, 4) if wide else (64, 2)
    if quick:  # a smoke test: seconds
        contexts, batches, steps, timer, recompute = (32, 128), (1, 4), 8, 1, (32,)
    else:
        contexts, batches, steps, timer, recompute = (512, 1024, 2048, 8192), (1, 16), 64, 3, \
            (512, 1024)
    print(f"# cpu, {torch.get_num_threads()} thread, fp32, CPU time: n_embd={n_embd} "
          f"n_layer={n_layer} H=4; prefill `context` tokens, then time {steps} steps (best of "
          f"{timer}); window = the whole sequence; recompute: the full forward on the context "
          "per token (CRAM 1/64)")
    print(f"{'model':13} {'context':>7} {'batch':>5} {'tokens/s':>10} {'ms/step':>8} "
          f"{'state KiB/seq':>13} {'kv KiB/seq':>10}")
    kib = lambda v: "-" if v is None else f"{v:.1f}"
    rows = []
    for context in contexts:
        new = []
        for name, settings in GEN_MODELS:
            new += generation_rows(name, settings, context, batches, n_embd, n_layer, steps, timer)
        if context in recompute:
            new += recompute_rows(context, batches, n_embd, n_layer, 2 if quick else 4, timer)
        for r in new:
            print(f"{r['model']:13} {r['context']:7d} {r['batch']:5d} {r['tokens_per_s']:10.1f} "
                  f"{r['ms_per_step']:8.2f} {kib(r['state_KiB']):>13} {kib(r['kv_KiB']):>10}",
                  flush=True)
        rows += new
    write_json(rows, json_path)
    return rows


def main():
    ap = argparse.ArgumentParser(description="the whole CRAM forward, routed vs dense")
    ap.add_argument("--n", type=int, default=4096, help="sequence length")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    ap.add_argument("--memories", action="store_true", help="time the working memories instead")
    ap.add_argument("--kernel", action="store_true",
                    help="time routed attention alone (the kernel on CUDA, else its twin) vs SDPA")
    ap.add_argument("--generate", action="store_true",
                    help="time generation from a cache (CRAM, dense hybrid, transformer) and the "
                    "recompute")
    ap.add_argument("--wide", action="store_true", help="--generate: n_embd 256, 4 layers")
    ap.add_argument("--quick", action="store_true",
                    help="--kernel: a subset, a minute on a CPU; --generate: seconds")
    ap.add_argument("--batch", type=int, default=16, help="--memories: batch size")
    ap.add_argument("--len", type=int, default=512, help="--memories: tokens per sequence")
    args = ap.parse_args()
    if min(args.n, args.batch, args.len) < 1:
        ap.error("--n, --batch and --len take positive ints")
    if torch.cuda.is_available():
        dev, timer = "cuda", gpu_timer
        impls = ["twin"] + (["kernel"] if cram.triton_attention() else [])
        # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        dev, timer, impls = "cpu", cpu_timer(5), ["twin"]
        torch.set_num_threads(1)  # CPU timings on one thread: repeatable, and fair to both sides
    if args.generate:
        torch.set_num_threads(1)  # one thread: repeatable, and the same for every model
        return generation_table(args.quick, args.wide, args.json)
    if args.kernel:
        return routed_attention_table(args.quick, args.json)
    if args.memories:
        precision = "bf16 autocast" if dev == "cuda" else "fp32, one thread"
        print(f"# {dev}: one working-memory layer (n_embd=64, H heads, chunk 16), forward + "
              f"backward, B={args.batch}, T={args.len}, {precision}")
        return print_memories(working_memories(dev, timer, args.batch, args.len), args.json)
    precision = "bf16 autocast" if dev == "cuda" else "fp32"
    print(f"# {dev}: CRAM n_embd=64 H=4 n_layer=2, {precision}, B=1, N={args.n}: attention on "
          "every 64th "
          f"token (router_mode=fixed) vs every token (router_mode=always, one SDPA call)")
    print_table([dict(device=dev, **whole_model(dev, timer, impl, args.n)) for impl in impls],
                args.json)


if __name__ == "__main__":
    main()
