"""DeepSpeed for one training worker: precision, the ZeRO config, the LR schedule, the engine,
its checkpoints and the Hugging Face export.

Every function here is called from inside a Ray Train worker (or from tests), never imports
deepspeed at module level, and takes all settings as arguments.
"""

from __future__ import annotations

import json
import math
import platform
import random
from pathlib import Path

from rayalign.config import TrainConfig

DS_TAG = "deepspeed"


# ---- precision -------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (x86 AVX512-BF16 or AMX, Arm BF16), read from the
    kernel's CPU flags. Unknown platforms answer False: fp32 is always correct, only slower."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """`fp32` or `bf16`; `auto` is bf16 where this machine computes it natively, GPU or CPU."""
    if requested != "auto":
        return requested
    if use_gpu:
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


# ---- configuration ---------------------------------------------------------------------------

def deepspeed_config(train: TrainConfig, precision: str) -> dict:
    """The DeepSpeed config of a run; the optimizer and LR schedule are passed as objects."""
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # A torch AdamW works at every stage and on every device; DeepSpeed's fused optimizers
        # need compiled extensions that CPU machines often lack.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int):
    """LR factor of optimizer step s (0-based): linear warmup (s + 1) / (warmup + 1), then
    cosine or linear decay towards 0 over the remaining steps, or constant. No step gets 0."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    return math.ceil(train.warmup_ratio * total_steps)


# ---- the engine ------------------------------------------------------------------------------

def load_model(path: str, precision: str, trainable: bool, packed: bool = False):
    """A causal LM; `packed` (train.packing) gives it the attention of packed sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayalign.train.forward import PACKED_ATTENTION, register_packed_attention

    # The policy loads in fp32 and DeepSpeed keeps fp32 master weights under bf16; a frozen
    # reference loads directly in the compute precision.
    dtype = torch.float32 if trainable else torch_dtype(precision)
    options = {}
    if packed:
        register_packed_attention()
        options["attn_implementation"] = PACKED_ATTENTION
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    model.config.use_cache = False
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def load_policy(train: TrainConfig, precision: str, ds_config: dict):
    """The trainable policy. Under ZeRO-3 it is partitioned across the workers as it loads
    (transformers runs from_pretrained inside deepspeed.zero.Init while an HfDeepSpeedConfig
    lives), so no worker ever holds the whole model; torch.distributed must be initialised."""
    if train.zero_stage != 3:
        return load_model(train.model, precision, trainable=True, packed=train.packing)
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(ds_config)
    model = load_model(train.model, precision, trainable=True, packed=train.packing)
    del zero3  # transformers holds it weakly: a reference model loaded later (on the fly) loads whole
    return model


def load_reference(path: str, train: TrainConfig, precision: str, device):
    """The frozen reference model of `reference.on_the_fly`, beside the policy. Under ZeRO-3 it is
    partitioned across the workers as it loads, like the policy, and runs in a DeepSpeed engine
    without an optimizer, which gathers each layer's weights for its forward: no worker holds the
    whole reference. Otherwise it is whole, on the worker's device."""
    if train.zero_stage != 3:
        return load_model(path, precision, trainable=False, packed=train.packing).to(device)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = deepspeed_config(train, precision)
    ds_config["zero_optimization"] = {"stage": 3}  # nothing to offload: no optimizer state
    zero3 = HfDeepSpeedConfig(ds_config)
    model = load_model(path, precision, trainable=False, packed=train.packing)
    del zero3
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def build_engine(train: TrainConfig, precision: str, total_steps: int):
    """deepspeed.initialize over the policy with AdamW and the warmup schedule."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    ds_config = deepspeed_config(train, precision)
    model = trainable_policy(load_policy(train, precision, ds_config), train)
    optimizer, scheduler = make_optimizer(model, train, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def trainable_policy(model, train: TrainConfig):
    """The policy as it trains: gradient checkpointing (train.gradient_checkpointing) and LoRA
    adapters (train.lora.*) when asked."""
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.lora.enabled:
        model = with_lora(model, train)
    return model


def make_optimizer(model, train: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters (train.learning_rate, train.weight_decay) and the
    learning-rate schedule (train.lr_schedule, train.warmup_ratio)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    factor = lr_multiplier(train.lr_schedule, warmup_steps(train, total_steps), total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def with_lora(model, train: TrainConfig):
    """LoRA adapters (peft) on `train.lora.target_modules`; only they train. The frozen base is
    the reference model too, so with precomputed reference log-probs nothing else is held."""
    from peft import LoraConfig, get_peft_model

    lora = train.lora
    if train.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that carries grad
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


# ---- checkpoints -----------------------------------------------------------------------------

def save_state(engine, directory: Path, rank: int, trainer_state: dict | None) -> None:
    """Write this rank's part of a resumable checkpoint: DeepSpeed's model, optimizer and LR
    scheduler shards (a collective call), this rank's RNG state, and on rank 0 the trainer state."""
    import numpy as np
    import torch

    engine.save_checkpoint(str(directory), tag=DS_TAG)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    if trainer_state is not None:
        (directory / "trainer_state.json").write_text(json.dumps(trainer_state))


def load_state(engine, directory: Path, rank: int) -> None:
    """Restore this rank's part of what save_state wrote (the trainer state is read by the loop)."""
    import numpy as np
    import torch

    path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")
    rng = torch.load(directory / f"rng_rank{rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- export ----------------------------------------------------------------------------------

def gathered_state_dict(module, rank: int) -> dict | None:
    """A ZeRO-3 partitioned module's whole state dict on rank 0 (in the CPU's memory, in the
    weights' own dtype); None on the other ranks, which must take part all the same.

    Parameters are gathered one module at a time (DeepSpeed's GatheredParameters), so no GPU
    holds more than one layer's whole weights beside its own shards; a tied weight is gathered
    once and appears under each of its names, as in an unpartitioned state dict. Buffers are
    not partitioned."""
    import deepspeed

    state, seen = {}, {}
    for prefix, submodule in module.named_modules():
        own = [(name, p) for name, p in submodule.named_parameters(prefix=prefix, recurse=False)]
        new = [p for _, p in own if id(p) not in seen]
        if new:
            with deepspeed.zero.GatheredParameters(new, modifier_rank=None):
                if rank == 0:
                    seen.update((id(p), p.detach().to("cpu", copy=True)) for p in new)
                else:
                    seen.update((id(p), None) for p in new)
        state.update((name, seen[id(p)]) for name, p in own)
    if rank != 0:
        return None
    persistent = module.state_dict().keys()  # names only: under ZeRO-3 its tensors are empty
    state.update((name, b.detach().to("cpu", copy=True)) for name, b in module.named_buffers() if name in persistent)
    return state


def export_hf(engine, train: TrainConfig, directory: Path, rank: int) -> None:
    """The policy in Hugging Face format (safetensors, config, tokenizer with chat template).

    Under ZeRO-3 every rank takes part in gathering the shards; rank 0 writes."""
    from transformers import AutoTokenizer

    if train.zero_stage == 3:
        state = gathered_state_dict(engine.module, rank)
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    module = engine.module
    if train.lora.enabled:
        # The adapters merged into the base weights: a plain checkpoint that vLLM serves. This
        # is the end of the run, so the trained module may be changed in place.
        module = module.merge_and_unload()
        state = None
    module.config.use_cache = True
    module.save_pretrained(directory, state_dict=state, safe_serialization=True)
    if module.generation_config is not None:
        module.generation_config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(train.model).save_pretrained(directory)
