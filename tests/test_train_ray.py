"""APO training end to end on a real Ray Train + DeepSpeed cluster on CPU, with the tiny model.

One Ray instance for the module; one reference pass shared by every run (`reference.output`).
Run A (ZeRO-2, 2 workers, 48 steps, fp32) is the baseline that the first-step hand computation,
the export checks, vLLM, the ZeRO-3 run and the killed run are compared with.
"""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from rayalign import events as rayalign_events
from rayalign.config import ConfigError
from rayalign.train.run import check_config, run_reference, run_train
from tests.conftest import PYTHON, ROOT
from tests.train_support import toy_pairs, train_config, write_pairs

pytestmark = pytest.mark.integration

# 32 pairs, 8 per step, 12 epochs: 48 steps, enough for APO-zero to separate the near misses.
# Warmup (5 steps) and cosine decay, so a resumed run must restore the scheduler too.
RUN_A = ("train.loss=apo_zero", "train.zero_stage=2", "train.epochs=12", "train.learning_rate=1.5e-3",
         "train.lr_schedule=cosine", "train.warmup_ratio=0.1", "train.checkpoint_every=10", "train.max_failures=2")
TIMINGS = ("tokens/s", "pairs/s", "mfu", "elapsed_s")  # rates: they differ between runs


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    # Ray Train's controller collects each report at this interval (2 s by default), which
    # would dominate steps of a tiny model; it also detects a dead worker sooner.
    # The driver passes it on to the controller when a trainer starts, so it may be set late.
    previous = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    yield ray_session
    if previous is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = previous


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("train")
    pairs = write_pairs(root / "pairs.jsonl", 32)

    def config(name, *overrides, pairs_file=pairs):
        return train_config(root / name, tiny_model, pairs_file, f"reference.output={root / 'reference'}",
                            *overrides)

    return config


@pytest.fixture(scope="module")
def run_a(ray_cluster, toy):
    config = toy("a", *RUN_A)
    return config, run_train(config)


