"""Packed training (train.packing) without a cluster: the packed forward against the padded one on
the tiny and the real model, the packing of a step's pairs, the step's loss under every option
that touches the log-probs, the reference pass packed, the throughput metrics and the config keys.

The packed step against the padded one over ten DeepSpeed steps is `scripts/gpu-check --cpu`
(test_gpu_check); two workers with unequal micro-batches under ZeRO-3 are in test_train_ray."""

import json
import random

import numpy as np
import pytest
import torch

from rayalign.config import ConfigError
from rayalign.train import engine
from rayalign.train.data import Schedule, pack_step, tokenize_pairs
from rayalign.train.forward import PACKED_ATTENTION, pack, pair_logps
from tests.train_support import train_config

# Packed against padded, per sequence: measured about 3e-7 on SmolLM2 and 1e-7 on the tiny model
# (fp32 sums of a few hundred token log-probs, reduced in another order); 1e-6 is the bound.
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def varied_rows(tokenizer, n: int = 6, seed: int = 0) -> list[dict]:
    """Pairs of prompts and answers of very different lengths (up to about 60 tokens): every other
    pair a minimal revision (rejected is chosen with a word changed or dropped, as CLAIR makes
    them: a long common beginning), the others two unrelated answers."""
    rng = random.Random(seed)
    words = "the water flows over a stone while birds sing in old trees near quiet roads".split()
    pairs = []
    for i in range(n):
        chosen = rng.choices(words, k=rng.randint(2, 40))
        rejected = rng.choices(words, k=rng.randint(1, 40))
        if i % 2 == 0:
            rejected = list(chosen)
            at = rng.randrange(len(chosen))
            rejected[at:at + 1] = [] if rng.random() < 0.5 else ["stones" if chosen[at] != "stones" else "roads"]
        pairs.append({"id": f"v{i}", "prompt": " ".join(rng.choices(words, k=rng.randint(2, 20))),
                      "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return tokenize_pairs(tokenizer, pairs, 128, 64).rows


def models(path):
    padded = engine.load_model(str(path), "fp32", trainable=True)
    packed = engine.load_model(str(path), "fp32", trainable=True, packed=True)
    return padded, packed


def assert_close(packed: dict, padded: dict) -> None:
    for side in ("chosen", "rejected"):
        assert packed[f"{side}_tokens"].tolist() == padded[f"{side}_tokens"].tolist()
        relative = ((packed[side] - padded[side]).abs() / padded[side].abs()).max().item()
        assert relative <= RELATIVE, f"{side}: packed and padded log-probs differ by {relative:.1e} relative"


# ---- the packed row and forward ------------------------------------------------------------------

def test_the_packed_row_restarts_positions_and_scores_only_completion_tokens():
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [4]},
             {"prompt_ids": [3], "chosen_ids": [2], "rejected_ids": [1, 1]}]
    row = pack(pairs)
    # prompt+chosen of each pair, then prompt+rejected of each
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 2, 5, 6, 4, 3, 1, 1]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert row["blocks"].tolist() == [[0, 5, 0, 0], [5, 7, 5, 5], [7, 10, 7, 7], [10, 13, 10, 10]]
    # position t predicts token t + 1: the last prompt token and every answer token but the last
    assert row["keep"].tolist() == [1, 2, 3, 5, 8, 10, 11]
    assert row["targets"].tolist() == [7, 8, 9, 2, 4, 1, 1]
    assert row["owner"].tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert row["counts"].tolist() == [3, 1, 1, 2] and row["twice"].tolist() == []


