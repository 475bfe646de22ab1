"""The exported real model: SmolLM2-135M-Instruct trained by APO-zero under ZeRO-2 and ZeRO-3 on
2 Ray Train workers keeps its tied head, and the export answers alike in vLLM (tests/vllm_chat.py,
its own process) and transformers.

A module of its own so that the served model of test_real_model.py is stopped before two
training workers load the model (all of it shares one 24 GiB machine)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from rayalign.questions import question_prompts
from rayalign.records import prompt_messages, write_shard
from rayalign.train.data import encode_prompt
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.integration

QUESTIONS = question_prompts(20, "eval", seed=3)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory):
    """Question pairs in a sentence: chosen states the reference, rejected another question's answer."""
    rows = question_prompts(8, "train", seed=7)
    pairs = [{"id": row["id"], "prompt": row["prompt"],
              "chosen": [{"role": "assistant", "content": f"The answer is {row['reference']}."}],
              "rejected": [{"role": "assistant", "content": f"The answer is {rows[i - 1]['reference']}."}]}
             for i, row in enumerate(rows)]
    return write_shard(pairs[:4], tmp_path_factory.mktemp("real_pairs") / "part-00000.jsonl")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """One reference cache for both runs: the same model, pairs and settings, so the second run
    reuses the first one's reference log-probs (the reference pass is tested in test_train_ray)."""
    return tmp_path_factory.mktemp("real_reference")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_exported_checkpoint_keeps_its_tied_head_and_answers_alike_in_vllm_and_transformers(
        zero_stage, smollm2, real_pairs, reference_dir, ray_session, tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rayalign.train.run import run_train
    from tests.train_support import train_config

    config = train_config(tmp_path / "run", smollm2, real_pairs, f"train.zero_stage={zero_stage}",
                          "train.batch_size=4", "train.micro_batch_size=2", "train.learning_rate=1e-5",
                          "train.max_length=256", "train.max_prompt_length=128", "reference.batch_size=4",
                          f"reference.output={reference_dir}")
    final = Path(run_train(config)["final"])

    # Tied: one tensor for the embedding and the output layer, and it moved in training.
    with safe_open(final / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        head = f.get_tensor("lm_head.weight") if "lm_head.weight" in keys else embed
    assert torch.equal(head, embed)
    trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert trained.config.tie_word_embeddings
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()
    with safe_open(Path(smollm2) / "model.safetensors", "pt") as f:
        assert not torch.equal(f.get_tensor("model.embed_tokens.weight"), embed)

    chats = [prompt_messages(row) for row in QUESTIONS]
    (tmp_path / "chats.json").write_text(json.dumps(chats))
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "vllm_chat.py"), str(final), str(tmp_path / "chats.json"),
                           "24"], check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_vllm = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    eos = tokenizer.eos_token_id
    for chat, prompt_ids, vllm_ids in zip(chats, on_vllm["prompt_ids"], on_vllm["token_ids"]):
        assert prompt_ids == encode_prompt(tokenizer, chat)
        with torch.no_grad():
            out = trained.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                                   eos_token_id=eos, pad_token_id=eos)
        hf_ids = out[0, len(prompt_ids):].tolist()
        if hf_ids != vllm_ids:
            # Only where the two best next tokens tie within float rounding may greedy answers part.
            at = next(i for i, (x, y) in enumerate(zip(hf_ids + [None], vllm_ids + [None])) if x != y)
            with torch.no_grad():
                logits = trained(torch.tensor([prompt_ids + hf_ids[:at]])).logits[0, -1]
            top = logits.topk(2).values
            assert (top[0] - top[1]).item() < 1e-3, (chat, tokenizer.decode(hf_ids), tokenizer.decode(vllm_ids))
