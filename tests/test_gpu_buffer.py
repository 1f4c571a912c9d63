"""Buffer with CUDA tensors (``PORTEP_DEVICE=cuda``), on 2 and 4 ranks sharing one GPU; skipped
without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests import tasks_gpu
from tests.conftest import WORKER_ENV
from tests.rankpool import RankPool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible to torch")


@pytest.mark.parametrize(("world_size", "num_nodes"), [(2, 1), (4, 2)], ids=["2ranks-1node", "4ranks-2node"])
def test_buffer_round_trips_on_gpu(world_size: int, num_nodes: int) -> None:
    pool = RankPool(world_size, env={**WORKER_ENV, "PORTEP_DEVICE": "cuda"})
    try:
        results = pool.run(tasks_gpu.gpu_round_trips, timeout=240, num_nodes=num_nodes, seed=81)
    finally:
        pool.close()
    print(results)
