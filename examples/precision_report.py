"""The mixed-precision policy's errors (docs/training.md, "Mixed precision").

For a small GPT-style LM (penalty in the embedding space) and a small GELU CNN, float32 copies of a
float64 model run under ``torch.autocast("cpu", dtype)``; against the float64 model it prints

- the relative error of each order's loss derivatives d_1..d_4 (‖d_n − d_n⁶⁴‖ / ‖d_n⁶⁴‖ over the batch);
- the worst-parameter relative error of the gradient of the plain CE loss and of the CRR penalty
  (orders 1–4), and their ratio (the issue's bound: ≤ 3);

for bfloat16 and float16 (with the policy's direction scaling and without it), the float16
gradients with loss scaling 2^16 as ``torch.amp.GradScaler`` does, and each row also without the
policy (the rules simply run under autocast) for comparison.

    python examples/precision_report.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import curvrate_fast as cf
from curvrate_fast.jets import dispatcher
from curvrate_fast.training import EmbeddingSpace, TinyGPT

D64 = torch.float64


def unit(t):
    return t / t.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def lm_case():
    torch.manual_seed(0)
    m = TinyGPT(vocab=64, d=64, heads=4, layers=2, max_len=64).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 32), generator=g)
    u = unit(torch.randn(8, 32, 64, generator=g, dtype=D64))

    def derivs(model):
        sp = EmbeddingSpace(model)
        return cf.loss_directional_derivatives(sp.forward_fn(ids), sp.origin(ids), ids, u.to(sp.origin(ids).dtype), 4,
                                               loss_fn=sp.loss_fn)

    def loss(model, part):
        sp = EmbeddingSpace(model)
        if part == "ce":
            return sp.task_loss(ids, ids)
        return sp.penalty(ids, ids, crr=dict(orders=(1, 4), directions=u.to(sp.origin(ids).dtype)))
    return "TinyGPT LM (d 64, T 32)", m, derivs, loss


def cnn_case():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3), nn.GELU(), nn.Conv2d(16, 32, 3), nn.GELU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(32 * 12 * 12, 64), nn.GELU(), nn.Linear(64, 10)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 28, 28, generator=g, dtype=D64)
    y = torch.randint(0, 10, (16,), generator=g)
    u = unit(torch.randn(16, 1, 28, 28, generator=g, dtype=D64))

    def dt(model):
        return next(model.parameters()).dtype

    def derivs(model):
        return cf.loss_directional_derivatives(model, x.to(dt(model)), y, u.to(dt(model)), 4)

    def loss(model, part):
        if part == "ce":
            return F.cross_entropy(model(x.to(dt(model))), y)
        return cf.crr_penalty(model, x.to(dt(model)), y, orders=(1, 4), directions=u.to(dt(model)))
    return "GELU CNN (MNIST-sized)", m, derivs, loss


def measure(case, dtype, scale, policy):
    name, m64, derivs, loss = case
    m32 = copy.deepcopy(m64).float()
    saved = dispatcher.precision.fp16_direction_scale, dispatcher._autocast
    dispatcher.precision.fp16_direction_scale = scale
    if not policy:
        dispatcher._autocast = lambda f, a, k: dispatcher._route_plain(f, a, k)
    S = 2.0 ** 16 if dtype == torch.float16 else 1.0
    try:
        ref = derivs(m64).detach()
        with torch.autocast("cpu", dtype=dtype):
            got = derivs(m32).detach().double()
        orders = [float((got[k] - ref[k]).norm() / ref[k].norm()) for k in range(4)]
        worst = {}
        for part in ("ce", "pen"):
            grads = []
            for model, amp in ((m64, False), (m32, True)):
                model.zero_grad()
                with torch.autocast("cpu", dtype=dtype, enabled=amp):
                    L = loss(model, part)
                (L * (S if amp else 1.0)).backward()
                grads.append({n: p.grad.double() / (S if amp else 1.0) for n, p in model.named_parameters()})
            worst[part] = max(float((grads[1][n] - grads[0][n]).norm() / grads[0][n].norm()) for n in grads[0])
    finally:
        dispatcher.precision.fp16_direction_scale, dispatcher._autocast = saved
    return orders, worst


def main() -> None:
    torch.set_num_threads(1)
    print("| model | autocast | policy | direction scale | d_1 | d_2 | d_3 | d_4 | CE grad | penalty grad | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in (lm_case(), cnn_case()):
        for dtype, scale in ((torch.bfloat16, 1.0), (torch.float16, 1.0),
                             (torch.float16, dispatcher.precision.fp16_direction_scale)):
            for policy in (True, False):
                orders, worst = measure(case, dtype, scale, policy)
                print(f"| {case[0]} | {str(dtype).replace('torch.', '')} | {'yes' if policy else 'no'} | "
                      f"{scale:g} | " + " | ".join(f"{e:.1e}" for e in orders) +
                      f" | {worst['ce']:.1e} | {worst['pen']:.1e} | {worst['pen'] / worst['ce']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
