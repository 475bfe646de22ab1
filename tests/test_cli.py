import json
import subprocess

from rayalign.cli import main
from tests.conftest import PYTHON, ROOT


def run_cli(*args):
    return subprocess.run([PYTHON, "-m", "rayalign.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_import_rayalign_is_fast_and_light():
    code = ("import sys, time; t = time.perf_counter(); import rayalign, rayalign.config, rayalign.records, "
            "rayalign.cli; print(time.perf_counter() - t); "
            "print(sorted(m for m in ('vllm', 'deepspeed', 'ray', 'ray.serve', 'torch') if m in sys.modules))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert float(out[0]) < 0.5
    assert out[1] == "[]"


def test_help_lists_every_subcommand():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("init-model", "validate-data", "import-pairs", "config", "clair", "train", "serve", "eval",
                 "pipeline", "demo", "questions"):
        assert name in proc.stdout


def test_validate_data_reports_file_and_line(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": ""}\nnot json\n'
                    '{"id": "a", "prompt": "again"}\n')
    assert main(["validate-data", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"rayalign validate-data: error: 3 bad rows in {path}"
    assert err[1] == f"{path}:2: 'prompt' is empty"
    assert err[2].startswith(f"{path}:3: malformed JSON")
    assert err[3] == f"{path}:4: duplicate id 'a' (first at line 1)"

    rejects = tmp_path / "rejects.jsonl"
    assert main(["validate-data", str(path), "--quarantine", str(rejects)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: 4 prompts rows read, 1 good; 3 bad written to {rejects}"
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [2, 3, 4]


def test_import_pairs_command(tmp_path, capsys):
    src = tmp_path / "uf.jsonl"
    src.write_text(json.dumps({
        "prompt": "Say hi", "prompt_id": "x1", "score_chosen": 8.0, "score_rejected": 3.0,
        "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}],
    }) + "\n")
    assert main(["import-pairs", str(src), str(tmp_path / "pairs")]) == 0
    assert "1 rows read as layout 'ultrafeedback', 1 pairs written" in capsys.readouterr().out
    (shard,) = (tmp_path / "pairs").iterdir()
    row = json.loads(shard.read_text())
    assert row["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Hi!"}]
    assert row["source"] == "offpolicy"


def test_config_command_prints_resolved_values_and_names_bad_keys(capsys):
    assert main(["config", "train.beta=0.5"]) == 0
    assert "  beta: 0.5\n" in capsys.readouterr().out
    assert main(["config", "train.betta=0.5"]) == 2
    assert "rayalign config: error: train.betta: unknown key" in capsys.readouterr().err


def test_eval_without_data_names_the_key(capsys):
    assert main(["eval"]) == 2
    assert "rayalign eval: error: eval.data: is required for kind 'exact'" in capsys.readouterr().err


def test_init_model_command(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m"), "--tokenizer", "word"]) == 0
    # the last line: DeepSpeed, when transformers first imports it in this process, logs a line above
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote a tiny model with a word tokenizer to {tmp_path / 'm'}"
    assert json.loads((tmp_path / "m" / "rayalign_model.json").read_text())["tokenizer"] == "word"


def test_questions_command_writes_disjoint_splits_and_refuses_to_overwrite(tmp_path, capsys):
    from rayalign import records
    from rayalign.questions import question_prompts

    out = tmp_path / "data"
    assert main(["questions", str(out), "--train", "16", "--eval", "8", "--seed", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote 16 train prompts to {out / 'train'}",
                                                    f"wrote 8 eval prompts to {out / 'eval'}"]
    assert records.load_prompts(out / "train") == question_prompts(16, "train", seed=2)
    assert records.load_prompts(out / "eval") == question_prompts(8, "eval", seed=2)
    assert main(["questions", str(out)]) == 2
    assert f"{out / 'train'} already holds prompts" in capsys.readouterr().err
    # Too many prompts: refused before anything is written.
    assert main(["questions", str(tmp_path / "big"), "--eval", "100000"]) == 2
    assert "rayalign questions: error: --eval: only " in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_demo_offers_the_student_and_the_real_model(capsys):
    import pytest

    from rayalign.cli import build_parser

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    assert next(a for a in demo._actions if a.dest == "model").choices == ("student", "smollm2-135m-instruct")
    with pytest.raises(SystemExit):
        main(["demo", "--model", "gpt-9"])
    assert "invalid choice: 'gpt-9'" in capsys.readouterr().err


def test_pipeline_checks_every_stage_before_the_first(tmp_path, tiny_model, capsys):
    from rayalign import records
    from rayalign.tasks import addition_prompts

    records.write_rows(addition_prompts(4, seed=1), tmp_path / "prompts", "jsonl")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text('{"id": "e1", "prompt": "add: 1 + 2", "reference": "3"}\n{"id": "e2", "prompt": ""}\n')
    run = tmp_path / "run"
    args = ["pipeline", f"run_dir={run}", f"clair.prompts={tmp_path / 'prompts'}",
            f"clair.target_model={tiny_model}", f"eval.data={held_out}"]
    # A bad evaluation row fails before CLAIR starts, not after training.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"rayalign pipeline: error: 1 bad row in {held_out}\n" in err and f"{held_out}:2: 'prompt' is empty" in err
    held_out.write_text('{"id": "e1", "prompt": "add: 1 + 2", "reference": "3"}\n')
    # So does a training key, and a reviser key of the first stage.
    assert main([*args, "train.loss_options.gama=1"]) == 2
    err = capsys.readouterr().err
    assert "rayalign pipeline: error: train.loss_options.gama: not an option of loss 'apo_zero'" in err
    reviser = ["clair.reviser.backend=openai", "clair.reviser.model=m", "clair.reviser.base_url=http://127.0.0.1:9/v1",
               "clair.reviser.api_key_env=RAYALIGN_NO_SUCH_KEY"]
    assert main([*args, *reviser]) == 2
    assert "rayalign pipeline: error: clair.reviser.api_key_env: " in capsys.readouterr().err
    assert not run.exists(), "nothing was started or written"