def load_weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def whole_set_rewards(model_dir, pairs_file, beta=0.1):
    """Mean r_w and r_l over every pair under an exported model."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from rayalign.train.forward import pair_logps

    rows = pq.read_table(pairs_file).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = pair_logps(model, rows, pad_id=0)
    ref_c = torch.tensor([r["ref_chosen_logps"] for r in rows])
    ref_r = torch.tensor([r["ref_rejected_logps"] for r in rows])
    return (beta * (out["chosen"] - ref_c)).mean().item(), (beta * (out["rejected"] - ref_r)).mean().item()


# ---- the reference pass -------------------------------------------------------------------------

def test_reference_cache_reuse_staleness_and_values(ray_cluster, toy, tmp_path, tiny_model):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    config = toy("ref", pairs_file=pairs)
    first = run_reference(config)
    stamp = first.stat().st_mtime_ns
    again = run_reference(config)
    assert again == first and again.stat().st_mtime_ns == stamp           # reused, not rewritten

    shorter = run_reference(toy("ref", "train.max_length=48", pairs_file=pairs))
    assert shorter.parent != first.parent and shorter.exists()
    write_pairs(pairs, 12, seed=1)                                          # same path, new data
    changed = run_reference(config)
    assert changed.parent not in (first.parent, shorter.parent)
    assert [r["id"] for r in pq.read_table(changed).to_pylist()] == [r["id"] for r in toy_pairs(12, seed=1)]

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for row in pq.read_table(first).to_pylist():
        for key, column in (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")):
            sequence = row["prompt_ids"] + row[key]
            with torch.no_grad():
                logprobs = model(torch.tensor([sequence])).logits[0].double().log_softmax(-1)
            expected = sum(logprobs[t - 1, sequence[t]].item() for t in range(len(row["prompt_ids"]), len(sequence)))
            assert row[column] == pytest.approx(expected, abs=2e-4)


def test_reference_from_vllm_prompt_logprobs_equals_the_forward_and_is_checked(ray_cluster, toy, tmp_path, capsys):
    """reference.backend vllm: one engine scores each pair's two sequences. A tolerance the first
    batch does not meet stops the run, naming the key, with the log-probs kept; with the default
    tolerance the next run reuses them, and they equal the transformers pass's within fp32
    rounding; the first batch's figures are in the manifest and checked again on reuse."""
    import numpy as np
    import pyarrow.parquet as pq

    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    forward_path = run_reference(toy("ref", pairs_file=pairs))
    forward = pq.read_table(forward_path).to_pylist()

    def vllm(*overrides):
        return toy("ref", "reference.backend=vllm", "reference.batch_size=4", "reference.engine.max_model_len=128",
                   "reference.engine.gpu_memory_utilization=0.1", "reference.engine.batch_size=8", *overrides,
                   pairs_file=pairs)

    refused = (r"on the first 4 pairs vLLM's log-probs differ from the transformers forward by up to .* nats per "
               r"token \(pair .* summed\), above reference.tolerance 1e-10; raise reference.tolerance \(the log-probs "
               r"are kept in .* and will be reused\)")
    with pytest.raises(RuntimeError, match=refused):
        run_reference(vllm("reference.tolerance=1e-10"))
    capsys.readouterr()
    path = run_reference(vllm())
    assert "rayalign: reusing tokenized pairs and reference log-probs" in capsys.readouterr().out
    assert path.parent != forward_path.parent  # a cache of its own
    rows = pq.read_table(path).to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in forward]
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        got, want = np.array([r[key] for r in rows]), np.array([r[key] for r in forward])
        assert np.abs(got - want).max() < 1e-3
    manifest = json.loads((path.parent / "manifest.json").read_text())
    check = manifest["check"]
    assert check["pairs"] == 4 and check["tolerance"] == 1e-10 and 1e-10 < check["max_per_token"] < 1e-4
    assert check["worst_summed"] <= check["max_summed"] < 1e-3
    assert manifest["inputs"]["reference"]["backend"] == "vllm"
    stamp = path.stat().st_mtime_ns
    with pytest.raises(RuntimeError, match=refused):
        run_reference(vllm("reference.tolerance=1e-10"))
    assert path.stat().st_mtime_ns == stamp  # refused on reuse, not recomputed


# ---- run A: ZeRO-2 ----------------------------------------------------------------------------------

def test_zero2_apo_zero_raises_chosen_lowers_rejected(run_a, tiny_model):
    config, summary = run_a
    output = Path(summary["output"])
    assert summary["steps"] == 48 and summary["dropped_per_epoch"] == 0 and summary["skipped"] == 0
    metrics = read_jsonl(output / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 49))
    last = metrics[-1]
    assert last == summary["final_metrics"]
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]
    chosen, rejected = whole_set_rewards(summary["final"], summary["pairs_file"])
    assert chosen > 0.1 and rejected < -0.1

    trained, initial = load_weights(summary["final"]), load_weights(tiny_model)
    assert trained.keys() == initial.keys()
    assert max_difference(trained, initial) > 1e-3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 49))
    assert events.Scalars("rewards/margins")[-1].value == pytest.approx(last["rewards/margins"], rel=1e-5)
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The fit was recorded once, with its output and workers (rayalign.events).
    fits = [e for e in rayalign_events.read(os.environ[rayalign_events.ENV])
            if e["kind"] == "fit" and e["output"] == str(output)]
    assert [(e["workers"], e["pid"]) for e in fits] == [(2, os.getpid())]


