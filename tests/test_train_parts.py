"""Training parts without a cluster: tokenization and truncation, the data schedule, the LR
schedule, the DeepSpeed config, precision detection, fingerprints, the reference batch function
against a direct transformers computation, and config checks that fail before Ray starts."""

import dataclasses
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from rayalign.config import ConfigError
from rayalign.gpu_check import TorchEngine
from rayalign.train import engine, reference
from rayalign.train.data import Schedule, encode_pair, encode_prompt, tokenize_pairs
from rayalign.train.run import check_config, run_reference, run_train
from tests.train_support import toy_pairs, train_config, write_pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# ---- tokenization and truncation ---------------------------------------------------------------

def test_short_pair_is_kept_whole_with_chat_template_and_eos(tokenizer):
    row = {"id": "a", "prompt": "add: 1 2 3 + 4 5 6", "chosen": "0 5 7 9", "rejected": "0 5 8 9"}
    enc = encode_pair(tokenizer, row, max_length=64, max_prompt_length=32)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|assistant|>\n")
    assert enc.prompt_ids == ids(tokenizer, rendered)
    assert enc.chosen_ids == ids(tokenizer, "0 5 7 9") + [tokenizer.eos_token_id]
    assert enc.rejected_ids == ids(tokenizer, "0 5 8 9") + [tokenizer.eos_token_id]
    assert enc.truncated == []


def test_generated_token_ids_are_scored_when_they_decode_to_the_text(tokenizer):
    eos = tokenizer.eos_token_id
    # A sample split the way a model may write it, not the way its text tokenizes.
    pieces = [ids(tokenizer, piece) for piece in ("The wa", "ter is ", "warm")]
    generated = [t for piece in pieces for t in piece]
    assert tokenizer.decode(generated) == "The water is warm" and generated != ids(tokenizer, "The water is warm")
    row = {"id": "a", "prompt": "Hi?", "chosen": "The water is cold", "rejected": "The water is warm",
           "metadata": {"rejected_token_ids": generated + [eos]}}
    enc = encode_pair(tokenizer, row, max_length=64, max_prompt_length=32)
    assert enc.rejected_ids == generated + [eos]
    assert enc.chosen_ids == ids(tokenizer, "The water is cold") + [eos]
    # Ids without the eos get it; ids of another text (another tokenizer, an edited pair) are not used.
    assert encode_pair(tokenizer, {**row, "metadata": {"rejected_token_ids": generated}}, 64, 32).rejected_ids == (
        generated + [eos])
    edited = {**row, "rejected": "The water is hot"}
    assert encode_pair(tokenizer, edited, 64, 32).rejected_ids == ids(tokenizer, "The water is hot") + [eos]


def test_long_pair_is_truncated_and_an_unfittable_one_skipped(tokenizer):
    long_prompt = "the answer is " * 20 + "what now?"
    long_answer = " ".join(["water"] * 40)
    rows = [
        {"id": "short", "prompt": "Hi?", "chosen": "yes", "rejected": "no"},
        # Too long overall: the prompt keeps its last 16 tokens, completions fill the rest.
        {"id": "long", "prompt": long_prompt, "chosen": long_answer + " good", "rejected": "bad"},
        # The two answers differ only after max_length: nothing left to prefer.
        {"id": "same-prefix", "prompt": "Hi?", "chosen": long_answer + " a", "rejected": long_answer + " b"},
    ]
    report = tokenize_pairs(tokenizer, rows, max_length=32, max_prompt_length=16)
    assert report.counts() == {"pairs": 2, "prompts_truncated": 1, "completions_truncated": 1, "skipped": 1}
    long = report.rows[1]
    full_prompt = encode_prompt(tokenizer, long_prompt)
    assert len(full_prompt) > 16
    assert long["prompt_ids"] == full_prompt[-16:]
    assert long["chosen_ids"] == ids(tokenizer, long_answer)[:16]          # 32 - 16 tokens of room
    assert long["rejected_ids"] == ids(tokenizer, "bad") + [tokenizer.eos_token_id]
    assert [r["truncated"] for r in report.rows] == [False, True]
    assert [r["index"] for r in report.rows] == [0, 1]
    (skip,) = report.skipped
    assert skip["id"] == "same-prefix"
    assert "differ only after max_length (32 tokens)" in skip["reason"]


