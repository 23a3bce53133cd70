"""DDP on CPU (2 gloo processes) trains exactly what one process trains on the same global batches, for every
scheme walked here (one pair of script runs for all of them: tests/_ddp_equivalence.py). Schemes with a DDP test
of their own: cs_kd, mean_teacher (test_scheme_self.py), adversarial, the data-free schemes; takd, born_again and
tf_kd_self train Offline stages."""

from __future__ import annotations

import pytest
import torch
from _ddp_equivalence import MODULES, train_both


def losses_are_the_accumulated_micro_batches(rank0: dict, rank1: dict, single: dict, rtol: float) -> None:
    # Accumulation reports each micro-batch's loss halved; step k of rank r is micro-batch 2k + r.
    micro = [2 * loss for loss in single["losses"]]
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(micro[0::2]), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(rank1["losses"]), torch.tensor(micro[1::2]), rtol=rtol, atol=0)
    assert len(rank0["losses"]) == 4


@pytest.mark.slow
def test_every_scheme_ends_identical_on_both_ranks_and_equal_to_one_process(tmp_path):
    results = train_both(list(MODULES), tmp_path)
    rank0, rank1, single, trained = results["offline"]
    assert any(key.startswith("terms.fitnet.regressor") for key in trained)  # adapters are synchronised too
    losses_are_the_accumulated_micro_batches(rank0, rank1, single, rtol=1e-5)
    # Three teachers drawn at random per step: the draw is the same on both ranks and in one process.
    rank0, rank1, single, trained = results["multi_teacher"]
    assert any(key.startswith("terms.fitnet_teacher2.regressor") for key in trained)
    losses_are_the_accumulated_micro_batches(rank0, rank1, single, rtol=1e-4)
    assert any(key.startswith("other_peers.0.") for key in results["dml"][3])
    assert any(key.startswith("student.blocks") for key in results["minilm"][3])
    assert {"terms.vitkd.mask_token", "terms.vitkd.high_aligner.weight"} <= set(results["vitkd"][3])