def test_a_shared_row_computes_a_pairs_common_beginning_once():
    from rayalign.train.data import pair_tokens

    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9, 2], "rejected_ids": [7, 8, 4, 2]},
             {"prompt_ids": [], "chosen_ids": [3, 1], "rejected_ids": [3, 1, 1]}]  # chosen begins rejected
    row = pack(pairs, share_prefix=True)
    # pair 0: prompt and "7 8" once, the rest of chosen, then the rest of rejected at positions 4, 5
    # pair 1: "3 1" once (no prompt), then rejected's last token at position 2
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 4, 2, 3, 1, 1]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 2]]
    # each rest of rejected attends to its pair's shared part (4 and 2 tokens) and causally to itself
    assert row["blocks"].tolist() == [[0, 6, 0, 0], [6, 8, 0, 4], [8, 10, 8, 8], [10, 11, 8, 10]]
    # chosen's predictions (pair 0 from its last prompt token), then rejected's own: its first
    # differing token predicted from the end of the shared part, the rest from its own rows
    assert row["keep"].tolist() == [1, 2, 3, 4, 3, 6, 8, 9]
    assert row["targets"].tolist() == [7, 8, 9, 2, 4, 2, 1, 1]
    assert row["owner"].tolist() == [0, 0, 0, 0, 2, 2, 1, 3]
    # predictions inside a shared part count for the pair's rejected sequence too
    assert row["twice"].tolist() == [0, 1, 6] and row["twice_owner"].tolist() == [2, 2, 3]
    assert row["counts"].tolist() == [4, 1, 4, 2]  # as unshared: each sequence's own completion tokens
    assert [pair_tokens(p, share_prefix=True) for p in pairs] == [8, 3]
    assert [pair_tokens(p) for p in pairs] == [12, 5]


@pytest.mark.parametrize("share_prefix", [False, True], ids=["unshared", "shared"])
def test_packed_log_probs_and_gradients_equal_padded_on_the_tiny_model(tiny_model, tokenizer, share_prefix):
    from rayalign.train.data import pair_tokens

    rows = varied_rows(tokenizer)
    padded_model, packed_model = models(tiny_model)
    assert packed_model.config._attn_implementation == PACKED_ATTENTION
    padded = pair_logps(padded_model, rows, tokenizer.pad_token_id)
    packed = pair_logps(packed_model, rows, tokenizer.pad_token_id, packed=True, share_prefix=share_prefix)
    assert_close(packed, padded)
    # the real tokens of both, and the padded one's padding; shared, fewer are computed
    real = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert padded["tokens"] == real
    assert packed["tokens"] == packed["slots"] == sum(pair_tokens(r, share_prefix) for r in rows)
    assert (packed["tokens"] < real - 6 * 10) if share_prefix else (packed["tokens"] == real)
    width = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    assert padded["slots"] == 2 * len(rows) * width > real
    (padded["chosen"].sum() - padded["rejected"].sum()).backward()
    (packed["chosen"].sum() - packed["rejected"].sum()).backward()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters()):
        assert ((a.grad - b.grad).norm() / a.grad.norm()).item() < 1e-5, name