def test_prepare_pairs_writes_rejects_and_counts(tmp_path, tiny_model):
    rows = toy_pairs(6)
    # identical once truncated to max_length 64
    rows[2]["chosen"] = "0 0 0 0 " * 20 + "1"
    rows[2]["rejected"] = "0 0 0 0 " * 20 + "2"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = check_config(train_config(tmp_path / "run", tiny_model, pairs))
    prepared = reference.prepare_pairs(config, "fp32", with_reference=False)
    assert prepared.manifest["counts"] == {"pairs": 5, "prompts_truncated": 0, "completions_truncated": 0,
                                           "skipped": 1}
    (reject,) = [json.loads(line) for line in (prepared.path.parent / "rejects.jsonl").read_text().splitlines()]
    assert reject["id"] == rows[2]["id"]
    assert "differ only after max_length (64 tokens)" in reject["reason"]
    assert json.loads(reject["raw"])["chosen"] == rows[2]["chosen"]


# ---- data order ------------------------------------------------------------------------------------

def test_the_vllm_reference_check_names_the_worst_sequence_and_refuses_above_the_tolerance(tmp_path, capsys):
    from rayalign.llm import _logprob

    vllm = [[-10.0, -20.0], [-30.0, -40.0]]                 # chosen of pairs a, b; rejected of a, b
    transformers = [[-10.001, -20.004], [-30.0, -40.003]]
    lengths = [[10, 2], [5, 30]]
    check = reference.agreement(vllm, transformers, lengths, ["a", "b"], 1e-3)
    # b's chosen: 0.004 over 2 tokens; b's rejected differs less per token though close in sum.
    assert check["worst"] == "b (chosen)" and check["max_per_token"] == pytest.approx(0.002)
    assert check["worst_summed"] == pytest.approx(0.004) and check["max_summed"] == pytest.approx(0.004)
    with pytest.raises(RuntimeError, match=r"by up to 0.002 nats per token \(pair b \(chosen\): 0.004 summed\), above "
                                           r"reference.tolerance 0.001; .*kept in " + str(tmp_path)):
        reference.check_agreement(check, 1e-3, tmp_path)
    reference.check_agreement(check, 3e-3, tmp_path)
    assert "within 2.00e-03 nats per token (reference.tolerance 0.003)" in capsys.readouterr().out
    # A log-prob of -inf on one side is the largest difference, and refused at any tolerance.
    infinite = reference.agreement([[-1.0, float("-inf")]], [[-1.0, -2.0]], [[1, 1]], ["a", "b"], 1e-3)
    assert infinite["worst"] == "b (chosen)" and infinite["max_per_token"] == float("inf")
    with pytest.raises(RuntimeError, match="by up to inf nats per token"):
        reference.check_agreement(infinite, 1e9, tmp_path)
    # ray.data.llm's per-position dicts, keyed by token id as int or, after Arrow, as str.
    assert _logprob({7: {"logprob": -0.5}}, 7) == _logprob({"7": {"logprob": -0.5}}, 7) == -0.5


def test_schedule_uses_each_pair_once_per_epoch_and_splits_deterministically():
    s = Schedule(num_pairs=35, batch_size=8, micro_batch_size=2, num_workers=2, epochs=3, seed=7)
    assert (s.steps_per_epoch, s.total_steps, s.dropped_per_epoch, s.accumulation) == (4, 12, 3, 2)
    orders = []
    for epoch in range(3):
        steps = [s.step_indices(epoch * 4 + j) for j in range(4)]
        flat = [i for step in steps for i in step]
        assert len(flat) == len(set(flat)) == 32
        assert flat == s.epoch_order(epoch)[:32]
        orders.append(flat)
        for j, step in enumerate(steps):
            parts = {(m, r): s.micro_batches(epoch * 4 + j, r)[m] for m in range(2) for r in range(2)}
            # micro-batch m of rank r is slice m * workers + r of the step
            assert [i for m in range(2) for r in range(2) for i in parts[m, r]] == step
    assert orders[0] != orders[1] != orders[2]
    assert Schedule(35, 8, 2, 2, 3, 7).step_indices(5) == s.step_indices(5)
    assert Schedule(35, 8, 2, 2, 3, 8).step_indices(5) != s.step_indices(5)


