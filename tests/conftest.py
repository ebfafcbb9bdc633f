"""Shared test settings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    """Modules that set ONE_THREAD = True run torch on one thread. Their models are tiny (8-64 channels): a second
    thread only adds synchronisation, which on a busy 2-core machine made steps 10-100x slower (measured: a tiny AE
    step took 0.4-3 s instead of 25 ms; the text-training fixture 84 s instead of 9 s). Module scope and autouse:
    it is set before the modules' own module-scoped fixtures train anything."""
    if not getattr(request.module, "ONE_THREAD", False):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
