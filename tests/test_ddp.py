"""DDP on CPU (2 gloo processes) trains exactly what one process trains on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # per-rank BN statistics, by design


def _train(mode: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_equivalence.py"), mode, str(out)],
                            cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_ddp_ranks_end_identical_and_equal_to_one_process_on_the_global_batch(tmp_path):
    _train("ddp", tmp_path)
    _train("single", tmp_path)
    rank0, rank1, single = (torch.load(tmp_path / f"{name}.pt", weights_only=True)
                            for name in ("ddp-rank0", "ddp-rank1", "single-rank0"))
    trained = [key for key in rank0["state_dict"] if not key.endswith(BUFFERS)]
    assert any(key.startswith("terms.fitnet.regressor") for key in trained)  # adapters are synchronised too
    for key in trained:
        assert torch.equal(rank0["state_dict"][key], rank1["state_dict"][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(rank0["state_dict"][key], single["state_dict"][key], rtol=1e-5, atol=1e-6,
                                   msg=lambda text: f"{key}: DDP and one process disagree. {text}")
    # Accumulation reports each micro-batch's loss halved; step k of rank r is micro-batch 2k + r.
    micro = [2 * loss for loss in single["losses"]]
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(micro[0::2]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(rank1["losses"]), torch.tensor(micro[1::2]), rtol=1e-5, atol=0)
    assert len(rank0["losses"]) == 4
