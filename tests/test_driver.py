"""The driver that `pipeline`, `demo` and `replicate` run their stages on (rayalign.driver)."""

import json

import pytest

from rayalign.config import load_config
from rayalign.driver import Run


def read(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_each_stage_is_recorded_as_it_ends_with_its_numbers_and_strings(tmp_path):
    run = Run(tmp_path)
    run.describe(load_config(None, ["seed=7", "train.seed=3"]), study="demo")
    saved = read(tmp_path)
    assert saved["seeds"] == {"run": 7, "train": 3, "sampling": 0} and saved["study"] == "demo"
    assert saved["config"]["train"]["seed"] == 3 and "ray" in saved["packages"] and saved["stages"] == {}

    def clair():
        assert list(read(tmp_path)["stages"]) == ["student"]  # the earlier stage is saved already
        return {"pairs": 12, "path": "/p", "contrast": {"jaccard": 0.5}, "seconds": 99}

    assert run.stage("student", lambda: "/student") == "/student"
    assert run.stage("clair", clair)["contrast"] == {"jaccard": 0.5}
    stages = read(tmp_path)["stages"]
    assert list(stages) == ["student", "clair"]
    # The numbers and strings it returned, its own seconds (not a "seconds" it reported).
    assert set(stages["clair"]) == {"seconds", "pairs", "path"} and stages["clair"]["pairs"] == 12
    assert stages["clair"]["seconds"] < 5

    # A resubmitted run keeps what was recorded and adds to it.
    again = Run(tmp_path)
    again.stage("train", lambda: {"steps": 4})
    result = again.finish(models={"base": "b"})
    assert list(read(tmp_path)["stages"]) == ["student", "clair", "train"]
    assert read(tmp_path)["result"] == {"models": {"base": "b"}} == result["result"]


def test_a_failed_stage_is_recorded_then_raised_or_with_keep_going_kept_and_passed(tmp_path, capsys):
    run = Run(tmp_path)

    def broken():
        raise ValueError("no pairs in seed 3")

    with pytest.raises(ValueError, match="no pairs in seed 3"):
        run.stage("clair", broken)
    assert read(tmp_path)["stages"]["clair"]["error"] == "ValueError: no pairs in seed 3"

    assert run.stage("seed-3/train/clair-dpo", broken, keep_going=True) is None
    failed = read(tmp_path)["stages"]["seed-3/train/clair-dpo"]
    assert failed["error"] == "ValueError: no pairs in seed 3"
    kept = tmp_path / "errors" / "seed-3-train-clair-dpo.txt"
    assert failed["traceback"] == str(kept)
    assert "Traceback" in kept.read_text() and "in broken" in kept.read_text()
    assert "rayalign: seed-3/train/clair-dpo failed: ValueError: no pairs in seed 3" in capsys.readouterr().out
    # A later success replaces the failure.
    run.stage("clair", lambda: {"pairs": 3})
    assert "error" not in read(tmp_path)["stages"]["clair"]
