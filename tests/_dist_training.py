"""Two-process (gloo, CPU) CRR steps for tests/test_training_stack.py: DDP in its modes and FSDP2,
each rank on its half of the batch, against one process on the whole batch (float64).

The ranks run in spawned processes and write their gradients to files; the parent waits with a
timeout, so a crash or a hang is a failure, never a hung test run.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Dict

import torch
import torch.nn.functional as F

MODES = ("ddp", "ddp_find_unused", "ddp_find_unused_two_forwards", "ddp_static_graph", "ddp_no_sync", "fsdp2",
         "ddp_captured", "ddp_captured_refused")
B, T, V, H = 4, 6, 16, 8
CRR = dict(orders=(1, 3), scale=0.7)


def lm_loss(logits, y):
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), y.reshape(b * t), reduction="none").reshape(b, t).mean(1)


def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    u = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    return ids, y, u / u.flatten(1).norm(dim=1).reshape(B, 1, 1)


def build():
    from curvrate_fast.training import TinyGPT
    torch.manual_seed(0)
    return TinyGPT(vocab=V, d=H, heads=2, layers=2, max_len=8).double()


def step_loss(model, ids, y, u, one_forward: bool):
    """CE + CRR in the embedding space; ``one_forward``: the task loss read off the jet pass (one
    forward of the model), else an ordinary forward for the task loss and the jet pass."""
    from curvrate_fast.training import EmbeddingSpace
    space = EmbeddingSpace(model, loss_fn=lm_loss)
    crr = dict(CRR, directions=u)
    if one_forward:
        return space.loss(ids, y, crr=crr)
    return space.task_loss(ids, y) + space.penalty(ids, y, crr=crr)


def reference(one_forward: bool) -> Dict[str, torch.Tensor]:
    m = build()
    ids, y, u = data()
    step_loss(m, ids, y, u, one_forward).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def _run_mode(mode: str, rank: int):
    import torch.distributed as dist
    m = build()
    ids, y, u = data()
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    ids, y, u = ids[half], y[half], u[half]
    one = mode == "ddp_find_unused"
    if mode.startswith("ddp_captured"):
        return _run_captured(rank, refused=mode.endswith("refused"))
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in m.blocks:
            fully_shard(block)
        fully_shard(m)
        model = m
    else:
        kw = {"ddp_find_unused": dict(find_unused_parameters=True),
              "ddp_find_unused_two_forwards": dict(find_unused_parameters=True),
              "ddp_static_graph": dict(static_graph=True)}.get(mode, {})
        model = torch.nn.parallel.DistributedDataParallel(m, **kw)
    if mode == "ddp_no_sync":
        with model.no_sync():
            step_loss(model, ids[:1], y[:1], u[:1], one).backward()
        step_loss(model, ids[1:], y[1:], u[1:], one).backward()
        scale = 0.5  # two micro-batches of one sample: the sum of two means
    else:
        # static_graph: DDP's first iteration differs from the later ones; check the second
        for _ in range(2 if mode == "ddp_static_graph" else 1):
            model.zero_grad()
            step_loss(model, ids, y, u, one).backward()
        scale = 1.0
    grads = {}
    for n, p in m.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        grads[n] = (g * scale).detach().clone()
    dist.barrier()
    return grads


class Shifted(torch.nn.Module):
    """x + a buffer (constant, or with ``count`` a counter the forward updates in place)."""

    def __init__(self, count: bool = False):
        super().__init__()
        self.count = count
        self.register_buffer("shift", torch.full((3,), 0.5, dtype=torch.float64))

    def forward(self, x):
        if self.count:
            with torch.no_grad():
                self.shift.add_(1.0)
        return x + self.shift


def mlp_step_data(count: bool = False):
    """An MLP with a buffer, a batch of B, and explicit directions: what the captured-DDP modes
    train."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(Shifted(count), torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, generator=g, dtype=torch.float64)
    return m, x, torch.randint(0, 2, (B,), generator=g), torch.randn(B, 3, generator=g, dtype=torch.float64)


def reference_captured() -> Dict[str, torch.Tensor]:
    """The eager CRRLoss step of the captured-DDP modes, one process, the whole batch."""
    import curvrate_fast as cf
    m, x, y, u = mlp_step_data()
    cf.CRRLoss(orders=(1, 2), directions=u, scale=0.7)(m, x, y).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def _run_captured(rank: int, refused: bool):
    """CRRLoss(compile=...) through plain DDP, each rank on its half (its all-reduce runs in the
    gradient hooks the captured loss's backward fires; two steps, the second a replay), or DDP
    where a replay would skip its forward's work (refused: the messages are returned): with
    find_unused_parameters, and broadcasting a buffer the forward updates."""
    import torch.distributed as dist

    import curvrate_fast as cf
    m, x, y, u = mlp_step_data()
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    crit = cf.CRRLoss(orders=(1, 2), directions=u[half], scale=0.7, compile="eager")
    if refused:
        out = {}
        for what, model in (("find_unused", torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)),
                            ("updated_buffer", torch.nn.parallel.DistributedDataParallel(mlp_step_data(True)[0]))):
            try:
                crit(model, x[half], y[half])
                out[what] = "captured"
            except cf.CaptureError as e:
                out[what] = str(e)
        dist.barrier()
        return out
    model = torch.nn.parallel.DistributedDataParallel(m)    # broadcast_buffers: its buffer is constant
    for _ in range(2):
        model.zero_grad()
        crit(model, x[half], y[half]).backward()
    dist.barrier()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for mode in MODES:
            try:
                results[mode] = _run_mode(mode, rank)
            except Exception:
                results[mode] = traceback.format_exc()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_all(out_dir: str, timeout: float = 90.0):
    """Spawn two ranks, wait at most ``timeout`` s; (exit codes, {rank: results or None})."""
    import time

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, out_dir)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    codes = [p.exitcode for p in procs]
    res = {}
    for r in range(2):
        f = os.path.join(out_dir, f"rank{r}.pt")
        res[r] = torch.load(f, weights_only=False) if os.path.exists(f) else None
    return codes, res
