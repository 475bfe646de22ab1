"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker.

Everything it needs arrives in `config` (see `run.py`): the TrainConfig, the tokenized pairs
as a Ray object, the data Schedule, the resolved precision and the output directory.

One optimizer step: each worker runs its micro-batches (chosen and rejected in one forward,
padded or packed), each micro-batch's loss weighted by its share of the step's pairs, so the
gradient DeepSpeed averages over the workers is the mean over the step's pairs however they were
split; the step's metrics are pair-weighted means over all workers, with the throughput (tokens/s,
padding_fraction, mfu) beside them. Every
`checkpoint_every` steps each worker adds its DeepSpeed shards and RNG state to a Ray Train
checkpoint (Ray merges the workers' files into one directory); rank 0 adds the trainer state:
the step, and the metrics and example ids of every committed step. A restarted worker group
resumes from the newest checkpoint at the next step of the same Schedule, so each example
lands in exactly one step of the final trajectory. The last report carries the exported model.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import time
from pathlib import Path


# The metrics that are means over a step's pairs; train_step returns them, then the step's real
# tokens, the positions its forwards computed (tokens plus padding) and its model FLOPs.
_MEANS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected")
TOKENS, SLOTS, FLOPS = len(_MEANS), len(_MEANS) + 1, len(_MEANS) + 2


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from rayalign.train.engine import build_engine, export_hf, load_reference, load_state, save_state
    from rayalign.train.logs import RunLog, say, show_step

    train, schedule, precision = config["train"], config["schedule"], config["precision"]
    output, pad_id = Path(config["output"]), config["pad_id"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(train.seed + rank)
    # Ray gives each worker OMP_NUM_THREADS = its CPUs; say so explicitly for torch's pool.
    torch.set_num_threads(train.cpus_per_worker)

    state = {"step": 0, "metrics": [], "steps": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / "trainer_state.json").read_text())
        if state.get("done"):  # a finished run started again: its last report holds the model
            return

    pairs = ray.get(config["pairs"]).to_pylist()
    engine = build_engine(train, precision, schedule.total_steps)
    reference = None
    if config["reference_model"] is not None:  # reference.on_the_fly
        reference = load_reference(config["reference_model"], train, precision, engine.device)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_state(engine, Path(directory), rank)
        if rank == 0:
            say(output, f"resumed from step {state['step']} of {schedule.total_steps}")
    log = RunLog(output, state["metrics"], state["steps"]) if rank == 0 else None
    peak = total_peak_flops(engine, train, precision, dist.all_reduce)
    if rank == 0:
        say(output, f"peak {peak / world / 1e9:,.1f} GFLOP/s per worker "
                    f"({'from train.peak_flops' if train.peak_flops else 'measured'}), for the mfu")
    started = time.perf_counter()

    for step in range(state["step"], schedule.total_steps):
        step_start = time.perf_counter()
        learning_rate = engine.get_lr()[0]
        micro_batches = [[pairs[i] for i in indices] for indices in schedule.micro_batches(step, rank)]
        sums, grad_norm = train_step(engine, reference, micro_batches, train, pad_id, dist.all_reduce)
        seconds = time.perf_counter() - step_start
        values = sums.tolist()
        metrics = {"step": step + 1, "epoch": step // schedule.steps_per_epoch, **dict(zip(_MEANS, values)),
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "learning_rate": learning_rate, "tokens/s": values[TOKENS] / seconds,
                   "padding_fraction": 1 - values[TOKENS] / values[SLOTS],
                   "mfu": values[FLOPS] / seconds / peak,
                   "pairs/s": schedule.batch_size / seconds, "elapsed_s": time.perf_counter() - started}
        record = {"step": step + 1, "epoch": metrics["epoch"],
                  "ids": [pairs[i]["id"] for i in schedule.step_indices(step)]}
        state["metrics"].append(metrics)
        state["steps"].append(record)
        state["step"] = step + 1
        if log is not None:
            log.add(metrics, record)
            if show_step(step + 1, schedule.total_steps):
                say(output, f"step {step + 1}/{schedule.total_steps}  loss {metrics['loss']:.4f}  "
                            f"margin {metrics['rewards/margins']:+.4f}  {metrics['pairs/s']:.1f} pairs/s  "
                            f"{metrics['tokens/s']:,.0f} tokens/s  padding {metrics['padding_fraction']:.0%}  "
                            f"mfu {metrics['mfu']:.1%}")
        if step + 1 == schedule.total_steps:
            break
        if (step + 1) % train.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_state(engine, Path(directory), rank, state if rank == 0 else None)
                ray.train.report(_reportable(metrics), checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"step-{step + 1:06d}")
        elif (step + 1) % train.report_every == 0:
            # Each report waits for the Train controller's next poll (about 2 s by default), so
            # short steps report every few steps; rank 0 logs every step to its files anyway.
            ray.train.report(_reportable(metrics))

    # The final report carries the model in Hugging Face format and the whole history.
    with tempfile.TemporaryDirectory() as directory:
        export_hf(engine, train, Path(directory) / "model", rank)
        final = None
        if rank == 0:
            (Path(directory) / "trainer_state.json").write_text(json.dumps({**state, "done": True}))
            final = ray.train.Checkpoint.from_directory(directory)
            log.close()
        ray.train.report(_reportable(state["metrics"][-1]), checkpoint=final, checkpoint_dir_name="final")


def train_step(engine, reference, micro_batches: list[list[dict]], train, pad_id: int, all_reduce):
    """One optimizer step of this worker over its micro-batches (padded, or packed with
    train.packing). Returns the step's metrics over all workers (through `all_reduce`): the
    _MEANS, pair-weighted means over the step's pairs, then its real tokens, computed positions
    and model FLOPs (at TOKENS, SLOTS, FLOPS), and the step's global gradient norm (None where
    DeepSpeed records none).

    Each micro-batch's mean loss is divided by batch_size / (its pairs x workers) instead of
    DeepSpeed's 1 / gradient_accumulation_steps: with equal micro-batches the two are the same,
    and with packed ones of different sizes the gradient is still the mean over the step's pairs.
    The accumulation boundary is the last micro-batch, however many there are.

    Every tensor stays on the engine's device, the sums handed to `all_reduce` included: NCCL,
    Ray Train's backend on GPUs, reduces only CUDA tensors, and a metric read back to the host
    after each micro-batch would wait for the GPU each time."""
    import torch

    sums = torch.zeros(len(_MEANS) + 3, dtype=torch.float64, device=engine.device)
    grad_norm = None
    # DeepSpeed wraps the optimizer under ZeRO, bf16 and fp16, and that wrapper records the norm;
    # otherwise it steps the torch optimizer directly and records none.
    records_norm = bool(engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())
    shape = model_shape(engine.module)
    engine.train()
    for m, batch in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(m == len(micro_batches) - 1)
        loss, row = _micro_batch_loss(engine, reference, batch, train, pad_id)
        engine.backward(loss / (train.batch_size / (len(batch) * train.num_workers)), scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary() and not records_norm:
            # Whole gradients, already averaged over workers.
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in engine.module.parameters() if p.grad is not None]).item()
        engine.step()
        sums[:TOKENS] += row[:TOKENS] * len(batch)
        sums[TOKENS:FLOPS] += row[TOKENS:]
        sums[FLOPS] += model_flops(shape, batch, train.lora.enabled, train.shares_prefix)
    all_reduce(sums)
    sums[:TOKENS] /= train.batch_size
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return sums, grad_norm


