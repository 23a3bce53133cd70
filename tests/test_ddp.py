"""DDP on CPU (2 gloo processes) trains exactly what one process trains on the same global batches."""

from __future__ import annotations

import pytest
import torch
from _ddp_equivalence import train_both


@pytest.mark.slow
def test_two_ddp_ranks_end_identical_and_equal_to_one_process_on_the_global_batch(tmp_path):
    rank0, rank1, single, trained = train_both("offline", tmp_path)
    assert any(key.startswith("terms.fitnet.regressor") for key in trained)  # adapters are synchronised too
    # Accumulation reports each micro-batch's loss halved; step k of rank r is micro-batch 2k + r.
    micro = [2 * loss for loss in single["losses"]]
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(micro[0::2]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(rank1["losses"]), torch.tensor(micro[1::2]), rtol=1e-5, atol=0)
    assert len(rank0["losses"]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["kdcl", "byot", "tf_kd_reg", "offline_low_res", "offline_cross_modal", "deit"])
def test_more_schemes_end_identical_on_both_ranks_and_equal_to_one_process(tmp_path, scheme):
    # multi_teacher, dml (tests/test_scheme_*.py) and cs_kd, mean_teacher (test_scheme_self.py) have their own;
    # takd, born_again and tf_kd_self train Offline stages, which the test above covers.
    train_both(scheme, tmp_path)
