"""
Generate text from a language-model run (train.py --dataset=openwebtext), as nanoGPT's sample.py:

    python sample.py --out_dir=out/text_tiny --start="To be" --num_samples=3 --max_new_tokens=200

Each new token runs the whole model on the context (no cache; the working memory's state would be
the cache), so the router decides per token and layer at generation time as in evaluation:
attention runs only where it routes to E. The context is cropped to the run's training length.
"""
import argparse
import sys

import torch

import data
import train
from cram import ConfigError


@torch.no_grad()
def generate(model, ids, max_new_tokens, context, n_vocab, temperature=1.0, top_k=0, generator=None):
    """ids (B, T) -> (B, T + max_new_tokens): each step samples the next token from the model's
    last distribution divided by temperature (0: greedy), restricted to the top_k ids when top_k > 0
    and always to the n_vocab real ones (the embedding's rounded-up rows were never targets)."""
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])["logits"][:, -1, :n_vocab].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    return ids


def main(argv):
    ap = argparse.ArgumentParser(prog="python sample.py", description="Generate text from a trained run.")
    ap.add_argument("--out_dir", required=True, help="a run folder of train.py --dataset=openwebtext (its ckpt.pt)")
    ap.add_argument("--start", default="\n", help="the prompt")
    ap.add_argument("--num_samples", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="below 1 sharper, above 1 more random; 0 greedy")
    ap.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 0: all")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    a = ap.parse_args(argv)
    if a.temperature < 0 or a.top_k < 0 or a.num_samples < 1 or a.max_new_tokens < 0:
        raise ConfigError("--temperature and --top_k must be >= 0, --num_samples >= 1, --max_new_tokens >= 0")
    dev = train.pick_device(a.device)
    run, task, model, _ = train.load_run(a.out_dir, dev)
    if not isinstance(task, data.TokenFile):
        raise ConfigError(f"{a.out_dir} trained on {run['dataset']}: sampling needs a language-model run "
                          "(train.py --dataset=openwebtext)")
    enc = data.get_encoding(task.meta["encoding"])
    prompt = enc.encode(a.start, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    gen = torch.Generator(dev).manual_seed(a.seed)
    ids = torch.tensor([prompt] * a.num_samples, device=dev)
    out = generate(model, ids, a.max_new_tokens, task.len, enc.n_vocab, a.temperature, a.top_k, gen)
    texts = [enc.decode(row) for row in out.tolist()]
    for text in texts:
        print(text + "\n---------------")
    return texts


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
