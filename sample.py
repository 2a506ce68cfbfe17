"""
Generate text from a language-model run (train.py --dataset=tokens), as nanoGPT's sample.py:

    python sample.py --out_dir=out/text_tiny --start="To be" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/text_tiny --no_cache   # rerun the context per token, to compare

Incremental by default: the prompt runs once through the parallel forward (CRAM.prefill), then
each new token through CRAM.step, which carries every layer's working-memory state (a fixed size)
and the keys and values of the last `window` tokens. The router decides per token and layer as in
evaluation, and attention runs only where it routes to episodic memory. --no_cache reruns the
whole model on the context for every token, as nanoGPT does. Either way the run prints tokens/s
and, per layer, the share of the new tokens for which attention ran.

Past the training context (the run's sequence length, cropped to as nanoGPT crops): with position
embeddings (n_positions) a model has no position beyond it, so both paths slide a window of that
length, the cached one by a fresh prefill per token, which is the recompute's cost. Without them
the cached path goes on past it: the working memory's state carries everything before, and
attention still sees only the last `window` tokens. The recompute instead forgets all but the last
context tokens, so from there on the two paths differ; and the model never trained on sequences
that long, so what its state does there is untested.
"""
import argparse
import math
import sys
import time

import torch

import data
import train
from cram import EPISODIC, ConfigError


def pick(logits, temperature, top_k, generator):
    """The next token (B, 1) from logits (B, V): divided by temperature (0: greedy), restricted to
    the top_k ids when top_k > 0."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@torch.no_grad()
def generate(model, ids, max_new_tokens, context, n_vocab, temperature=1.0, top_k=0,
             generator=None, use_cache=True):
    """ids (B, T) -> (B, T + max_new_tokens), and (L,) the share of the new tokens for which each
    layer ran attention (at the position whose logits drew the token). Each new token is drawn by
    pick from the last position's logits over the n_vocab real ids (the embedding's rounded-up
    rows were never targets). use_cache: prefill, then a step per token; else the recompute."""
    ran, cache = [], None                      # ran: per new token, (L,) share of rows attending
    for _ in range(max_new_tokens):
        if not use_cache:
            out = model(ids[:, -context:])
        elif cache is None or (model.pos_emb is not None and cache.pos >= context):
            out, cache = model.prefill(ids[:, -context:])   # the prompt, or a slid window
        else:
            out, cache = model.step(ids[:, -1:], cache=cache)
        ran.append(out["routing"]["z"][:, :, -1, EPISODIC].mean(1))
        nxt = pick(out["logits"][:, -1, :n_vocab].float(), temperature, top_k, generator)
        ids = torch.cat([ids, nxt], 1)
    share = torch.stack(ran).mean(0) if ran else torch.zeros(len(model.blocks))
    return ids, share


def main(argv):
    ap = argparse.ArgumentParser(prog="python sample.py",
                                 description="Generate text from a trained run.")
    ap.add_argument("--out_dir", required=True,
                    help="a run folder of train.py --dataset=tokens (its ckpt.pt)")
    ap.add_argument("--start", default="\n", help="the prompt")
    ap.add_argument("--num_samples", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="below 1 sharper, above 1 more random; 0 greedy")
    ap.add_argument("--top_k", type=int, default=200,
                    help="sample among the k likeliest tokens; 0: all")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    ap.add_argument("--no_cache", action="store_true",
                    help="rerun the whole context for every token (for comparison)")
    a = ap.parse_args(argv)
    bad = not 0 <= a.temperature < math.inf  # NaN too
    if bad or a.top_k < 0 or a.num_samples < 1 or a.max_new_tokens < 0:
        raise ConfigError("--temperature (finite) and --top_k must be >= 0, --num_samples >= 1, "
                          "--max_new_tokens >= 0")
    dev = train.pick_device(a.device)
    run, task, model, _ = train.load_run(a.out_dir, dev)
    if not isinstance(task, data.TokenFile):
        raise ConfigError(f"{a.out_dir} trained on {run['dataset']}: sampling needs a "
                          "language-model run (train.py --dataset=tokens)")
    enc = data.get_encoding(task.meta["encoding"])
    prompt = enc.encode(a.start, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    gen = torch.Generator(dev).manual_seed(a.seed)
    ids = torch.tensor([prompt] * a.num_samples, device=dev)
    t0 = time.perf_counter()
    out, attn = generate(model, ids, a.max_new_tokens, task.len, enc.n_vocab, a.temperature,
                         a.top_k, gen, use_cache=not a.no_cache)
    seconds = time.perf_counter() - t0
    texts = [enc.decode(row) for row in out.tolist()]
    for text in texts:
        print(text + "\n---------------")
    n = a.num_samples * a.max_new_tokens
    print(f"{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s "
          f"({'recompute' if a.no_cache else 'cache'}) | attention on new tokens: "
          + " ".join(f"L{i} {100 * float(s):.1f}%" for i, s in enumerate(attn)))
    return texts


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
