"""Train a tiny GPT-style character LM with and without CRR and plot λ over training.

The text is generated (a small grammar of sentences and sums, so the run needs no download);
the penalty is taken in the input-embedding space (curvrate_fast.training.EmbeddingSpace), on a
random quarter of each batch. One process:

    python examples/train_tiny_lm.py --out tiny_lm_out            # about 2-3 minutes on 2 CPU cores

Two processes (DDP, gloo; each rank trains on its own half of every batch, the gradients are
all-reduced as for any loss):

    torchrun --nproc_per_node 2 examples/train_tiny_lm.py --out tiny_lm_out

Writes tiny_lm_out/lambda.csv and tiny_lm_out/lambda.png (λ on a fixed probe batch against the
step, plain vs CRR) and prints the final validation loss and λ of both runs.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from curvrate_fast.training import EmbeddingSpace, TinyGPT


def make_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    nouns = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone"]
    verbs = ["sees", "likes", "finds", "jumps over", "sits by", "walks to"]
    adjs = ["small", "big", "red", "old", "quick", "quiet"]
    out = []
    for _ in range(n_sentences):
        if rng.random() < 0.3:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            out.append(f"{a} plus {b} is {a + b}.")
        else:
            out.append(f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} "
                       f"the {rng.choice(adjs)} {rng.choice(nouns)}.")
    return " ".join(out)


def batches(data: torch.Tensor, B: int, T: int, g: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        yield torch.stack([data[s:s + T] for s in starts.tolist()])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--scale", type=float, default=50.0, help="CRR scale")
    p.add_argument("--orders", type=int, nargs=2, default=(1, 4))
    p.add_argument("--subset", type=float, default=0.25, help="penalized fraction of each batch")
    p.add_argument("--every", type=int, default=1, help="penalize every k-th step")
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--out", default="tiny_lm_out")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: leave)")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    if args.threads:
        torch.set_num_threads(args.threads)

    text = make_text(6000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    V = len(chars)
    probe = next(batches(val, 16, args.seq, torch.Generator().manual_seed(123)))
    val_batch = next(batches(val, 64, args.seq, torch.Generator().manual_seed(7)))

    results = {}
    for run, scale in (("plain", 0.0), ("crr", args.scale)):
        torch.manual_seed(0)                       # the same initial model on every rank and run
        base = TinyGPT(vocab=V, d=64, heads=4, layers=2, max_len=args.seq)
        model = torch.nn.parallel.DistributedDataParallel(base) if world > 1 else base
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        space = EmbeddingSpace(model)
        gen = torch.Generator().manual_seed(1000 + rank)   # each rank its own batches and directions
        data_iter = batches(train, args.batch, args.seq, gen)
        history = []
        t0 = time.perf_counter()
        for step in range(args.steps + 1):
            if step % args.probe_every == 0 and rank == 0:
                lam = EmbeddingSpace(base).curvature_rate(probe, probe, generator=torch.Generator().manual_seed(0))
                history.append((step, lam.value))
            if step == args.steps:
                break
            ids = next(data_iter)
            model.train()
            if scale and step % args.every == 0:
                loss = space.loss(ids, ids, subset=args.subset, generator=gen,
                                  crr=dict(orders=tuple(args.orders), scale=scale))
            else:
                loss = space.task_loss(ids, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            base.eval()
            val_loss = float(F.cross_entropy(base(val_batch)[:, :-1].reshape(-1, V), val_batch[:, 1:].reshape(-1)))
        results[run] = dict(history=history, val_loss=val_loss, seconds=seconds)
        if rank == 0:
            print(f"{run:5s}: validation loss {val_loss:.3f}, λ {history[-1][1]:.3f}, {seconds:.0f} s "
                  f"({world} process{'es' if world > 1 else ''})", flush=True)

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lambda.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "step", "lambda"])
            for run, r in results.items():
                for step, lam in r["history"]:
                    w.writerow([run, step, f"{lam:.6f}"])
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: wrote lambda.csv only")
        else:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for run, r in results.items():
                s, lam = zip(*r["history"])
                ax.plot(s, lam, marker="o", ms=3,
                        label=f"{run} (val. loss {r['val_loss']:.2f})" if run == "plain" else
                        f"CRR {args.orders[0]}–{args.orders[1]}, scale {args.scale}, subset {args.subset}"
                        f" (val. loss {r['val_loss']:.2f})")
            ax.set_xlabel("step")
            ax.set_ylabel("λ on a fixed probe batch (embedding space)")
            ax.set_title("tiny GPT-style LM, generated text")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "lambda.png"), dpi=120)
            print(f"wrote {os.path.join(args.out, 'lambda.png')}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