def test_schedule_groups_a_steps_pairs_by_length_without_changing_the_step():
    lengths = tuple(int(n) for n in np.random.default_rng(3).integers(10, 200, size=40))
    plain = Schedule(40, 16, 4, 2, 2, seed=5)
    grouped = Schedule(40, 16, 4, 2, 2, seed=5, lengths=lengths)
    for step in range(grouped.total_steps):
        assert grouped.step_indices(step) == plain.step_indices(step)
        parts = [i for m in range(2) for r in range(2) for i in grouped.micro_batches(step, r)[m]]
        # the same pairs, now in length order across micro-batches and workers
        assert sorted(parts) == sorted(plain.step_indices(step))
        assert [lengths[i] for i in parts] == sorted(lengths[i] for i in parts)
    # padding: each micro-batch is as wide as its longest pair
    width = lambda s: sum(max(lengths[i] for i in mb) * len(mb) for step in range(s.total_steps)
                          for r in range(2) for mb in s.micro_batches(step, r))
    assert width(grouped) < 0.85 * width(plain)


# ---- LR schedule, DeepSpeed config, precision ---------------------------------------------------

def test_lr_multiplier_by_hand():
    cosine = engine.lr_multiplier("cosine", warmup_steps=2, total_steps=10)
    assert [cosine(s) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))   # = 0.5
    assert cosine(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))   # > 0: no wasted step
    linear = engine.lr_multiplier("linear", 2, 10)
    assert [linear(s) for s in (4, 9)] == pytest.approx([1 - 2 / 8, 1 - 7 / 8])
    assert engine.lr_multiplier("constant", 0, 10)(9) == 1.0


def test_deepspeed_config_from_train_config(tmp_path, tiny_model):
    config = train_config(tmp_path, tiny_model, tmp_path, "train.batch_size=16", "train.micro_batch_size=2",
                          "train.zero_stage=3", "train.gradient_clipping=0.5", "train.offload_optimizer=true")
    ds = engine.deepspeed_config(config.train, "bf16")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert engine.deepspeed_config(config.train, "fp32")["bf16"] == {"enabled": False}


def test_every_optimizer_and_ray_train_field_reaches_its_consumer(tmp_path, tiny_model):
    """The train.* keys that DeepSpeed's config does not carry, set away from their defaults, in
    what the optimizer, its schedule and Ray Train's TorchTrainer receive."""
    from transformers import AutoModelForCausalLM

    from rayalign.train.run import trainer_settings

    config = train_config(tmp_path, tiny_model, tmp_path, "train.learning_rate=3e-4", "train.weight_decay=0.05",
                          "train.lr_schedule=linear", "train.warmup_ratio=0.25", "train.num_workers=4",
                          "train.cpus_per_worker=2", "train.placement_strategy=SPREAD", "train.keep_checkpoints=5",
                          "train.max_failures=4", f"train.storage_path={tmp_path / 'store'}")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    optimizer, scheduler = engine.make_optimizer(model, config.train, total_steps=8)
    (group,) = optimizer.param_groups
    assert (group["initial_lr"], group["weight_decay"]) == (3e-4, 0.05)
    assert len(group["params"]) == len(list(model.parameters()))
    assert not engine.trainable_policy(model, config.train).is_gradient_checkpointing
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Two warm-up steps (25% of 8) rising as (s + 1) / 3, then a linear decay over the other six.
    assert rates == pytest.approx([3e-4 * f for f in (1 / 3, 2 / 3, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])

    gpu = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, use_gpu=True))
    settings = trainer_settings(gpu, "0123456789abcdef")
    scaling, run = settings["scaling_config"], settings["run_config"]
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker, scaling.placement_strategy) == (
        4, True, {"CPU": 2}, "SPREAD")
    assert (run.name, run.storage_path) == ("rayalign-0123456789ab", str(tmp_path / "store"))
    assert (run.checkpoint_config.num_to_keep, run.failure_config.max_failures) == (5, 4)