def model_shape(module) -> dict:
    """What the FLOPs of a step depend on: the parameters (all of them, also where ZeRO-3 holds a
    shard: DeepSpeed's `ds_numel`), the layers and the hidden size."""
    config = getattr(module, "config", None)
    return {"parameters": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
            "layers": getattr(config, "num_hidden_layers", 0), "hidden": getattr(config, "hidden_size", 0)}


def model_flops(shape: dict, batch: list[dict], lora: bool, share_prefix: bool = False) -> float:
    """The model FLOPs of one training micro-batch: per token 6 x parameters (forward 2, backward
    4; 4 with LoRA, whose frozen weights get no gradient), plus causal attention, 6 x layers x
    hidden x length^2 per sequence (its half of the score and value products, forward and backward).
    With `share_prefix` a pair's common beginning counts once, and the rest of rejected attends
    to it (2 x its length x the shared length more). The reference and the padding are not
    counted: this is the work the model needs."""
    from rayalign.train.data import shared_prefix

    per_param, attention = 4 if lora else 6, 6 * shape["layers"] * shape["hidden"]
    total = 0.0
    for pair in batch:
        prompt, chosen, rejected = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
        if share_prefix:
            shared = prompt + shared_prefix(pair)
            rest = prompt + rejected - shared
            tokens = prompt + chosen + rest
            total += per_param * shape["parameters"] * tokens + attention * (
                (prompt + chosen) ** 2 + rest ** 2 + 2 * rest * shared)
            continue
        for answer in (chosen, rejected):
            length = prompt + answer
            total += per_param * shape["parameters"] * length + attention * length ** 2
    return total


