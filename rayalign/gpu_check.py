"""The GPU check behind `scripts/gpu-check`: does the training code compute on a GPU what it
computes on the CPU? It runs the production functions, never copies of them:

- the loss table (every loss of `rayalign.train.losses.LOSSES` on the same inputs),
- the log-prob code (`pair_logps`, chosen and rejected in one forward) and the reference pass's
  actor (`ReferenceLogps`, its model on the device),
- the training step the Ray Train loop runs (`rayalign.train.loop.train_step`) in one process
  with a process group of size 1 (NCCL on the GPU, gloo with `--cpu`): 4 steps under ZeRO-2 and
  2 under ZeRO-3 on a real DeepSpeed engine where DeepSpeed imports, else on a plain torch AdamW
  engine that drives the same step function.

Each result is compared with the same computation on the CPU, within the tolerances below (all
fp32), and the check prints one line per part with its figure. It needs only torch, transformers
and PyYAML: no Ray, vLLM or network; it builds its own tiny model.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSS_TOLERANCE = 1e-5       # per example, fp32 losses of the same log-probs
LOGPS_TOLERANCE = 1e-3      # per sequence, summed fp32 log-probs of a 2-layer model
STEP_TOLERANCE = 1e-4       # the first step's loss, before any update
PACKED_TOLERANCE = 1e-6     # relative, packed against padded steps on the same device


# Files that bring DeepSpeed to a bare machine (Python 3.12, torch and transformers): filled here by
# `scripts/gpu-check --fetch-wheels`, carried beside the checkout, installed there without network.
WHEELS = Path(__file__).resolve().parents[1] / ".gpu-check-wheels"
# What DeepSpeed needs beyond torch and transformers (which bring numpy, packaging, tqdm, PyYAML).
DEEPSPEED_NEEDS = ("einops", "hjson", "msgpack", "ninja", "psutil", "py-cpuinfo", "pydantic")


class CheckFailed(AssertionError):
    pass


def fetch_commands(folder: Path, python_version: str = "3.12") -> list[list[str]]:
    """The pip commands that fill `folder`: DeepSpeed's source (PyPI has no DeepSpeed wheel) at
    the version installed here, and its dependencies as manylinux x86-64 wheels for
    `python_version`."""
    from importlib.metadata import version

    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder)]
    return [pip + ["--no-deps", "--no-binary", "deepspeed", f"deepspeed=={version('deepspeed')}"],
            pip + ["--python-version", python_version, "--platform", "manylinux2014_x86_64",
                   "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:", *DEEPSPEED_NEEDS]]


def fetch_wheels(folder: Path = WHEELS, python_version: str = "3.12", out=print) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for command in fetch_commands(folder, python_version):
        subprocess.run(command, check=True)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    out(f"rayalign gpu-check: {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB in {folder} "
        f"for Python {python_version}")


def install_carried(folder: Path) -> Path:
    """Install every wheel and source archive in `folder` without network or dependency
    resolution into `folder/site-pyXY` (once per Python version) and return that folder.
    Sources build against this environment (no build isolation: torch is already here)."""
    site = folder / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    if site.is_dir():
        return site
    files = sorted(str(p) for p in folder.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    if not files:
        raise CheckFailed(f"no wheels or sources in {folder}: fill it with `scripts/gpu-check --fetch-wheels`")
    partial = site.with_name(site.name + ".partial")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--no-build-isolation", "--target", str(partial), *files], capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckFailed(f"installing the files of {folder} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    partial.rename(site)
    return site


def deepspeed_here(folder: Path = WHEELS) -> tuple[bool, str]:
    """Whether DeepSpeed imports, installed from `folder` first where it does not and the folder
    is here, and a line saying which one or why not (the check then runs a torch AdamW engine)."""
    instead = "a torch AdamW engine instead"
    try:
        import deepspeed
    except ImportError:
        if not folder.is_dir():
            return False, f"not installed, and no carried files in {folder}: {instead}"
        try:
            sys.path.insert(0, str(install_carried(folder)))
            importlib.invalidate_caches()
            import deepspeed
        except (CheckFailed, ImportError) as failure:
            return False, f"not installed, and the carried files did not give it ({failure}): {instead}"
    return True, f"{deepspeed.__version__} from {Path(deepspeed.__file__).parents[1]}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


class TorchEngine:
    """What `train_step` needs of a DeepSpeed engine, over a plain model and torch AdamW, for a
    machine without DeepSpeed. One process: gradients are whole, as after DeepSpeed's reduction."""

    def __init__(self, model, learning_rate: float, device):
        import torch

        self.device = torch.device(device)
        self.module = model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=learning_rate)
        self.boundary = True

    def __call__(self, **inputs):
        return self.module(**inputs)

    def parameters(self):
        return self.module.parameters()

    def train(self):
        self.module.train()

    def backward(self, loss, scale_wrt_gas: bool = False):
        # train_step scales each micro-batch's loss itself (scale_wrt_gas=False, as it tells DeepSpeed).
        loss.backward()

    def set_gradient_accumulation_boundary(self, is_boundary: bool):
        self.boundary = is_boundary

    def is_gradient_accumulation_boundary(self):
        return self.boundary

    def step(self):
        if self.boundary:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def zero_optimization(self):
        return 0

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return False

    def get_global_grad_norm(self):
        return None


