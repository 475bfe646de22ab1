"""`rayalign pipeline` end to end on the tiny student: stopped in the middle, then resubmitted,
it finishes without redoing the stages it had completed, and its console shows its own progress,
not the libraries' logs.

Its Serve application takes the route prefix "/" on the session's Ray, as the shared deployment
of test_serve.py and test_eval.py does. The two never meet, in whatever order the modules run: the
pipeline shuts its application down when it has evaluated, and the shared one stops after its last
user, those two modules running one after the other (tests/conftest.py, SHARED_ENGINES)."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from rayalign import records
from rayalign.pipeline import run_pipeline
from rayalign.tasks import addition_prompts
from tests.conftest import PYTHON, ROOT, free_port

pytestmark = pytest.mark.integration

ENGINE = {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.1, "batch_size": 32,
          "engine_args": {"enforce_eager": True}}


def write_config(tmp_path, student, ray_session):
    train = addition_prompts(48, seed=71)
    held_out = addition_prompts(24, seed=72, exclude={r["id"] for r in train})
    records.write_rows(train, tmp_path / "train", "jsonl")
    records.write_rows(held_out, tmp_path / "eval", "jsonl")
    raw = {
        "run_dir": str(tmp_path / "run"),
        "cluster": {"address": ray_session.get_runtime_context().gcs_address},
        "clair": {"prompts": str(tmp_path / "train"), "target_model": str(student), "engine": ENGINE,
                  "sampling": {"temperature": 1.0, "max_tokens": 8}},
        "train": {"batch_size": 8, "micro_batch_size": 4, "num_workers": 2, "zero_stage": 2, "precision": "fp32",
                  "learning_rate": 1e-5, "max_length": 64, "max_prompt_length": 48, "checkpoint_every": 2},
        "serve": {"port": free_port(), "app_name": "rayalign-pipeline-test", "engine": ENGINE},
        "eval": {"kind": "exact", "data": str(tmp_path / "eval"), "max_tokens": 8},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_quiet(console: str) -> None:
    """A command's console is for people: its own lines, not the libraries' logs, which stay in
    the Ray log folder it names."""
    lines = console.split("\n")  # as a terminal shows them: a progress bar redraws its own line
    assert any(line.startswith("rayalign: the logs of Ray, vLLM and DeepSpeed are in /") for line in lines), console
    assert "Traceback" not in console
    chatter = [line for line in lines
               if re.search(r"\b(INFO|DEBUG)\b|Deployment Options|Triton|streaming_executor|core_worker", line)]
    assert not chatter, chatter
    assert len(lines) <= 60, console


def test_pipeline_resumes_after_a_stop(tmp_path, student, ray_session):
    from rayalign.config import load_config

    path = write_config(tmp_path, student, ray_session)
    run = tmp_path / "run"
    log = tmp_path / "pipeline.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([PYTHON, "-m", "rayalign.cli", "pipeline", "--config", str(path)], cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    manifest = run / "manifest.json"
    deadline = time.time() + 600
    # Stop it once CLAIR and the reference pass are done, while it trains.
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and "reference" in json.loads(manifest.read_text()).get("stages", {}):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the pipeline ended before the stop: {log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shards = sorted(p.name for p in (run / "clair").rglob("part-*"))
    reference = sorted(p for p in (run / "reference").iterdir() if p.is_dir())
    assert shards and len(reference) == 1
    reference_mtime = (reference[0] / "pairs.parquet").stat().st_mtime_ns

    assert_quiet(log.read_text())  # CLAIR, the reference pass and training's start

    resumed = subprocess.run([PYTHON, "-m", "rayalign.cli", "pipeline", "--config", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_quiet(resumed.stdout + resumed.stderr)  # training, serving and the evaluation
    # The logs it kept off the console are in the run directory (a link to the Ray log folder).
    assert (run / "logs").is_symlink() and (run / "logs" / "gcs_server.out").exists()
    assert f"are in {run / 'logs'} (a link to /" in resumed.stdout
    result = json.loads(manifest.read_text())
    stages = result["stages"]
    assert list(stages) == ["clair", "reference", "train", "serve+eval"]
    assert stages["clair"]["pairs"] > 0
    # CLAIR sent nothing again and the reference pass was reused, not recomputed.
    assert sorted(p.name for p in (run / "clair").rglob("part-*")) == shards
    assert json.loads((run / "clair" / "manifest.json").read_text())["this_run"]["pairs"] == 0
    assert (reference[0] / "pairs.parquet").stat().st_mtime_ns == reference_mtime
    assert stages["train"]["reference_reused"] == 1
    assert (run / "train" / "final" / "model.safetensors").exists()

    evaluation = result["result"]["eval"]
    assert set(evaluation["results"]) == {"base", "aligned"}
    # The evaluation's accuracy is what its per-example records say.
    examples = [json.loads(line) for line in (run / "eval" / "examples.jsonl").read_text().splitlines()]
    for name, scores in evaluation["results"].items():
        mine = [e for e in examples if e["model"] == name]
        assert scores["scored"] == len(mine) == 24
        assert scores["correct"] == sum(bool(e["correct"]) for e in mine)
        # The console ends with the evaluation's table, not a JSON dump.
        assert f"| {name} | {100 * scores['accuracy']:.1f}% | " in resumed.stdout
    assert resumed.stdout.rstrip().endswith(f"stages, timings and results in {run / 'manifest.json'}")
    saved = json.loads((run / "manifest.json").read_text())
    assert saved["git_commit"] and "ray" in saved["packages"] and saved["config"]["train"]["batch_size"] == 8

    # Every stage's output ends with its manifest (rayalign.stage.finish).
    for folder, stage in ((run / "clair", "clair"), (reference[0], "reference"), (run / "train", "train"),
                          (run / "eval", "eval")):
        assert json.loads((folder / "manifest.json").read_text())["stage"] == stage
    assert json.loads((reference[0] / "manifest.json").read_text())["key"].startswith(reference[0].name)

    # A third submission finds everything done: the evaluation is reused, nothing is served.
    evaluated = (run / "eval" / "manifest.json").read_text()
    again = run_pipeline(load_config(path))
    assert again["result"]["eval"] == evaluation
    assert (run / "eval" / "manifest.json").read_text() == evaluated
    assert again["stages"]["serve+eval"]["seconds"] < 5