def test_first_step_equals_single_process_computation(run_a, tiny_model):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from rayalign.train.data import collate
    from rayalign.train.losses import LOSSES, sequence_logps

    config, summary = run_a
    first = read_jsonl(Path(summary["output"]) / "metrics.jsonl")[0]
    ids = read_jsonl(Path(summary["output"]) / "steps.jsonl")[0]["ids"]
    rows = {r["id"]: r for r in pq.read_table(summary["pairs_file"]).to_pylist()}
    batch = [rows[i] for i in ids]

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tensors = collate(batch, pad_id=0)
    logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    logps, _ = sequence_logps(logits, tensors["input_ids"], tensors["completion_mask"])
    chosen, rejected = logps[:8], logps[8:]
    ref_c = torch.tensor([r["ref_chosen_logps"] for r in batch])
    ref_r = torch.tensor([r["ref_rejected_logps"] for r in batch])
    losses, metrics = LOSSES["apo_zero"](chosen, rejected, ref_c, ref_r, beta=0.1)
    losses.mean().backward()
    grad_norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))

    assert first["loss"] == pytest.approx(1.0, abs=1e-6)                 # every log-ratio is zero
    assert first["loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(metrics[key].item(), abs=1e-6)
    assert first["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert first["learning_rate"] == pytest.approx(1.5e-3 / 6)          # warmup step 1 of 5


def test_export_loads_in_vllm_and_generates_like_transformers(run_a):
    _, summary = run_a
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "vllm_generate.py"), summary["final"], "8", "eager"],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["vllm"] == result["hf"]
    assert all(len(ids) == 8 for ids in result["vllm"])


# ---- ZeRO-3 with the reference computed in the step -------------------------------------------------