def toy_rows(tokenizer, n: int = 16) -> list[dict]:
    """Tokenized addition pairs: chosen the sum, rejected the sum with its last digit changed."""
    from rayalign.tasks import addition_prompts
    from rayalign.train.data import tokenize_pairs

    pairs = []
    for row in addition_prompts(n, seed=0):
        last = row["reference"][-1]
        wrong = row["reference"][:-1] + str((int(last) + 1) % 10)
        pairs.append({"id": row["id"], "prompt": row["prompt"], "chosen": row["reference"], "rejected": wrong})
    return tokenize_pairs(tokenizer, pairs, 64, 32).rows


def check_losses(device) -> str:
    import inspect

    import torch

    from rayalign.train.losses import LOSSES

    generator = torch.Generator().manual_seed(0)
    inputs = [-20 * torch.rand(8, generator=generator) for _ in range(4)]
    worst = 0.0
    for name, loss in LOSSES.items():
        options = {"chosen_token_count": torch.full((8,), 5)} if "chosen_token_count" in inspect.signature(
            loss).parameters else {}
        on_cpu, _ = loss(*inputs, beta=0.1, **options)
        on_device, _ = loss(*(t.to(device) for t in inputs), beta=0.1,
                            **{k: v.to(device) for k, v in options.items()})
        _check(on_device.device.type == _type(device), f"loss {name} left the device")
        difference = (on_device.cpu() - on_cpu).abs().max().item()
        _check(difference <= LOSS_TOLERANCE, f"loss {name}: {difference:.2e} from the CPU (> {LOSS_TOLERANCE})")
        worst = max(worst, difference)
    return f"{len(LOSSES)} losses agree with the CPU (max |diff| {worst:.1e} <= {LOSS_TOLERANCE})"


def check_logps(model_dir: Path, rows: list[dict], pad_id: int, device) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from rayalign.train.forward import pair_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        on_cpu = pair_logps(model, rows, pad_id)
        model.to(device)
        start = time.perf_counter()
        on_device = pair_logps(model, rows, pad_id)
        _synchronize(device)
        seconds = time.perf_counter() - start
    difference = max((on_device[k].cpu() - on_cpu[k]).abs().max().item() for k in ("chosen", "rejected"))
    _check(on_device["chosen"].device.type == _type(device), "log-probs left the device")
    _check(difference <= LOGPS_TOLERANCE, f"log-probs: {difference:.2e} from the CPU (> {LOGPS_TOLERANCE})")
    return (f"{len(rows)} pairs agree with the CPU (max |diff| {difference:.1e} nats <= {LOGPS_TOLERANCE}), "
            f"{on_device['tokens'] / seconds:,.0f} tokens/s")


def check_reference(model_dir: Path, rows: list[dict], pad_id: int, device) -> str:
    """The reference pass's actor (`ReferenceLogps`, as Ray Data runs it) on the device against the
    CPU; the CPU's log-probs become the rows' stored reference columns for the training steps."""
    from rayalign.train.reference import ReferenceLogps

    batch = {"index": list(range(len(rows))), **{k: [r[k] for r in rows] for k in
                                                  ("prompt_ids", "chosen_ids", "rejected_ids")}}
    on_cpu = ReferenceLogps(str(model_dir), "fp32", pad_id, "cpu")(batch)
    actor = ReferenceLogps(str(model_dir), "fp32", pad_id, device)
    _check(next(actor.model.parameters()).device.type == _type(device), "the reference model is not on the device")
    start = time.perf_counter()
    on_device = actor(batch)
    seconds = time.perf_counter() - start
    difference = max(abs(on_device[k] - on_cpu[k]).max() for k in ("ref_chosen_logps", "ref_rejected_logps"))
    _check(difference <= LOGPS_TOLERANCE, f"reference pass: {difference:.2e} from the CPU (> {LOGPS_TOLERANCE})")
    for row, chosen, rejected in zip(rows, on_cpu["ref_chosen_logps"], on_cpu["ref_rejected_logps"]):
        row["ref_chosen_logps"], row["ref_rejected_logps"] = float(chosen), float(rejected)
    return (f"{len(rows)} pairs agree with the CPU (max |diff| {difference:.1e} nats <= {LOGPS_TOLERANCE}), "
            f"{len(rows) / seconds:,.0f} pairs/s")


