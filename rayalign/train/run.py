"""`rayalign reference` and `rayalign train`: check the config, prepare the tokenized pairs and
reference log-probs, run the Ray Train TorchTrainer, and collect its outputs.

Layout of `train.output` (default `<run_dir>/train`, a local directory):
  final/          the policy in Hugging Face format (safetensors, config, tokenizer)
  metrics.jsonl   one line of metrics per optimizer step; steps.jsonl: its example ids
  tensorboard/    TensorBoard events;  curves.png: the curves
  manifest.json   what run_train returns, under the run's key (rayalign.stage.finish), written last
Ray Train's checkpoints go to `train.storage_path` (default `<train.output>/ray`; a local
directory or an s3:// or gs:// URI) under a run name derived from everything that shapes the
trajectory, so rerunning an interrupted run with the same config and data resumes it, while
a changed config starts afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import shutil
import tempfile
import time
from pathlib import Path

from rayalign import events
from rayalign.config import ConfigError, RunConfig
from rayalign.stage import digest, finish, finished, flatten, guard, summary_of, tree_digest

# TrainConfig keys that do not change the trajectory, so they do not change the run name.
_NOT_IN_RUN_ID = ("output", "storage_path", "max_failures", "keep_checkpoints", "checkpoint_every", "report_every",
                  "placement_strategy", "auto_sample", "cpus_per_worker", "peak_flops")


# The starting model by content (rayalign.stage.tree_digest): the same path holding other weights
# is another run. Added after runs existed, so an output recorded without it is not refused.
MODEL_CONTENT = "train.model (content)"

# Keys added after runs existed count only when set, so a rerun into an output made before them
# is not refused for a key it could not have had.
_ADDED_LATER = {"packing": False, "tokens_per_micro_batch": None, "share_prefix": None}


class TrainError(RuntimeError):
    """Training failed on the cluster after the allowed restarts."""


def run_reference(config: RunConfig) -> Path:
    """Tokenize the pairs and compute their reference log-probs (or reuse the cached ones);
    returns the Parquet file."""
    from rayalign.train.reference import prepare_pairs

    config = check_config(config)
    return prepare_pairs(config, detect_precision(config), with_reference=True).path


def run_train(config: RunConfig) -> dict:
    """Train the policy with the configured loss on Ray Train + DeepSpeed; returns the summary."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from rayalign.train.data import Schedule
    from rayalign.console import verbose
    from rayalign.train.logs import follow, plot_curves, throughput, throughput_line, write_history
    from rayalign.train.loop import train_loop_per_worker
    from rayalign.train.auto import resolve_loss
    from rayalign.train.reference import pad_id, prepare_pairs

    start = time.perf_counter()
    config = resolve_loss(check_config(config))
    train = config.train
    output = Path(train.output)
    precision = detect_precision(config)
    prepared = prepare_pairs(config, precision, with_reference=not config.reference.on_the_fly)
    table = pq.read_table(prepared.path)
    prompt, chosen, rejected = (pc.list_value_length(table.column(c)).to_numpy()
                                for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    lengths = tuple((prompt + np.maximum(chosen, rejected)).tolist())
    packing = {"tokens": packed_sizes(table, train.shares_prefix), "token_budget": train.token_budget} \
        if train.packing else {}
    schedule = Schedule(len(table), train.batch_size, train.micro_batch_size, train.num_workers, train.epochs,
                        train.seed, lengths=lengths, **packing)
    if schedule.total_steps == 0:
        raise ConfigError(f"train.batch_size: ({train.batch_size}) is more than the {len(table)} usable pairs "
                          f"of {train.pairs}")
    run_id = _run_id(config, prepared.manifest["key"], precision)
    guard(output, shaping_fields(config, prepared.manifest["key"], precision), added=(MODEL_CONTENT,))
    done = finished(output, run_id)
    if done and (output / "final").exists():
        print(f"rayalign train: already trained with this config and data; model in {done['final']}")
        return summary_of(done)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": train, "schedule": schedule, "precision": precision, "output": str(output),
            "pairs": ray.put(table), "pad_id": pad_id(AutoTokenizer.from_pretrained(train.model)),
            "reference_model": (config.reference.model or train.model) if config.reference.on_the_fly else None,
        },
        **trainer_settings(config, run_id),
    )
    packed = f", packed in micro-batches of up to {train.token_budget} tokens" if train.packing else ""
    print(f"rayalign train: {schedule.total_steps} steps of {train.batch_size} pairs ({schedule.epochs} epochs "
          f"of {len(table)} pairs; {schedule.dropped_per_epoch} dropped per epoch), {train.num_workers} workers, "
          f"ZeRO-{train.zero_stage}, {precision}{packed}")
    events.record("fit", output=str(output), workers=train.num_workers)
    try:
        # Rank 0's progress lines, from its console.log: the workers' own output stays in Ray's logs.
        with contextlib.nullcontext() if verbose() else follow(output, lambda line: print(line, flush=True)):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainError(f"training failed (after up to train.max_failures={train.max_failures} restarts): "
                         f"{exc}") from exc

    # The rank-0 worker wrote the live logs on its node; the driver writes the final outputs here.
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        result.checkpoint.to_directory(directory)
        state = json.loads((Path(directory) / "trainer_state.json").read_text())
        shutil.rmtree(output / "final", ignore_errors=True)
        shutil.move(str(Path(directory) / "model"), output / "final")
    write_history(output, state["metrics"], state["steps"])
    plot_curves(state["metrics"], output / "curves.png")
    counts = prepared.manifest["counts"]
    summary = {
        "output": str(output), "final": str(output / "final"), "loss": train.loss, "steps": state["step"],
        "epochs": train.epochs, "pairs": len(table), "dropped_per_epoch": schedule.dropped_per_epoch,
        "prompts_truncated": counts["prompts_truncated"], "completions_truncated": counts["completions_truncated"],
        "skipped": counts["skipped"], "rejects": str(prepared.path.parent / "rejects.jsonl"),
        "pairs_file": str(prepared.path), "reference_reused": prepared.reused, "precision": precision,
        "checkpoints": result.path, "final_metrics": state["metrics"][-1],
        "packing": train.packing, "throughput": throughput(state["metrics"]),
        "seconds": round(time.perf_counter() - start, 1),
    }
    finish(output, "train", run_id, summary)  # last: the run is complete
    print(f"rayalign train: done in {summary['seconds']}s; final loss {summary['final_metrics']['loss']:.4f}; "
          f"model in {summary['final']}")
    if summary["throughput"]:
        print(f"rayalign train: {throughput_line(summary['throughput'])} (median step)")
    return summary


