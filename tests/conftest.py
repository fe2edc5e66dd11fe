"""Test setup: Triton kernels run through the interpreter on machines without a GPU. The variable
must be set before any kernel module is imported (docs/design.md §4)."""
import os

try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (still part of the default run)")


def pytest_collection_modifyitems(config, items):
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
