"""Bad input: a clear ValueError/TypeError naming the argument, before any communication, and
the Buffer keeps working (checked on every rank, symmetrically)."""

from __future__ import annotations

import pytest

from tests import tasks_bad
from tests.rankpool import RankPool


@pytest.mark.parametrize("case", tasks_bad.CASES)
def test_bad_input(pool2: RankPool, case: str) -> None:
    pool2.run(tasks_bad.bad_input, case=case)


@pytest.mark.parametrize("case", ["ht_topk_idx_range", "ll_too_many_tokens", "ht_handle_other_mode"])
def test_bad_input_4ranks(pool4: RankPool, case: str) -> None:
    pool4.run(tasks_bad.bad_input, case=case)