def test_packed_log_probs_equal_padded_on_the_real_model(smollm2):
    """SmolLM2 (grouped-query attention, 30 layers, its own chat template) on prose answers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    rows = varied_rows(tokenizer, n=4, seed=1)
    padded_model = engine.load_model(str(smollm2), "fp32", trainable=False)
    packed_model = engine.load_model(str(smollm2), "fp32", trainable=False, packed=True)
    with torch.no_grad():
        padded = pair_logps(padded_model, rows, tokenizer.pad_token_id)
        assert_close(pair_logps(packed_model, rows, tokenizer.pad_token_id, packed=True), padded)
        assert_close(pair_logps(packed_model, rows, tokenizer.pad_token_id, packed=True, share_prefix=True), padded)


def test_a_packed_model_refuses_a_forward_without_blocks(tiny_model, tokenizer):
    _, packed_model = models(tiny_model)
    with pytest.raises(ValueError, match=r"loaded for packed sequences .* gave no blocks: call pair_logps\(\.\.\., "
                                         r"packed=True\)"):
        pair_logps(packed_model, varied_rows(tokenizer, n=2), tokenizer.pad_token_id)


# ---- packing a step's pairs ------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2, 4])
def test_pack_step_gives_every_worker_as_many_micro_batches_within_the_budget(workers):
    rng = np.random.default_rng(workers)
    tokens = [int(t) for t in rng.integers(30, 400, size=64)]
    for budget in (400, 700, 1600, 10_000):
        indices = rng.permutation(64)[:32].tolist()
        split = pack_step(indices, tokens, budget, workers)
        assert split == pack_step(indices, tokens, budget, workers)  # a pure function: a resumed step replays it
        assert len(split) == workers and len({len(parts) for parts in split}) == 1
        parts = [part for rank in split for part in rank]
        assert sorted(i for part in parts for i in part) == sorted(indices)
        assert all(part and sum(tokens[i] for i in part) <= budget for part in parts)
        for part in parts:  # the step's order within a micro-batch
            assert part == sorted(part, key=indices.index)
        # close to the fewest micro-batches the budget allows, and the workers' loads close
        fewest = -(-sum(tokens[i] for i in indices) // budget)
        assert len(parts) <= max(2 * fewest, workers)
        loads = [sum(tokens[i] for part in rank for i in part) for rank in split]
        assert max(loads) - min(loads) <= max(sum(tokens[i] for i in part) for part in parts)


def test_pack_step_halves_micro_batches_until_the_workers_share_them_evenly():
    # everything fits in one micro-batch, but two workers need one each
    assert pack_step([0, 1, 2, 3], [10, 10, 10, 10], 1000, 2) == [[[0, 2]], [[1, 3]]]
    # three full micro-batches for two workers: one is halved
    split = pack_step(list(range(6)), [50] * 6, 100, 2)
    assert sorted(len(part) for rank in split for part in rank) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"pair 1 has 101 tokens, more than a packed micro-batch holds \(100\)"):
        pack_step([0, 1], [10, 101], 100, 1)


def test_a_packed_schedule_covers_each_step_once_and_keeps_the_steps_pairs():
    tokens = tuple(int(t) for t in np.random.default_rng(0).integers(20, 300, size=40))
    plain = Schedule(40, 16, 4, 2, 2, seed=5)
    packed = Schedule(40, 16, 4, 2, 2, seed=5, tokens=tokens, token_budget=600)
    for step in range(packed.total_steps):
        parts = [packed.micro_batches(step, rank) for rank in range(2)]
        assert len(parts[0]) == len(parts[1])
        assert sorted(i for rank in parts for part in rank for i in part) == sorted(plain.step_indices(step))
    slots = lambda s: sum(max(tokens[i] for i in mb) * len(mb) for step in range(s.total_steps)
                          for r in range(2) for mb in s.micro_batches(step, r))
    assert sum(tokens[i] for step in range(2) for i in plain.step_indices(step)) < 0.75 * slots(plain)


# ---- the step's loss packed, under every option that touches log-probs -----------------------------

@pytest.mark.parametrize("overrides", [
    ["train.loss=apo_zero"], ["train.loss=apo_down"], ["train.loss=dpo"], ["train.loss=kto"],
    ["train.loss=apo_zero_unpaired"], ["train.loss=sft"], ["train.loss=apo_zero", "train.sft_weight=0.5"],
    ["train.loss=apo_down", "train.length_normalize=true"],
], ids=lambda o: ",".join(x.split(".", 1)[1] for x in o))
def test_the_micro_batch_loss_is_the_same_packed(tmp_path, tiny_model, tokenizer, overrides):
    from rayalign.train.loop import _MEANS, _micro_batch_loss

    rows = varied_rows(tokenizer)
    for i, row in enumerate(rows):
        row["ref_chosen_logps"], row["ref_rejected_logps"] = -40.0 - i, -50.0 + i
    padded_model, packed_model = models(tiny_model)
    results = {}
    for packing, model in ((False, padded_model), (True, packed_model)):
        config = train_config(tmp_path, tiny_model, tmp_path, *overrides, f"train.packing={str(packing).lower()}",
                              "train.max_length=128", "train.max_prompt_length=64")
        loss, row = _micro_batch_loss(model, None, rows, config.train, tokenizer.pad_token_id)
        loss.backward()
        results[packing] = (loss.item(), dict(zip(_MEANS, row.tolist())),
                            torch.cat([p.grad.flatten() for p in model.parameters()]))
    (loss_a, row_a, grad_a), (loss_b, row_b, grad_b) = results[False], results[True]
    assert loss_b == pytest.approx(loss_a, rel=RELATIVE)
    for name in _MEANS:
        assert row_b[name] == pytest.approx(row_a[name], rel=RELATIVE, abs=1e-7, nan_ok=True), name
    assert ((grad_a - grad_b).norm() / grad_a.norm()).item() < 1e-5


def test_the_reference_on_the_fly_lora_and_checkpointing_work_packed(tmp_path, tiny_model, tokenizer):
    """The on-the-fly reference packs like the policy; LoRA adapters and gradient checkpointing
    keep the packed forward's blocks (the loss and the adapters' gradients as padded)."""
    from rayalign.train.loop import _micro_batch_loss

    rows = varied_rows(tokenizer)
    results = {}
    for packing in (False, True):
        config = train_config(tmp_path, tiny_model, tmp_path, f"train.packing={str(packing).lower()}",
                              "train.max_length=128", "train.max_prompt_length=64", "train.lora.enabled=true",
                              "train.gradient_checkpointing=true", "train.lora.dropout=0", "reference.on_the_fly=true")
        torch.manual_seed(0)  # the same adapters' initial weights both times
        policy = engine.trainable_policy(engine.load_model(str(tiny_model), "fp32", True, packed=packing),
                                         config.train)
        policy.train()
        reference = engine.load_reference(str(tiny_model), config.train, "fp32", "cpu")
        assert (reference.config._attn_implementation == PACKED_ATTENTION) == packing
        loss, _ = _micro_batch_loss(policy, reference, rows, config.train, tokenizer.pad_token_id)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in name for name in grads)
        results[packing] = (loss.item(), grads)
    assert results[True][0] == pytest.approx(results[False][0], rel=RELATIVE)
    assert results[False][0] == pytest.approx(1.0, abs=1e-6)  # the policy is the reference at the start
    for name, grad in results[False][1].items():  # lora_A's are 0 at the start: lora_B starts at 0
        assert (results[True][1][name] - grad).norm().item() <= 1e-5 * grad.norm().item(), name
    assert any(grad.norm() > 0 for grad in results[False][1].values())


# ---- the reference pass packed ---------------------------------------------------------------------

def test_the_reference_pass_packs_its_batch_within_the_budget(tiny_model, tokenizer):
    from rayalign.train.reference import ReferenceLogps

    rows = varied_rows(tokenizer, n=8)
    batch = {"index": np.arange(8), **{k: [np.array(r[k]) for r in rows]
                                       for k in ("prompt_ids", "chosen_ids", "rejected_ids")}}
    padded = ReferenceLogps(str(tiny_model), "fp32", tokenizer.pad_token_id)(batch)
    threads = torch.get_num_threads()
    try:
        actor = ReferenceLogps(str(tiny_model), "fp32", tokenizer.pad_token_id, packed_budget=256, threads=1)
        assert torch.get_num_threads() == 1  # reference.cpus_per_actor reaches torch
    finally:
        torch.set_num_threads(threads)
    parts = actor._parts([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    sizes = [sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in part)
             for part in parts]  # unshared: the actor's share_prefix is off by default
    assert len(parts) > 1 and sum(len(part) for part in parts) == 8 and max(sizes) <= 256
    packed = actor(batch)
    assert packed["index"].tolist() == list(range(8))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(packed[column], padded[column], rtol=RELATIVE)


# ---- throughput metrics ------------------------------------------------------------------------------

def test_model_flops_and_the_run_throughput_by_hand():
    from rayalign.train.logs import throughput, throughput_line
    from rayalign.train.loop import model_flops

    shape = {"parameters": 1000, "layers": 2, "hidden": 8}
    batch = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}]
    # sequences of 3 and 5 tokens: 6 x 1000 per token, attention 6 x 2 x 8 x length^2
    assert model_flops(shape, batch, lora=False) == 6000 * 8 + 96 * (9 + 25)
    assert model_flops(shape, batch, lora=True) == 4000 * 8 + 96 * (9 + 25)
    # shared: prompt and "3" once (3 tokens), then "7" and "5 6": 6 tokens; attention over the
    # 4 of prompt+chosen, and the 2 of the rest of rejected over themselves and the 3 shared
    shared = [{"prompt_ids": [1, 2], "chosen_ids": [3, 7], "rejected_ids": [3, 5, 6]}]
    assert model_flops(shape, shared, lora=False, share_prefix=True) == 6000 * 6 + 96 * (16 + 4 + 2 * 2 * 3)
    steps = [{"tokens/s": t, "pairs/s": p, "padding_fraction": f, "mfu": m}
             for t, p, f, m in ((10.0, 1.0, 0.5, 0.01), (100.0, 4.0, 0.2, 0.05), (300.0, 6.0, 0.4, 0.07),
                                (200.0, 5.0, 0.0, 0.06))]
    # the first step (warm-up) is left out; medians of the rest, mean padding
    assert throughput(steps) == {"tokens/s": 200.0, "pairs/s": 5.0, "padding_fraction": pytest.approx(0.2),
                                 "mfu": 0.06}
    assert throughput_line(throughput(steps)) == "5.00 pairs/s, 200 tokens/s, padding 20.0%, mfu 6.0%"
    assert throughput([{"tokens/s": 1.0}]) == {}  # an older run's history


def test_measured_peak_flops_is_a_plausible_rate():
    from rayalign.train.loop import measure_peak_flops

    peak = measure_peak_flops("cpu", "fp32", seconds=0.2)
    assert 1e8 < peak < 1e13  # between a slow core and far more than 2 cores could do


def test_the_report_shows_the_runs_throughput(tmp_path):
    from rayalign.report import write_report

    (tmp_path / "train").mkdir()
    metrics = [{"step": s, "loss": 1.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
                "rewards/accuracies": 0.5, "tokens/s": 100.0 * s, "pairs/s": float(s), "padding_fraction": 0.25,
                "mfu": 0.01 * s} for s in (1, 2, 3)]
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    page = write_report(tmp_path).read_text()
    assert "Throughput (median step): 2.50 pairs/s, 250 tokens/s, padding 25.0%, mfu 2.5%" in page


# ---- the keys --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["train.tokens_per_micro_batch=4096"], r"^train\.tokens_per_micro_batch: applies only with train\.packing: true"),
    (["train.packing=true", "train.tokens_per_micro_batch=100"],
     r"^train\.tokens_per_micro_batch: \(100\) must hold the longest pair, 2 x max_length \(128\) tokens"),
    (["train.packing=true", "train.offload_optimizer=true"],
     r"^train\.offload_optimizer: is not supported with train\.packing"),
    (["train.peak_flops=0"], r"^train\.peak_flops: must be positive"),
    (["train.share_prefix=true"], r"^train\.share_prefix: applies only with train\.packing: true"),
])
def test_packing_keys_are_checked(tmp_path, tiny_model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_config(tmp_path, tiny_model, tmp_path, *overrides)


def test_the_token_budget_defaults_to_a_padded_micro_batch(tmp_path, tiny_model):
    assert train_config(tmp_path, tiny_model, tmp_path, "train.packing=true").train.token_budget == 2 * 2 * 64
    assert train_config(tmp_path, tiny_model, tmp_path, "train.packing=true",
                        "train.tokens_per_micro_batch=300").train.token_budget == 300


def test_packing_shapes_the_run_and_the_peak_does_not(tmp_path, tiny_model):
    """A packed run is another run (its micro-batches differ), so a rerun into an unpacked run's
    output is refused by name; the keys at their defaults are left out, so outputs made before
    packing existed still resume; the peak for the mfu never changes what is trained."""
    from rayalign.train.run import shaping_fields

    fields = lambda *o: shaping_fields(train_config(tmp_path, tiny_model, tmp_path, *o), "data", "fp32")
    plain = fields()
    assert not any(k.startswith(("train.packing", "train.tokens_per_micro_batch", "train.peak_flops")) for k in plain)
    assert fields("train.peak_flops=1e12") == plain
    packed = fields("train.packing=true")
    assert {k: v for k, v in packed.items() if plain.get(k) != v} == {"train.packing": True}
    assert fields("train.packing=true", "train.tokens_per_micro_batch=512")["train.tokens_per_micro_batch"] == 512
    assert "train.share_prefix" not in packed  # on by default: a packed output made before it still resumes
    assert fields("train.packing=true", "train.share_prefix=false")["train.share_prefix"] is False


def test_the_starting_model_shapes_the_run_by_content(tmp_path, tiny_model):
    """The same train.model path holding other weights is another run; an output recorded before
    the key existed still resumes."""
    import shutil

    from rayalign.stage import guard
    from rayalign.train.run import MODEL_CONTENT, shaping_fields

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    fields = lambda: shaping_fields(train_config(tmp_path, model, tmp_path), "data", "fp32")
    before = fields()
    with open(model / "config.json", "a") as f:
        f.write("\n")  # other bytes, the same path
    after = fields()
    assert {k: v for k, v in after.items() if before[k] != v} == {MODEL_CONTENT: after[MODEL_CONTENT]}

    out = tmp_path / "train"
    guard(out, before, added=(MODEL_CONTENT,))
    with pytest.raises(ConfigError, match=r"train\.model \(content\) \("):
        guard(out, after, added=(MODEL_CONTENT,))
    older = tmp_path / "older"
    guard(older, {k: v for k, v in before.items() if k != MODEL_CONTENT})
    guard(older, after, added=(MODEL_CONTENT,))  # made before the key: not refused for it
    assert json.loads((older / "stage.json").read_text())[MODEL_CONTENT] == after[MODEL_CONTENT]