def total_peak_flops(engine, train, precision: str, all_reduce) -> float:
    """The workers' summed peak FLOP/s for the mfu: train.peak_flops per worker when given,
    otherwise each worker's own measure (`measure_peak_flops`)."""
    import torch

    own = train.peak_flops or measure_peak_flops(engine.device, precision)
    total = torch.tensor(float(own), dtype=torch.float64, device=engine.device)
    all_reduce(total)
    return float(total)


def measure_peak_flops(device, precision: str, seconds: float = 0.5) -> float:
    """FLOP/s of square matrix products in the compute precision on `device`: the practical peak
    of this worker (a vendor's datasheet peak is higher; give it as train.peak_flops).

    The best of several short timings, as a worker measures while its neighbours start: in the
    packing benchmark's run one long timing read 52.5 GFLOP/s where the same products reach 65 on
    a quiet machine (512, 1024 and 2048 wide alike), and that run's mfu read a quarter high. Give
    train.peak_flops for figures that compare across runs."""
    import torch

    from rayalign.train.engine import torch_dtype

    n = 4096 if torch.device(device).type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
    b = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _micro_batch_loss(engine, reference, batch: list[dict], train, pad_id: int):
    """The mean loss of one micro-batch and its metric row (the _MEANS, then its real tokens
    and computed positions)."""
    import torch

    from rayalign.train.forward import pair_logps
    from rayalign.train.losses import LOSSES, per_token_nll

    policy = pair_logps(engine, batch, pad_id, packed=train.packing, share_prefix=train.shares_prefix)
    if reference is not None:
        with torch.no_grad():
            ref = pair_logps(reference, batch, pad_id, packed=train.packing, share_prefix=train.shares_prefix)
        ref_chosen, ref_rejected = ref["chosen"], ref["rejected"]
    else:
        # On the policy's device: on a GPU worker the stored columns must meet CUDA log-probs.
        device = policy["chosen"].device
        ref_chosen = torch.tensor([p["ref_chosen_logps"] for p in batch], dtype=torch.float32, device=device)
        ref_rejected = torch.tensor([p["ref_rejected_logps"] for p in batch], dtype=torch.float32, device=device)
    loss_fn = LOSSES[train.loss]
    options = dict(train.loss_options)
    if "chosen_token_count" in inspect.signature(loss_fn).parameters:  # sft
        options["chosen_token_count"] = policy["chosen_tokens"]
    chosen, rejected = policy["chosen"], policy["rejected"]
    if train.length_normalize:  # per-token log-ratios: policy and reference over the same tokens
        n_chosen = policy["chosen_tokens"].clamp(min=1).to(chosen.dtype)
        n_rejected = policy["rejected_tokens"].clamp(min=1).to(rejected.dtype)
        chosen, rejected = chosen / n_chosen, rejected / n_rejected
        ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
    losses, metrics = loss_fn(chosen, rejected, ref_chosen, ref_rejected, beta=train.beta, **options)
    loss = losses.mean()
    if train.sft_weight:
        loss = loss + train.sft_weight * per_token_nll(policy["chosen"], policy["chosen_tokens"]).mean()
    metrics = {**metrics, "loss": loss, "logps/chosen": policy["chosen"].mean(),
               "logps/rejected": policy["rejected"].mean()}
    device = policy["chosen"].device
    row = [torch.as_tensor(metrics[k]).detach().to(device, torch.float64).reshape(()) for k in _MEANS]
    row += [torch.tensor(float(policy[k]), dtype=torch.float64, device=device) for k in ("tokens", "slots")]
    return loss, torch.stack(row)


def _reportable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