def trainer_settings(config: RunConfig, run_id: str) -> dict:
    """Ray Train's scaling and run settings from the train.* and cluster.* keys."""
    import ray.train

    train = config.train
    return {
        "scaling_config": ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=config.cluster.use_gpu,
                                                  resources_per_worker={"CPU": train.cpus_per_worker},
                                                  placement_strategy=train.placement_strategy),
        "run_config": ray.train.RunConfig(
            name=f"rayalign-{run_id[:12]}", storage_path=train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures)),
    }


def check_config(config: RunConfig) -> RunConfig:
    """Fail before any worker starts, naming the key; return the config with absolute paths."""
    from rayalign.cluster import check_shared_paths

    config.validate()
    check_shared_paths(config)
    check_keys(config)
    train, reference = config.train, config.reference
    if not train.pairs:
        raise ConfigError("train.pairs: is required (a pair file or directory of shards)")
    if not Path(train.pairs).exists():
        raise ConfigError(f"train.pairs: {train.pairs} not found")

    output = Path(train.output or Path(config.run_dir) / "train").resolve()
    storage = train.storage_path or str(output / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    train = dataclasses.replace(train, model=_absolute(train.model), pairs=str(Path(train.pairs).resolve()),
                                output=str(output), storage_path=storage)
    reference = dataclasses.replace(reference, model=_absolute(reference.model) if reference.model else None)
    return dataclasses.replace(config, train=train, reference=reference)


def check_keys(config: RunConfig) -> None:
    """The training keys that need no input file yet (a pipeline checks them before its first
    stage, when the pairs do not exist): the models, the loss options, LoRA with ZeRO."""
    from rayalign.train.losses import LOSSES

    train, reference = config.train, config.reference
    if not train.model:
        raise ConfigError("train.model: is required (a local model directory or a hub name)")
    for key, model in (("train.model", train.model), ("reference.model", reference.model)):
        if model and _looks_local(model) and not Path(model).exists():
            raise ConfigError(f"{key}: {model} not found")
    # `auto` becomes apo_zero or apo_down, so its options must suit both.
    for loss in ("apo_zero", "apo_down") if train.loss == "auto" else (train.loss,):
        params = inspect.signature(LOSSES[loss]).parameters
        options = [p for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name not in ("beta", "chosen_token_count")]
        for key in train.loss_options:
            if key not in [p.name for p in options]:
                known = ", ".join(p.name for p in options) or "none"
                raise ConfigError(f"train.loss_options.{key}: not an option of loss {loss!r} (options: {known})")
    if train.lora.enabled and train.zero_stage == 3:
        raise ConfigError("train.lora.enabled: LoRA trains with zero_stage 0, 1 or 2 (the adapters are small; "
                          "ZeRO-3 partitioning of the frozen base is not supported with them)")


def detect_precision(config: RunConfig) -> str:
    """train.precision, with `auto` resolved on a worker-shaped Ray task (the driver may sit on a
    node without the workers' GPU or CPU)."""
    from rayalign.cluster import connect
    from rayalign.train.engine import resolve_precision

    ray = connect(config.cluster, config.run_dir)
    if config.train.precision != "auto":
        return config.train.precision
    use_gpu = config.cluster.use_gpu
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(resolve_precision)
    return ray.get(task.remote("auto", use_gpu))


def _run_id(config: RunConfig, data_fingerprint: str, precision: str) -> str:
    """A digest of `shaping_fields`: a run finished with the same id is reused as it is."""
    return digest(shaping_fields(config, data_fingerprint, precision))


def shaping_fields(config: RunConfig, data_fingerprint: str, precision: str) -> dict:
    """The keys that shape the trained model, as dotted keys: what a rerun into the same
    train.output must keep (it resumes from the newest checkpoint, or finds the run finished)."""
    train = {k: v for k, v in dataclasses.asdict(config.train).items()
             if k not in _NOT_IN_RUN_ID and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
    return {**flatten("train", train), MODEL_CONTENT: tree_digest(config.train.model), "train.precision": precision,
            "train.pairs (tokenized, with reference log-probs)": data_fingerprint,
            "reference.on_the_fly": config.reference.on_the_fly, "reference.model": config.reference.model}


def packed_sizes(table, share_prefix: bool) -> tuple[int, ...]:
    """Each pair's tokens in a packed row (data.pair_tokens), from the tokenized pairs' table."""
    from rayalign.train.data import pair_tokens

    columns = [table.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return tuple(pair_tokens({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, share_prefix)
                 for p, c, r in zip(*columns))


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def _absolute(name: str) -> str:
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name