def test_zero3_on_the_fly_reference_follows_the_zero2_run(run_a, toy, tiny_model):
    _, baseline = run_a
    summary = run_train(toy("zero3", *RUN_A, "train.zero_stage=3", "reference.on_the_fly=true"))
    metrics = read_jsonl(Path(summary["output"]) / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert read_jsonl(Path(summary["output"]) / "steps.jsonl") == read_jsonl(Path(baseline["output"]) / "steps.jsonl")
    # Same data order and maths as run A. Step by step they agree until rounding differences,
    # amplified by lr 1e-3, take over (after about 20 steps).
    for ours, theirs in zip(metrics[:16], read_jsonl(Path(baseline["output"]) / "metrics.jsonl")):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    # The export, gathered from both ZeRO-3 shards, is the trained model.
    assert metrics[-1]["rewards/chosen"] > 0 > metrics[-1]["rewards/rejected"]
    chosen, rejected = whole_set_rewards(summary["final"], baseline["pairs_file"])
    assert chosen > 0.1 and rejected < -0.1
    assert max_difference(load_weights(summary["final"]), load_weights(tiny_model)) > 1e-3


# ---- packed with shared prefixes, under ZeRO-3 with the reference on the fly --------------------------

def test_packed_zero3_run_with_shared_prefixes_follows_the_padded_run(run_a, toy, tiny_model):
    """train.packing on two workers with shared prefixes (the default: a pair's prompt and the
    answers' digits before the changed one are computed once; test_packing tests the unshared
    row too), each step's 8 pairs in micro-batches of up to 128 tokens, as many on each worker,
    under ZeRO-3 with the reference packed on the fly. The loss weighs each micro-batch by its
    pairs, so the run follows run A (padded, ZeRO-2) as run A's ZeRO-3 twin does, with no padding
    and fewer tokens in its throughput."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    _, baseline = run_a
    summary = run_train(toy("packed", *RUN_A, "train.zero_stage=3", "reference.on_the_fly=true", "train.packing=true",
                            "train.tokens_per_micro_batch=128", "train.peak_flops=1e9"))
    metrics = read_jsonl(Path(summary["output"]) / "metrics.jsonl")
    theirs = read_jsonl(Path(baseline["output"]) / "metrics.jsonl")
    steps = read_jsonl(Path(summary["output"]) / "steps.jsonl")
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert steps == read_jsonl(Path(baseline["output"]) / "steps.jsonl")
    for ours, padded in zip(metrics[:16], theirs):
        assert ours["loss"] == pytest.approx(padded["loss"], abs=1e-5)
        assert ours["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    assert metrics[-1]["rewards/chosen"] > 0 > metrics[-1]["rewards/rejected"]
    # Throughput: no padding packed; none in run A either, whose toy sequences are all 21 tokens
    # (test_packing measures the padding of sequences of different lengths).
    assert all(m["padding_fraction"] == 0 and m["mfu"] > 0 and m["tokens/s"] > 0 for m in metrics)
    assert all(m["padding_fraction"] == 0 and m["mfu"] > 0 for m in theirs)
    # tokens/s and mfu, by hand from each step's pairs: a pair computes prompt+chosen (21 tokens)
    # and the rest of rejected after the digits it shares with chosen; the rest attends to the
    # shared part. mfu is those model FLOPs over train.peak_flops per worker (ZeRO-3 held
    # shards: the count is the whole model's); tokens/s gives the step's seconds.
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    parameters, layers, hidden = (sum(p.numel() for p in model.parameters()), model.config.num_hidden_layers,
                                  model.config.hidden_size)
    pairs = {row["id"]: row for row in pq.read_table(summary["pairs_file"]).to_pylist()}
    for m, step in zip(metrics, steps):
        tokens = flops = 0
        for pair in (pairs[i] for i in step["ids"]):
            prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
            assert len(prompt) + len(chosen) == len(prompt) + len(rejected) == 21
            shared = len(prompt) + next(k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
            rest = 21 - shared
            tokens += 21 + rest
            flops += 6 * parameters * (21 + rest) + 6 * layers * hidden * (21 ** 2 + rest ** 2 + 2 * rest * shared)
        assert tokens < 16 * 21  # sharing computed fewer tokens than the 16 whole sequences
        seconds = tokens / m["tokens/s"]
        assert m["mfu"] == pytest.approx(flops / seconds / (2 * 1e9), rel=1e-9)
    assert summary["packing"] is True and summary["throughput"]["padding_fraction"] == 0
    assert summary["throughput"]["pairs/s"] == pytest.approx(
        sorted(m["pairs/s"] for m in metrics[1:])[len(metrics[1:]) // 2])
    # The exported model names no attention of ours: it loads anywhere as a plain checkpoint.
    exported = json.loads((Path(summary["final"]) / "config.json").read_text())
    assert "rayalign" not in json.dumps(exported)


# ---- gradient accumulation ----------------------------------------------------------------------------

def test_gradient_accumulation_matches_one_big_micro_batch(ray_cluster, toy):
    common = ("train.loss=dpo", "train.num_workers=1", "train.batch_size=4", "train.epochs=1",
              "train.zero_stage=0", "train.checkpoint_every=100")
    one = run_train(toy("micro4", *common, "train.micro_batch_size=4"))
    four = run_train(toy("micro1", *common, "train.micro_batch_size=1"))
    assert one["steps"] == four["steps"] == 8
    first = [read_jsonl(Path(s["output"]) / "metrics.jsonl")[0] for s in (one, four)]
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first[0]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-5)
    assert max_difference(load_weights(one["final"]), load_weights(four["final"])) < 1e-5


# ---- a worker killed mid-run ----------------------------------------------------------------------------

def train_workers():
    import psutil

    me = psutil.Process()
    found = []
    for proc in me.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_killed_worker_resumes_from_checkpoint_exactly_once(run_a, toy, capfd):
    _, baseline = run_a
    config = toy("killed", *RUN_A)
    steps_file = Path(check_config(config).train.output) / "steps.jsonl"
    outcome = {}

    def drive():
        try:
            outcome["summary"] = run_train(config)
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and driver.is_alive():
        if steps_file.exists() and len(steps_file.read_text().splitlines()) >= 14:  # checkpoint at 10
            workers = train_workers()
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    driver.join(timeout=400)
    assert killed is not None, "the run ended before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    out, err = capfd.readouterr()
    assert re.search(r"rayalign train: resumed from step (10|20|30|40) of 48", out + err)

    steps = read_jsonl(steps_file)
    assert [s["step"] for s in steps] == list(range(1, 49))
    assert steps == read_jsonl(Path(baseline["output"]) / "steps.jsonl")
    for epoch in range(12):
        counts = Counter(i for s in steps if s["epoch"] == epoch for i in s["ids"])
        assert sorted(counts) == sorted(p["id"] for p in toy_pairs(32)) and set(counts.values()) == {1}
    assert max_difference(load_weights(summary["final"]), load_weights(baseline["final"])) < 1e-6
    # Every metric of every step, learning rate included, is the uninterrupted run's.
    ours, theirs = (read_jsonl(Path(s["output"]) / "metrics.jsonl") for s in (summary, baseline))
    assert len(ours) == len(theirs) == 48
    for mine, reference_row in zip(ours, theirs):
        expected = {k: v for k, v in reference_row.items() if k not in TIMINGS}
        assert {k: v for k, v in mine.items() if k not in TIMINGS} == pytest.approx(expected, abs=1e-6)


# ---- detected precision, optimizer offload, gradient checkpointing; a finished run rerun ----------------

def test_auto_precision_offload_checkpointing_and_rerun_of_a_finished_run(ray_cluster, toy):
    from rayalign.train.engine import cpu_has_bf16

    config = toy("bf16", "train.precision=auto", "train.zero_stage=1", "train.offload_optimizer=true",
                 "train.gradient_checkpointing=true", "train.epochs=1", "train.num_workers=1",
                 "train.micro_batch_size=4")
    summary = run_train(config)
    expected = "bf16" if cpu_has_bf16() else "fp32"
    assert summary["precision"] == expected
    exported = json.loads((Path(summary["final"]) / "config.json").read_text())
    assert exported["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[expected]
    metrics = read_jsonl(Path(summary["output"]) / "metrics.jsonl")
    assert len(metrics) == 4
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-3)
    assert metrics[-1]["rewards/margins"] > 0.05

    events = sorted((Path(summary["output"]) / "tensorboard").iterdir())
    weights = Path(summary["final"]) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_train(config)
    # The exported model is left as it is, so whatever was fingerprinted from it stays valid.
    assert weights.stat().st_mtime_ns == stamp
    # Nothing was retrained: no worker opened a new TensorBoard event file.
    assert sorted((Path(summary["output"]) / "tensorboard").iterdir()) == events
    assert again["final_metrics"] == summary["final_metrics"]
    assert max_difference(load_weights(again["final"]), load_weights(summary["final"])) == 0

    # Into the same train.output, a config that would train another model is refused by key,
    # and the model there is left as it is.
    steeper = dataclasses.replace(config, train=dataclasses.replace(config.train, learning_rate=2e-3))
    with pytest.raises(ConfigError, match=r"other settings: train.learning_rate \(0.001 -> 0.002\)\. Put back"):
        run_train(steeper)
    assert weights.stat().st_mtime_ns == stamp


# ---- LoRA ------------------------------------------------------------------------------------------

def test_lora_trains_only_the_adapted_projections_and_exports_a_merged_model(ray_cluster, toy, tiny_model):
    config = toy("lora", "train.lora.enabled=true", "train.lora.r=8", "train.lora.alpha=16",
                 "train.lora.target_modules=[q_proj, v_proj]", "train.zero_stage=2", "train.epochs=6",
                 "train.learning_rate=5e-3", "train.warmup_ratio=0")
    summary = run_train(config)
    metrics = read_jsonl(Path(summary["output"]) / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-3)   # LoRA's B starts at zero: policy == reference
    assert metrics[-1]["rewards/margins"] > 0.05
    base, merged = load_weights(tiny_model), load_weights(summary["final"])
    assert set(merged) == set(base)                             # a plain model: no adapter keys left
    changed = {k for k in base if (base[k] - merged[k]).abs().max().item() > 0}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert {k.split(".")[-2] for k in changed} == {"q_proj", "v_proj"}