def _type(device) -> str:
    import torch

    return torch.device(device).type


def check_steps(model_dir: Path, rows: list[dict], pad_id: int, device, zero_stage: int, steps: int) -> str:
    """`steps` steps of train_step over micro-batches of 4 pairs; the first step's metrics against
    the CPU's."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rayalign.train.loop import _MEANS, TOKENS, _micro_batch_loss, train_step

    train = step_config(model_dir, zero_stage)
    batches = [rows[4 * i:4 * i + 4] for i in range(steps)]
    cpu_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        _, expected = _micro_batch_loss(cpu_model, None, batches[0], train, pad_id)
    engine, kind = _engine(train, model_dir, device, steps)
    _check(engine.device.type == _type(device), f"the engine is on {engine.device}, not {device}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows_seen = []
    start = time.perf_counter()
    for batch in batches:
        sums, _ = train_step(engine, None, [batch], train, pad_id, dist.all_reduce)
        rows_seen.append(sums.cpu())
    _synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(row[TOKENS].item() for row in rows_seen)
    # The first step's metrics (loss, rewards, the policy's log-probs) were computed before any
    # update: the CPU's, within the tolerances.
    first = dict(zip(_MEANS, rows_seen[0].tolist()))
    cpu = dict(zip(_MEANS, expected.tolist()))
    for name, value in first.items():
        tolerance = LOGPS_TOLERANCE if name.startswith("logps/") else STEP_TOLERANCE
        _check(abs(value - cpu[name]) <= tolerance, f"{kind}: the first step's {name} is {value:.6f}, "
                                                    f"the CPU's {cpu[name]:.6f} (tolerance {tolerance})")
    losses = [row[0].item() for row in rows_seen]
    _check(all(loss == loss for loss in losses), f"{kind}: a loss is NaN: {losses}")
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if torch.cuda.is_available() else ""
    return (f"{kind}: {steps} steps, first step as on the CPU (loss {losses[0]:.5f}, logps/chosen "
            f"{first['logps/chosen']:.3f}), last loss {losses[-1]:.5f}, {steps * 4 / seconds:.1f} pairs/s, "
            f"{tokens / seconds:,.0f} tokens/s{peak}")


def step_config(model_dir: Path, zero_stage: int, *overrides: str):
    """The train config of the checked steps: 4 pairs a step on one worker, fp32, constant lr 1e-3."""
    from rayalign.config import load_config

    return load_config(None, [f"train.model={model_dir}", "train.precision=fp32", "train.batch_size=4",
                              "train.micro_batch_size=4", "train.num_workers=1", "train.learning_rate=1e-3",
                              "train.warmup_ratio=0", "train.lr_schedule=constant", "train.max_length=64",
                              "train.max_prompt_length=32", f"train.zero_stage={zero_stage}", *overrides]).train


def check_packed_steps(model_dir: Path, rows: list[dict], pad_id: int, device, steps: int = 10) -> str:
    """The packed step (train.packing) against the padded one: `steps` steps from the same weights
    over the same 4 pairs a step, packed into micro-batches of 128 tokens, unshared (unequal
    numbers of pairs) and sharing each pair's common beginning (train.share_prefix, the default);
    every step's loss and log-probs agree within PACKED_TOLERANCE, relative."""
    import torch.distributed as dist

    from rayalign.train.data import pack_step, pair_tokens
    from rayalign.train.loop import _MEANS, train_step

    configs = {"padded": step_config(model_dir, 2),
               "unshared": step_config(model_dir, 2, "train.packing=true", "train.share_prefix=false",
                                       "train.tokens_per_micro_batch=128"),
               "shared": step_config(model_dir, 2, "train.packing=true", "train.tokens_per_micro_batch=128")}
    step_rows = [[(4 * i + j) % len(rows) for j in range(4)] for i in range(steps)]
    sizes, worst, results = {}, 0.0, {}
    for name, config in configs.items():
        engine, kind = _engine(config, model_dir, device, steps)
        tokens = [pair_tokens(r, config.shares_prefix) for r in rows]
        seen = []
        start = time.perf_counter()
        for indices in step_rows:
            split = pack_step(indices, tokens, config.token_budget, 1)[0] if config.packing else [indices]
            micro_batches = [[rows[k] for k in part] for part in split]
            sizes.setdefault(name, set()).add(tuple(len(part) for part in split))
            sums, _ = train_step(engine, None, micro_batches, config, pad_id, dist.all_reduce)
            seen.append(dict(zip(_MEANS, sums.cpu().tolist())))
        _synchronize(device)
        results[name] = (seen, time.perf_counter() - start)
    _check(any(len(set(s)) > 1 for s in sizes["unshared"]),
           f"the packed micro-batches were all of one size: {sorted(sizes['unshared'])}")
    for packing in ("unshared", "shared"):
        for step, (padded, packed) in enumerate(zip(results["padded"][0], results[packing][0]), 1):
            for name in ("loss", "logps/chosen", "logps/rejected"):
                relative = abs(packed[name] - padded[name]) / max(abs(padded[name]), 1e-12)
                worst = max(worst, relative)
                _check(relative <= PACKED_TOLERANCE, f"{kind}, step {step}: the packed ({packing}) {name} is "
                                                     f"{packed[name]:.8f}, the padded {padded[name]:.8f} (relative "
                                                     f"{relative:.1e} > {PACKED_TOLERANCE})")
    rate = {name: steps * 4 / seconds for name, (_, seconds) in results.items()}
    return (f"{kind}: {steps} packed steps ({', '.join(map(str, sorted(sizes['unshared'])))} pairs per micro-batch; "
            f"shared prefixes {', '.join(map(str, sorted(sizes['shared'])))}) agree with the padded ones (max relative "
            f"diff {worst:.1e} <= {PACKED_TOLERANCE}), {rate['unshared']:.1f} pairs/s packed, {rate['shared']:.1f} "
            f"shared, {rate['padded']:.1f} padded")


