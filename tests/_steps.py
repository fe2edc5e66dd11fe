"""Training steps taken twice, for tests that compare a captured train_step with PyTorch's own;
a one-process group for tests of a DDP-wrapped model."""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from typing import Callable, Iterator, Tuple

import pytest
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
                torch_steps(loss, m, args, opt, 1)
        runs.append(m)
    return runs[0], runs[1]


def torch_steps(loss: Callable, model: nn.Module, args: tuple, opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` of PyTorch's own ``zero_grad(); loss(model, *args).backward(); step()``."""
    for _ in range(steps):
        opt.zero_grad()
        loss(model, *args).backward()
        opt.step()


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


@contextlib.contextmanager
def one_rank_process_group() -> Iterator[None]:
    """A gloo process group of one rank (file rendezvous), destroyed afterwards; skips the test
    where torch.distributed is missing."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("no torch.distributed")
    init = tempfile.NamedTemporaryFile(delete=False)
    init.close()
    dist.init_process_group("gloo", init_method=f"file://{init.name}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        os.unlink(init.name)
