"""scripts/gpu-check --cpu: the reduced GPU check, run on the CPU with gloo as a user runs it."""

import os
import re
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, free_port


def test_the_cpu_check_runs_every_part_and_passes():
    done = subprocess.run([PYTHON, str(ROOT / "scripts" / "gpu-check"), "--cpu"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert lines[0].startswith("rayalign gpu-check (reduced) on CPU: torch ") and lines[0].endswith("gloo of size 1")
    parts = [line.split()[0] for line in lines if re.match(r"^(losses|log-probs|reference|train) ", line)]
    assert parts == ["losses", "log-probs", "reference", "train", "train"]
    assert "8 losses agree with the CPU" in done.stdout
    assert "16 pairs agree with the CPU" in next(line for line in lines if line.startswith("reference"))
    trains = [line for line in lines if line.startswith("train")]
    assert "DeepSpeed ZeRO-2: 4 steps, first step as on the CPU" in trains[0]
    assert "DeepSpeed ZeRO-3: 2 steps, first step as on the CPU" in trains[1]
    # Four updates of the same four-pair batches move the loss (APO-zero starts at exactly 1).
    first, last = (float(x) for x in re.search(r"loss (\S+), logps.*last loss (\S+),", trains[0]).groups())
    assert first == pytest.approx(1.0, abs=1e-6) and last < first
    assert re.fullmatch(r"rayalign gpu-check: passed in \d+ s", lines[-1])


def test_a_disagreement_fails_the_check_by_name(monkeypatch):
    from rayalign import gpu_check

    assert gpu_check.check_losses("cpu").startswith("8 losses agree")
    # No real device disagrees on demand here; a tolerance below zero makes every part disagree.
    monkeypatch.setattr(gpu_check, "LOSS_TOLERANCE", -1.0)
    with pytest.raises(gpu_check.CheckFailed, match=r"^loss apo_zero: 0\.00e\+00 from the CPU \(> -1\.0\)$"):
        gpu_check.check_losses("cpu")