def _engine(train, model_dir: Path, device, steps: int):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        from rayalign.train.engine import load_model

        model = load_model(str(model_dir), "fp32", trainable=True, packed=train.packing)
        return TorchEngine(model, train.learning_rate, device), "torch AdamW (no DeepSpeed here)"
    from rayalign.train.engine import build_engine

    return build_engine(train, "fp32", steps), f"DeepSpeed ZeRO-{train.zero_stage}"


def _quiet() -> None:
    """Library warnings and progress bars off: the check prints its own lines."""
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _synchronize(device) -> None:
    import torch

    if _type(device) == "cuda":
        torch.cuda.synchronize()


def run_reduced(cpu: bool, out=print) -> None:
    """The reduced check; raises CheckFailed naming the part that disagrees."""
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from rayalign.models import init_model
    from rayalign.train.reference import pad_id as pad_of

    _quiet()
    if not cpu and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device: run `scripts/gpu-check --cpu` for the CPU check")
    device = "cpu" if cpu else "cuda:0"
    backend = "gloo" if cpu else "nccl"
    start = time.perf_counter()
    name = "CPU" if cpu else torch.cuda.get_device_name(0)
    out(f"rayalign gpu-check (reduced) on {name}: torch {torch.__version__}, process group {backend} of size 1")
    out(f"  deepspeed  {deepspeed_here()[1]}")
    with tempfile.TemporaryDirectory(prefix="rayalign-gpu-check-") as tmp:
        model_dir = init_model(Path(tmp) / "tiny", "tiny")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows, pad = toy_rows(tokenizer), pad_of(tokenizer)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if device != "cpu":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, rank=0, world_size=1)
        try:
            out(f"  losses     {check_losses(device)}")
            out(f"  log-probs  {check_logps(model_dir, rows, pad, device)}")
            out(f"  reference  {check_reference(model_dir, rows, pad, device)}")
            out(f"  train      {check_steps(model_dir, rows, pad, device, zero_stage=2, steps=4)}")
            out(f"  train      {check_steps(model_dir, rows, pad, device, zero_stage=3, steps=2)}")
            out(f"  packed     {check_packed_steps(model_dir, rows, pad, device)}")
        finally:
            dist.destroy_process_group()
    out(f"rayalign gpu-check: passed in {time.perf_counter() - start:.0f} s")
