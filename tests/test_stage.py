"""The one rule by which a stage's output records what made it (rayalign.stage)."""

import json
import os

import pytest

from rayalign.clair.pipeline import shaping_fields
from rayalign.config import ConfigError, load_config
from rayalign.stage import flatten, guard, tree_digest


def test_guard_records_fields_and_refuses_others_naming_each_changed_key(tmp_path):
    out = tmp_path / "clair"
    fields = {"clair.mode": "clair", "clair.sampling.temperature": 0.7, "clair.sampling.seed": None}
    guard(out, fields, write=False)
    assert not out.exists(), "a dry run leaves no trace"
    guard(out, fields)
    assert json.loads((out / "stage.json").read_text()) == fields
    guard(out, dict(fields))  # the same fields: the output continues

    other = {**fields, "clair.sampling.temperature": 1.0, "clair.sampling.seed": 3, "clair.format": "parquet"}
    with pytest.raises(ConfigError) as error:
        guard(out, other)
    assert str(error.value) == (
        f"{out} holds output made with other settings: clair.format (unset -> \"parquet\"); "
        "clair.sampling.seed (unset -> 3); clair.sampling.temperature (0.7 -> 1.0). "
        f"Put back the old values, or use a new run_dir (or output), or remove {out}")
    assert json.loads((out / "stage.json").read_text()) == fields, "a refused run changes nothing"


def test_guard_reads_what_earlier_versions_kept(tmp_path):
    # Earlier versions kept CLAIR's shaping settings in clair_config.json, nested and unprefixed,
    # with `judge`, a key that chose nothing.
    current = shaping_fields(load_config(None, ["clair.sampling.temperature=0.9"]))
    old = {"judge": "verifier"}
    for key, value in current.items():
        *path, last = key.split(".")[1:]
        node = old
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    assert old["sampling"]["temperature"] == 0.9 and old["engine"]["dtype"] == "auto"
    (tmp_path / "clair_config.json").write_text(json.dumps(old))
    guard(tmp_path, current, legacy="clair_config.json")  # the same settings, judge aside
    assert json.loads((tmp_path / "stage.json").read_text()) == current

    (tmp_path / "stage.json").unlink()
    hotter = shaping_fields(load_config(None, ["clair.sampling.temperature=1.0"]))
    with pytest.raises(ConfigError, match=r"other settings: clair.sampling.temperature \(0.9 -> 1.0\)\. Put back"):
        guard(tmp_path, hotter, legacy="clair_config.json")


def test_shaping_fields_leave_out_pacing_and_secrets():
    fields = shaping_fields(load_config(None, ["clair.sampling.top_p=0.9", "clair.reviser.max_retries=7",
                                              "clair.reviser.api_key_env=MY_KEY"]))
    assert fields["clair.sampling.top_p"] == 0.9
    assert not [key for key in fields if key.endswith(("max_retries", "api_key_env", "requests_per_second",
                                                       "timeout_s", "base_url", "max_concurrency"))]
    assert "MY_KEY" not in json.dumps(fields)
    assert flatten("x", {"a": {"b": 1, "c": [2]}, "d": None}) == {"x.a.b": 1, "x.a.c": [2], "x.d": None}


def test_a_model_is_fingerprinted_by_content_not_by_time(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / ".cache").mkdir()
    before = tree_digest(model)
    os.utime(model / "config.json", (1, 1))  # copied or touched: the same model
    (model / ".cache" / "lock").write_text("x")  # hidden files do not count
    (model / "manifest.json").write_text('{"finished": "now"}')  # nor the record a stage keeps of it
    assert tree_digest(model) == before
    (model / "sub").mkdir()
    (model / "sub" / "manifest.json").write_text("{}")  # deeper down, a file like any other
    assert tree_digest(model) != before
    (model / "sub" / "manifest.json").unlink()
    (model / "config.json").write_text('{"hidden_size": 9}')
    assert tree_digest(model) != before


