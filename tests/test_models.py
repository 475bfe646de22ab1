import hashlib
import json
import os
import subprocess

import pytest

from rayalign import events
from rayalign.models import CHAT_TEMPLATE, PRESETS, build_tokenizer, init_model
from tests.conftest import PYTHON, ROOT


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_model_is_deterministic_for_a_seed(tmp_path, tiny_model):
    again = init_model(tmp_path / "again", "tiny", seed=0)
    other = init_model(tmp_path / "other", "tiny", seed=1)
    assert digest(again / "model.safetensors") == digest(tiny_model / "model.safetensors")
    assert digest(again / "tokenizer.json") == digest(tiny_model / "tokenizer.json")
    assert digest(other / "model.safetensors") != digest(tiny_model / "model.safetensors")


def test_tiny_model_files_and_shape(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((tiny_model / "rayalign_model.json").read_text())
    assert meta == {"preset": "tiny", "tokenizer": "bpe", "seed": 0, "parameters": 459392}
    config = AutoConfig.from_pretrained(tiny_model)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 64)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], PRESETS["tiny"].vocab_size)


def test_bench_preset_has_about_25m_parameters(tmp_path):
    out = init_model(tmp_path / "bench", "bench")
    assert json.loads((out / "rayalign_model.json").read_text())["parameters"] == 25_174_528


def test_bench_large_preset_has_about_160m_parameters_and_the_cli_offers_every_preset():
    from rayalign.cli import build_parser
    from rayalign.models import build_model

    model = build_model("bench-large", build_tokenizer("bpe", None, vocab_size=8192))
    assert sum(p.numel() for p in model.parameters()) == 162_554_880
    init = build_parser()._subparsers._group_actions[0].choices["init-model"]
    assert next(a for a in init._actions if a.dest == "preset").choices == [
        "tiny", "bench", "bench-large", "smollm2-135m-instruct"]


def test_chat_template_renders_turns_with_eos(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi?</s>\n<|assistant|>\n"
    # Role markers are single special tokens.
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1


def test_bpe_round_trips_any_text():
    tok = build_tokenizer("bpe")
    text = "Zürich, 2024: naïve café — 42 × 7 = 294 ✓\n\ttabs"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_word_tokenizer_gives_one_token_per_digit():
    tok = build_tokenizer("word", ["add: 1 3 7 + 5 8 2 answer: 0 7 1 9", "9 4 6"])
    ids = tok("add: 1 3 7 + 5 8 2", add_special_tokens=False).input_ids
    assert len(ids) == 8
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "add: 1 3 7 + 5 8 2"
    assert tok("zebra", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_unknown_preset_and_tokenizer_are_named(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of tiny, bench, bench-large, not 'huge'"):
        init_model(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="tokenizer kind must be 'bpe' or 'word', not 'char'"):
        build_tokenizer("char")


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_vllm_generates_what_transformers_generates(tmp_path, tiny_model, preset):
    model = tiny_model if preset == "tiny" else init_model(tmp_path / preset, preset)
    # The tiny model runs vLLM's default compiled path, as a config without engine_args does.
    eager = [] if preset == "tiny" else ["eager"]
    before = engine_starts(model)
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "vllm_generate.py"), str(model), "8", *eager],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert [len(ids) for ids in result["vllm"]] == [8, 8]
    # Greedy decoding in fp32: vLLM's CPU engine and transformers agree token for token.
    assert result["vllm"] == result["hf"]
    # The engine's start was recorded in the engine's own process (rayalign.events, a vLLM plugin).
    started = engine_starts(model)[len(before):]
    assert len(started) == 1 and started[0]["pid"] != os.getpid(), started
    assert started[0]["dtype"] == "float32"  # as the script asked, seen by the engine itself


def engine_starts(model) -> list[dict]:
    return [e for e in events.read(os.environ[events.ENV]) if e["kind"] == "engine" and e["model"] == str(model)]