def test_gradient_checkpointing_and_every_lora_field_reach_the_policy(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    config = train_config(tmp_path, tiny_model, tmp_path, "train.gradient_checkpointing=true",
                          "train.lora.enabled=true", "train.lora.r=4", "train.lora.alpha=12", "train.lora.dropout=0.1",
                          "train.lora.target_modules=[q_proj, v_proj]", "train.zero_stage=2")
    policy = engine.trainable_policy(AutoModelForCausalLM.from_pretrained(tiny_model), config.train)
    assert policy.is_gradient_checkpointing
    lora = policy.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 12, 0.1, {"q_proj", "v_proj"})
    # Only the adapters train (names like ...self_attn.q_proj.lora_A.default.weight), on the named modules.
    trainable = [name.split(".")[-4:-1] for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and {tuple(parts) for parts in trainable} <= {(m, side, "default") for m in ("q_proj", "v_proj")
                                                                   for side in ("lora_A", "lora_B")}
    assert {parts[0] for parts in trainable} == {"q_proj", "v_proj"}
    # The optimizer holds exactly those parameters.
    optimizer, _ = engine.make_optimizer(policy, config.train, total_steps=4)
    assert len(optimizer.param_groups[0]["params"]) == sum(p.requires_grad for p in policy.parameters())


def test_auto_precision_follows_the_cpu(monkeypatch):
    flags = open("/proc/cpuinfo").read().split()
    assert engine.cpu_has_bf16() == any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert engine.resolve_precision("fp32", use_gpu=False) == "fp32"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(engine, "cpu_has_bf16", lambda: native)
        assert engine.resolve_precision("auto", use_gpu=False) == expected


# ---- fingerprints and the reference batch function ----------------------------------------------

def test_fingerprint_sees_any_change_of_large_files(tmp_path, monkeypatch):
    from rayalign import stage

    monkeypatch.setattr(stage, "LARGE_FILE", 1000)
    monkeypatch.setattr(stage, "SAMPLE", 100)
    (tmp_path / "m").mkdir()
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(bytes(5000))
    before = stage.tree_digest(tmp_path / "m")
    weights.write_bytes(bytes(4999) + b"\x01")      # last byte: inside the sampled tail
    assert stage.tree_digest(tmp_path / "m") != before
    assert stage.tree_digest("org/name") == "name:org/name"


def test_reference_batch_function_matches_transformers(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    rows = tokenize_pairs(tokenizer, toy_pairs(3) + [{"id": "x", "prompt": "A longer question about water?",
                                                      "chosen": "yes it is", "rejected": "no"}], 64, 32).rows
    batch = {k: np.array([np.array(r[k]) for r in rows] if k.endswith("_ids") else [r[k] for r in rows],
                         dtype=object if k.endswith("_ids") else None)
             for k in ("index", "prompt_ids", "chosen_ids", "rejected_ids")}
    out = reference.ReferenceLogps(str(tiny_model), "fp32", tokenizer.pad_token_id)(batch)
    assert out["index"].tolist() == [0, 1, 2, 3]

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for i, row in enumerate(rows):
        for key, column in (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")):
            sequence = row["prompt_ids"] + row[key]
            with torch.no_grad():
                logprobs = model(torch.tensor([sequence])).logits[0].double().log_softmax(-1)
            n = len(row["prompt_ids"])
            expected = sum(logprobs[t - 1, sequence[t]].item() for t in range(n, len(sequence)))
            assert out[column][i] == pytest.approx(expected, abs=2e-4)


# ---- config checks before any worker --------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.train, "loss", "apo_sideways"), r"^train\.loss: must be one of"),
    (lambda c: setattr(c.train, "zero_stage", 5), r"^train\.zero_stage: must be 0, 1, 2 or 3, not 5"),
    (lambda c: setattr(c.train, "batch_size", 10), r"^train\.batch_size: \(10\) must be a multiple"),
    (lambda c: setattr(c.train, "pairs", "/nonexistent/pairs.jsonl"), r"^train\.pairs: /nonexistent/pairs\.jsonl not found"),
    (lambda c: setattr(c.train, "pairs", None), r"^train\.pairs: is required"),
    (lambda c: setattr(c.train, "model", None), r"^train\.model: is required"),
    (lambda c: setattr(c.train, "model", "./no/such/model"), r"^train\.model: \./no/such/model not found"),
    (lambda c: setattr(c.train, "loss_options", {"label_smoothin": 0.1}),
     r"^train\.loss_options\.label_smoothin: not an option of loss 'apo_zero' \(options: none\)"),
    (lambda c: (setattr(c.train, "lora", type(c.train.lora)(enabled=True)), setattr(c.train, "zero_stage", 3)),
     r"^train\.lora\.enabled: LoRA trains with zero_stage 0, 1 or 2"),
])
def test_bad_config_fails_before_ray_starts(tmp_path, tiny_model, monkeypatch, change, message):
    import rayalign.cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the config was checked")

    monkeypatch.setattr(rayalign.cluster, "connect", no_ray)
    config = train_config(tmp_path / "run", tiny_model, write_pairs(tmp_path / "pairs.jsonl", 8))
    change(config)
    for entry in (run_train, run_reference):
        with pytest.raises(ConfigError, match=message):
            entry(config)


def test_dpo_option_is_accepted(tmp_path, tiny_model):
    config = train_config(tmp_path / "run", tiny_model, write_pairs(tmp_path / "pairs.jsonl", 8),
                          "train.loss=dpo", "train.loss_options={label_smoothing: 0.1}")
    checked = check_config(config)
    assert checked.train.output == str((tmp_path / "run" / "train").resolve())
    assert checked.train.storage_path == str((tmp_path / "run" / "train" / "ray").resolve())


# ---- one micro-batch of the loop, on a plain model ------------------------------------------------

def policy_and_rows(tiny_model, tokenizer):
    """The tiny policy, four toy pairs, and its direct log-probs; each row's stored reference is
    1 nat below the policy on chosen and 2 nats above it on rejected."""
    from transformers import AutoModelForCausalLM

    from rayalign.train.forward import pair_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rows = tokenize_pairs(tokenizer, toy_pairs(4), 64, 32).rows
    with torch.no_grad():
        direct = pair_logps(model, rows, tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        row["ref_chosen_logps"] = direct["chosen"][i].item() - 1.0
        row["ref_rejected_logps"] = direct["rejected"][i].item() + 2.0
    return model, rows, direct


@pytest.mark.parametrize("loss", ["sft", "dpo", "kto"])
def test_micro_batch_loss_by_hand(tmp_path, tiny_model, tokenizer, loss):
    from rayalign.train.loop import _MEANS, _micro_batch_loss

    model, rows, direct = policy_and_rows(tiny_model, tokenizer)
    config = train_config(tmp_path, tiny_model, tmp_path, f"train.loss={loss}")
    value, row = _micro_batch_loss(model, None, rows, config.train, tokenizer.pad_token_id)

    c = direct["chosen"].double()
    expected = {
        "sft": (-c / direct["chosen_tokens"]).mean().item(),
        "dpo": -math.log(1 / (1 + math.exp(-0.1 * (1.0 + 2.0)))),             # margin 0.1 * (1 - (-2))
        "kto": ((1 - torch.sigmoid(torch.tensor(0.1))) + (1 - torch.sigmoid(torch.tensor(0.2)))).item() / 2,
    }[loss]
    assert value.item() == pytest.approx(expected, rel=1e-5)
    metrics = dict(zip(_MEANS, row.tolist()))
    assert metrics["rewards/chosen"] == pytest.approx(0.1, abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(-0.2, abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(c.mean().item(), rel=1e-5)
    assert row[-1].item() == sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in rows)


def test_added_supervised_term_and_length_normalisation_by_hand(tmp_path, tiny_model, tokenizer):
    from rayalign.train.loop import _MEANS, _micro_batch_loss

    model, rows, direct = policy_and_rows(tiny_model, tokenizer)
    nc, nr = direct["chosen_tokens"].double(), direct["rejected_tokens"].double()
    nll = (-direct["chosen"].double() / nc).mean().item()
    sigmoid = lambda x: 1 / (1 + torch.exp(-x))

    config = train_config(tmp_path, tiny_model, tmp_path, "train.sft_weight=0.5")
    value, _ = _micro_batch_loss(model, None, rows, config.train, tokenizer.pad_token_id)
    apo_zero = (1 - 1 / (1 + math.exp(-0.1))) + 1 / (1 + math.exp(0.2))  # r_w = 0.1, r_l = -0.2
    assert value.item() == pytest.approx(apo_zero + 0.5 * nll, rel=1e-5)

    config = train_config(tmp_path, tiny_model, tmp_path, "train.length_normalize=true")
    value, row = _micro_batch_loss(model, None, rows, config.train, tokenizer.pad_token_id)
    r_w, r_l = 0.1 * 1.0 / nc, 0.1 * -2.0 / nr  # the 1 and 2 nats spread over each completion's tokens
    assert value.item() == pytest.approx(((1 - sigmoid(r_w)) + sigmoid(r_l)).mean().item(), rel=1e-5)
    assert dict(zip(_MEANS, row.tolist()))["rewards/chosen"] == pytest.approx(r_w.mean().item(), rel=1e-5)

    with pytest.raises(ConfigError, match=r"^train\.sft_weight: applies to preference losses"):
        train_config(tmp_path, tiny_model, tmp_path, "train.loss=sft", "train.sft_weight=1")


class _OffHostEngine(TorchEngine):
    """What the training step sees of a DeepSpeed engine, on a device where no tensor made
    without one lands: `meta`, standing in for a GPU on this CPU-only machine (it has shapes
    but no values, so any read back to the host raises as well)."""

    def __init__(self, vocab: int, global_norm: float):
        import types

        class Bigram(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(vocab, 8)
                self.head = torch.nn.Linear(8, vocab)

            def forward(self, input_ids, use_cache, logits_to_keep, attention_mask=None, **packed):
                kept = input_ids[:, logits_to_keep] if torch.is_tensor(logits_to_keep) else input_ids[:, -logits_to_keep:]
                return types.SimpleNamespace(logits=self.head(self.embed(kept)))

        super().__init__(Bigram(), learning_rate=1e-3, device="meta")
        self.global_norm, self.steps = global_norm, 0

    def step(self):  # meta tensors hold no values to update
        self.steps += 1

    def zero_optimization(self):
        return 2  # DeepSpeed's ZeRO optimizer records the global norm itself

    def get_global_grad_norm(self):
        return self.global_norm


@pytest.mark.parametrize("loss, on_the_fly, packing", [("apo_zero", False, False), ("apo_zero", True, False),
                                                      ("sft", False, False), ("apo_zero", True, True)])
def test_a_training_step_keeps_every_tensor_on_the_engines_device(tmp_path, tiny_model, tokenizer, loss, on_the_fly,
                                                                  packing):
    """The collective of every step gets tensors on the engine's device, as NCCL (Ray Train's
    backend on GPUs) demands, and nothing is read back to the host on the way: the step runs
    through the loop's own step function on an engine off the host, padded and packed."""
    from rayalign.train.loop import _MEANS, train_step

    engine = _OffHostEngine(len(tokenizer), global_norm=0.25)
    rows = tokenize_pairs(tokenizer, toy_pairs(4), 64, 32).rows
    for row in rows:
        row["ref_chosen_logps"], row["ref_rejected_logps"] = -5.0, -6.0
    config = train_config(tmp_path, tiny_model, tmp_path, f"train.loss={loss}", f"train.packing={str(packing).lower()}")
    reduced = []

    def all_reduce(tensor):  # NCCL's contract, checked
        assert tensor.device == engine.device, f"a {tensor.device} tensor handed to the collective"
        reduced.append(tensor)

    # A reference computed on the fly lives beside the policy (the loop moves it there).
    reference = _OffHostEngine(len(tokenizer), global_norm=0.0).module if on_the_fly else None
    sums, grad_norm = train_step(engine, reference, [rows[:2], rows[2:]], config.train, tokenizer.pad_token_id,
                                 all_reduce)
    assert len(reduced) == 1 and reduced[0] is sums
    assert (sums.shape, sums.dtype, sums.device) == ((len(_MEANS) + 3,), torch.float64, engine.device)
    assert (engine.steps, grad_norm) == (2, 0.25)
    assert all(p.grad is not None and p.grad.device == engine.device for p in engine.parameters())


def test_zero3_partitions_the_policy_as_it_loads(tmp_path, tiny_model):
    """Two real DeepSpeed processes: under ZeRO-3 each holds half of the policy from the moment it
    loads (never the whole model), the gathered weights are the checkpoint's, and a reference
    model loaded afterwards with load_model is whole, the export gathers the whole state dict on
    rank 0 alone, and the on-the-fly reference is partitioned like the policy and scores alike."""
    from tests.conftest import PYTHON, ROOT, free_port

    done = subprocess.run([PYTHON, str(ROOT / "tests" / "zero3_load.py"), str(tiny_model), str(tmp_path),
                           str(free_port())], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    from transformers import AutoModelForCausalLM

    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    for held in ranks:
        assert held["partitioned"] and held["visible"] == 0, "parameters are placeholders outside ZeRO-3's gather"
        assert held["whole"] == whole
        assert whole / 2 <= held["local"] <= whole / 2 + held["count"]  # half of each tensor, rounded up
        assert held["embed_equal"] and held["reference_visible"] == whole and not held["zero3_after_load"]
    # The export's gather: the whole state dict on rank 0 only, equal to the checkpoint's.
    assert ranks[0]["export"] == {"keys_equal": True, "tensors_equal": True, "on_cpu": True}
    assert ranks[1]["export"] is None
    # The on-the-fly reference: half of it on each worker, scoring as the whole model does.
    for held in ranks:
        assert held["on_the_fly"]["visible"] == 0 and whole / 2 <= held["on_the_fly"]["local"] <= whole / 2 + held["count"]
        assert held["on_the_fly"]["max_difference"] < 1e-4