def test_a_student_is_reused_by_its_recipe_and_a_stronger_one_follows_its_starting_weights(tmp_path):
    """The student's folder ends with its manifest (stage.finish), keyed by its recipe; a model
    taught on from it is keyed by the starting weights' content, so a student taught again at the
    same path makes the stronger one taught again too."""
    from rayalign.stage import fingerprint, tree_digest
    from rayalign.student import train_student
    from rayalign.tasks import addition_prompts

    check = addition_prompts(4, seed=5)
    student = train_student(tmp_path / "student", steps=2, log_every=1, check_rows=check)
    saved = json.loads((student / "manifest.json").read_text())
    recipe = {"steps": 2, "lr": 1e-3, "batch_size": 64, "seed": 0, "target": None, "attempts": 1,
              "check": fingerprint([r["id"] for r in check])}
    assert (saved["stage"], saved["key"], saved["recipe"]) == ("student", fingerprint(recipe), recipe)
    assert saved["steps_run"] == 2 and saved["attempts"] == [{"seed": 0, "steps_run": 2, "accuracy": saved["accuracy"]}]
    weights = (student / "model.safetensors").stat().st_mtime_ns
    assert train_student(tmp_path / "student", steps=2, log_every=1, check_rows=check) == student
    assert (student / "model.safetensors").stat().st_mtime_ns == weights, "the same recipe is reused"

    # A student taught before stage manifests (its record in student.json, the check prompts'
    # ids hashed directly) is kept, and its record becomes the manifest.
    import hashlib

    old_recipe = {**recipe, "check": hashlib.sha256(json.dumps([r["id"] for r in check]).encode()).hexdigest()[:16]}
    earlier = {"recipe": old_recipe, "seed": 0, "steps_run": 2, "accuracy": saved["accuracy"],
               "attempts": saved["attempts"], "seconds": 1.5}
    (student / "manifest.json").unlink()
    (student / "student.json").write_text(json.dumps(earlier))
    assert train_student(tmp_path / "student", steps=2, log_every=1, check_rows=check) == student
    assert (student / "model.safetensors").stat().st_mtime_ns == weights
    kept = json.loads((student / "manifest.json").read_text())
    assert (kept["key"], kept["recipe"], kept["seconds"]) == (saved["key"], recipe, 1.5)
    assert json.loads((student / "student.json").read_text()) == earlier  # left as it was
    saved = kept

    stronger = train_student(tmp_path / "stronger", steps=1, log_every=1, check_rows=check, start_from=student)
    mine = json.loads((stronger / "manifest.json").read_text())
    assert mine["recipe"]["start_from"] == tree_digest(student) and mine["key"] != saved["key"]
    taught = (stronger / "model.safetensors").stat().st_mtime_ns
    train_student(tmp_path / "stronger", steps=1, log_every=1, check_rows=check, start_from=student)
    assert (stronger / "model.safetensors").stat().st_mtime_ns == taught

    train_student(tmp_path / "student", steps=2, lr=5e-4, log_every=1, check_rows=check)  # taught again
    assert (student / "model.safetensors").stat().st_mtime_ns != weights
    train_student(tmp_path / "stronger", steps=1, log_every=1, check_rows=check, start_from=student)
    assert (stronger / "model.safetensors").stat().st_mtime_ns != taught, "its start changed: taught again"
    assert json.loads((stronger / "manifest.json").read_text())["recipe"]["start_from"] == tree_digest(student)


def test_a_manifest_is_written_whole_and_read_back_only_under_its_key(tmp_path):
    from rayalign.stage import finish, finished, summary_of

    out = tmp_path / "train"
    assert finished(out) is None and finished(out, "k1") is None
    record = finish(out, "train", "k1", {"steps": 4, "final": "/m"})
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == record and (saved["stage"], saved["key"], saved["steps"]) == ("train", "k1", 4)
    assert saved["finished"].endswith("+00:00")  # UTC, to the second
    assert finished(out, "k1") == saved and finished(out) == saved
    assert finished(out, "k2") is None, "another key: not this output"
    assert summary_of(saved) == {"steps": 4, "final": "/m"}
    assert [p.name for p in out.iterdir()] == ["manifest.json"], "no temporary file left"
    with pytest.raises(ValueError, match=r"a train summary may not hold \['key'\]"):
        finish(out, "train", "k3", {"key": "mine"})
    assert finished(out, "k1") == saved, "a refused summary changes nothing"
