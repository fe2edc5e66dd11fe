"""What a CRR step costs on a small GPT-style LM (docs/training.md, "Cost of a CRR step").

For the TinyGPT of curvrate_fast.training (d = 64, 4 heads, 2 layers, vocabulary 64, batch 8,
penalty in the input-embedding space, orders 1..K, one fixed direction per sample) it measures,
against a plain step (forward + backward of the next-token loss):

- time: median over interleaved repetitions of (CRR step time) / (plain step time);
- memory: the bytes autograd holds for backward at the end of the forward (every tensor saved
  for backward, each storage counted once; measured with saved-tensor hooks), CRR / plain;

against K, the sequence length T, the penalized fraction s of the batch and the period k (the
penalty on every k-th step; the cost per step is then ((k - 1)·plain + CRR)/k), with the floor
model of a CRR step, 1 + s·R/k plain steps (R = K + 1 stored coefficient rows for a smooth model),
beside. Prints a Markdown table; ``--quick`` runs fewer repetitions.

    python examples/lm_step_cost.py [--quick] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from curvrate_fast.training import EmbeddingSpace, TinyGPT


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (the forward)."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    B, V = 8, 64

    def setup(T):
        torch.manual_seed(0)
        model = TinyGPT(vocab=V, d=64, heads=4, layers=2, max_len=256)
        ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
        return model, EmbeddingSpace(model), ids

    def plain_fn(space, ids):
        return lambda: space.task_loss(ids, ids)

    def crr_fn(space, ids, K, s):
        gen = torch.Generator().manual_seed(0)
        return lambda: space.loss(ids, ids, subset=None if s == 1 else s, generator=gen,
                                  crr=dict(orders=(1, K), scale=0.1))

    def timed(fn):
        t0 = time.perf_counter()
        fn().backward()
        return time.perf_counter() - t0

    rows = []
    configs = [(K, 64, 1.0, 1) for K in (1, 2, 3, 4)] + [(4, T, 1.0, 1) for T in (32, 128)] + \
        [(4, 64, s, 1) for s in (0.5, 0.25, 0.125)] + [(4, 64, 0.25, k) for k in (4, 10)] + [(4, 64, 1.0, 10)]
    cache = {}
    for K, T, s, k in configs:
        model, space, ids = setup(T)
        key = (K, T, s)
        if key not in cache:
            plain, crr = plain_fn(space, ids), crr_fn(space, ids, K, s)
            timed(plain), timed(crr)                       # warm-up
            ratios, tp, tc = [], [], []
            for _ in range(reps):
                a, b = timed(plain), timed(crr)
                tp.append(a)
                tc.append(b)
                ratios.append(b / a)
            mem = saved_bytes(crr) / saved_bytes(plain)
            cache[key] = (statistics.median(ratios), statistics.median(tp), statistics.median(tc), mem,
                          saved_bytes(crr))
        r, tp, tc, mem, crr_bytes = cache[key]
        per_step = ((k - 1) + r) / k
        floor = 1 + s * (K + 1) / k
        rows.append((K, T, s, k, tp * 1e3, tc * 1e3, per_step, floor, mem, crr_bytes / 2 ** 20))
        print(f"K={K} T={T} s={s} k={k}: {per_step:.2f}x (floor {floor:.2f}x), memory {mem:.1f}x", flush=True)

    print()
    print(f"TinyGPT d=64, 4 heads, 2 layers, batch {B}, {args.threads} thread(s), float32, CPU; "
          f"median of {reps} interleaved repetitions")
    print()
    print("| orders 1..K | T | subset s | every k | plain step (ms) | CRR step (ms) | cost per step (x plain) "
          "| floor 1 + s(K+1)/k | saved for backward (x plain) | CRR saved (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for K, T, s, k, tp, tc, per, floor, mem, mib in rows:
        print(f"| {K} | {T} | {s:g} | {k} | {tp:.1f} | {tc:.1f} | {per:.2f} | {floor:.2f} | {mem:.1f} | {mib:.1f} |")


if __name__ == "__main__":
    main()
