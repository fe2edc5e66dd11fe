"""Training steps taken twice, for tests that compare a captured train_step with PyTorch's own."""
from __future__ import annotations

import copy
from typing import Callable, Tuple

import torch
from torch import nn

import curvrate_fast as cf


def torch_and_captured(loss: Callable, model: nn.Module, args: tuple, make_opt: Callable, *, steps: int = 3,
                       backend: str = "eager") -> Tuple[nn.Module, nn.Module]:
    """Copies of ``model`` after ``steps`` steps of ``loss(model, *args)``: (PyTorch's
    ``zero_grad(); backward(); step()``, ``cf.compile(loss, backend=...).train_step``), each
    copy with its own optimizer ``make_opt(parameters)``."""
    runs = []
    for captured in (False, True):
        m = copy.deepcopy(model)
        opt = make_opt(m.parameters())
        fast = cf.compile(loss, backend=backend)
        for _ in range(steps):
            if captured:
                fast.train_step(opt, m, *args)
            else:
                opt.zero_grad()
                loss(m, *args).backward()
                opt.step()
        runs.append(m)
    return runs[0], runs[1]


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)
