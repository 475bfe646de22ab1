"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker.

Everything it needs arrives in `config` (see `run.py`): the TrainConfig, the tokenized pairs
as a Ray object, the data Schedule, the resolved precision and the output directory.

One optimizer step: each worker runs its `accumulation` micro-batches (chosen and rejected in
one concatenated forward), DeepSpeed averages the gradients over micro-batches and workers and
steps; the step's metrics are averaged over all workers and reported. Every
`checkpoint_every` steps each worker adds its DeepSpeed shards and RNG state to a Ray Train
checkpoint (Ray merges the workers' files into one directory); rank 0 adds the trainer state:
the step, and the metrics and example ids of every committed step. A restarted worker group
resumes from the newest checkpoint at the next step of the same Schedule, so each example
lands in exactly one step of the final trajectory. The last report carries the exported model.
"""

from __future__ import annotations

import functools
import inspect
import sys
import tempfile
import time
from pathlib import Path

from rayalign.train.logs import METRICS

# Per micro-batch sums reduced over workers: the metrics that are means, then token count.
_MEANS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected")


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from rayalign.train.engine import build_engine, export_hf, load_model, load_state, save_state
    from rayalign.train.forward import pair_logps
    from rayalign.train.logs import RunLog
    from rayalign.train.losses import LOSSES

    train, schedule, precision = config["train"], config["schedule"], config["precision"]
    output, pad_id = Path(config["output"]), config["pad_id"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(train.seed + rank)

    pairs = ray.get(config["pairs"]).to_pylist()
    engine = build_engine(train, precision, schedule.total_steps)
    reference = None
    if config["reference_model"] is not None:  # reference.on_the_fly
        reference = load_model(config["reference_model"], precision, trainable=False)
    loss_fn = functools.partial(LOSSES[train.loss], beta=train.beta, **train.loss_options)
    wants_counts = "chosen_token_count" in inspect.signature(LOSSES[train.loss]).parameters

    state = {"step": 0, "metrics": [], "steps": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(engine, Path(directory), rank)
        if state.get("done"):
            return
        if rank == 0:
            sys.stdout.write(f"rayalign train: resumed from step {state['step']} of {schedule.total_steps}\n")
    log = RunLog(output, state["metrics"], state["steps"]) if rank == 0 else None
    started = time.perf_counter()

    for step in range(state["step"], schedule.total_steps):
        step_start = time.perf_counter()
        learning_rate = engine.get_lr()[0]
        sums = torch.zeros(len(_MEANS) + 1, dtype=torch.float64)
        grad_norm = None
        engine.train()
        for indices in schedule.micro_batches(step, rank):
            batch = [pairs[i] for i in indices]
            policy = pair_logps(engine, batch, pad_id)
            if reference is not None:
                with torch.no_grad():
                    ref = pair_logps(reference, batch, pad_id)
                ref_chosen, ref_rejected = ref["chosen"], ref["rejected"]
            else:
                ref_chosen = torch.tensor([p["ref_chosen_logps"] for p in batch], dtype=torch.float32)
                ref_rejected = torch.tensor([p["ref_rejected_logps"] for p in batch], dtype=torch.float32)
            options = {"chosen_token_count": policy["chosen_tokens"]} if wants_counts else {}
            losses, metrics = loss_fn(policy["chosen"], policy["rejected"], ref_chosen, ref_rejected, **options)
            loss = losses.mean()
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and not hasattr(engine.optimizer, "_global_grad_norm"):
                # Without ZeRO and bf16, DeepSpeed steps the torch optimizer directly and records
                # no norm; here the gradients are whole and already averaged over workers.
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in engine.module.parameters() if p.grad is not None]).item()
            engine.step()
            metrics = {**metrics, "loss": loss, "logps/chosen": policy["chosen"].mean(),
                       "logps/rejected": policy["rejected"].mean()}
            sums += torch.tensor([float(metrics[k].detach()) for k in _MEANS] + [policy["tokens"]], dtype=torch.float64)
        dist.all_reduce(sums)
        seconds = time.perf_counter() - step_start
        means = (sums[:-1] / (schedule.accumulation * world)).tolist()
        grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        metrics = {"step": step + 1, "epoch": step // schedule.steps_per_epoch, **dict(zip(_MEANS, means)),
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "learning_rate": learning_rate, "tokens/s": float(sums[-1]) / seconds,
                   "pairs/s": schedule.batch_size / seconds, "elapsed_s": time.perf_counter() - started}
        ids = [pairs[i]["id"] for i in schedule.step_indices(step)]
        record = {"step": step + 1, "epoch": metrics["epoch"], "ids": ids}
        state["metrics"].append(metrics)
        state["steps"].append(record)
        state["step"] = step + 1
        if log is not None:
            log.add(metrics, record)
            # Not print(): Ray Train patches it to log as well, which shows every line twice.
            sys.stdout.write(f"rayalign train: step {step + 1}/{schedule.total_steps}  loss {metrics['loss']:.4f}  "
                             f"margin {metrics['rewards/margins']:+.4f}  {metrics['pairs/s']:.1f} pairs/s\n")
            sys.stdout.flush()
        if step + 1 == schedule.total_steps:
            break
        if (step + 1) % train.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_state(engine, Path(directory), rank, state if rank == 0 else None)
                ray.train.report(_reportable(metrics), checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"step-{step + 1:06d}")
        else:
            ray.train.report(_reportable(metrics))

    # The final report carries the model in Hugging Face format and the whole history.
    with tempfile.TemporaryDirectory() as directory:
        export_hf(engine, train, Path(directory) / "model", rank)
        final = None
        if rank == 0:
            import json

            (Path(directory) / "trainer_state.json").write_text(json.dumps({**state, "done": True}))
            final = ray.train.Checkpoint.from_directory(directory)
            log.close()
        ray.train.report(_reportable(state["metrics"][-1]), checkpoint=final, checkpoint_dir_name="final")


def _reportable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
