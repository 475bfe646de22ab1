"""Typed configuration for every stage, loaded from YAML with `section.key=value` overrides.

One `RunConfig` describes a whole run; each subcommand reads its own section. Loading is
strict: an unknown key, a value of the wrong type or an impossible value raises `ConfigError`
with one sentence that names the dotted key (for example `train.zero_stage`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ClusterConfig:
    """Where Ray runs. `address` None starts a local Ray unless one is reachable (a Ray Job)."""

    address: str | None = None
    # Logical CPUs for a local Ray; on a 2-core box more than the physical count lets an
    # engine, the Serve ingress and Train workers be placed together.
    num_cpus: int | None = None
    object_store_memory_gb: float | None = None
    use_gpu: bool = False

    def validate(self, key: str) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, f"{key}.num_cpus", "must be at least 1")
        _check(
            self.object_store_memory_gb is None or self.object_store_memory_gb > 0,
            f"{key}.object_store_memory_gb",
            "must be positive",
        )


@dataclass
class EngineConfig:
    """A vLLM engine: the same keys on CPU and GPU, only the resources differ."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = 1024
    # On CPU this is the fraction of RAM for the KV cache.
    gpu_memory_utilization: float = 0.15
    tensor_parallel_size: int = 1
    # Engine replicas (Ray Data actors or Serve replicas).
    concurrency: int = 1
    batch_size: int = 64
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    # Custom resources each engine asks for (e.g. {rayalign_engine_node: 1} to pin engines to a
    # node type of the cluster); CPU and GPU are set above.
    resources: dict[str, float] = field(default_factory=dict)
    # More vLLM engine arguments, passed as they are (e.g. enforce_eager, chat_template,
    # max_num_seqs); they override those derived from the fields above.
    engine_args: dict[str, str | int | float | bool] = field(default_factory=dict)
    # Structured output (JSON schema) backend; guidance gave valid JSON every time on CPU here.
    structured_output_backend: Literal["auto", "guidance", "xgrammar", "outlines", "lm-format-enforcer"] = "guidance"

    def validate(self, key: str) -> None:
        _check(self.max_model_len >= 16, f"{key}.max_model_len", "must be at least 16")
        _check(
            0 < self.gpu_memory_utilization <= 1,
            f"{key}.gpu_memory_utilization",
            "must be in (0, 1]",
        )
        for name in ("tensor_parallel_size", "concurrency", "batch_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        _check(self.cpus_per_engine >= 0, f"{key}.cpus_per_engine", "must not be negative")
        _check(self.gpus_per_engine >= 0, f"{key}.gpus_per_engine", "must not be negative")
        for name, amount in self.resources.items():
            _check(name not in ("CPU", "GPU"), f"{key}.resources.{name}", "use cpus_per_engine or gpus_per_engine")
            _check(amount >= 0, f"{key}.resources.{name}", "must not be negative")


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = 0

    def validate(self, key: str) -> None:
        _check(self.temperature >= 0, f"{key}.temperature", "must not be negative")
        _check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        _check(self.max_tokens >= 1, f"{key}.max_tokens", "must be at least 1")
        _check(self.n >= 1, f"{key}.n", "must be at least 1")


@dataclass
class ReviserConfig:
    """Who writes y_w. `verifier` needs prompts with reference answers and no model."""

    backend: Literal["verifier", "vllm", "openai"] = "verifier"
    model: str | None = None
    base_url: str | None = None
    # The key itself is never stored in a config: only the variable's name.
    api_key_env: str = "OPENAI_API_KEY"
    # Ask for JSON-schema output (guided decoding on vLLM, response_format on an API).
    structured_output: bool = False
    # Cap each free string of the structured output (characters); for weak models.
    structured_max_chars: int | None = None
    max_concurrency: int = 8
    requests_per_second: float | None = None
    max_retries: int = 6
    timeout_s: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 1024
    # str.format templates replacing the built-in revision and judge prompts (see clair/revision.py).
    revision_template: str | None = None
    judge_template: str | None = None
    # Verifier: a regex whose group 1 is the final answer (default: the whole response).
    answer_pattern: str | None = None
    # For the dry run's cost estimate of a paid endpoint.
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, key: str) -> None:
        if self.backend in ("vllm", "openai"):
            _check(self.model is not None, f"{key}.model", f"is required for backend {self.backend!r}")
        if self.backend == "openai":
            _check(self.base_url is not None, f"{key}.base_url", "is required for backend 'openai'")
        _check(self.max_concurrency >= 1, f"{key}.max_concurrency", "must be at least 1")
        _check(self.structured_max_chars is None or self.structured_max_chars >= 1,
               f"{key}.structured_max_chars", "must be at least 1")
        _check(
            self.requests_per_second is None or self.requests_per_second > 0,
            f"{key}.requests_per_second",
            "must be positive",
        )
        _check(self.max_retries >= 0, f"{key}.max_retries", "must not be negative")
        _check(self.timeout_s > 0, f"{key}.timeout_s", "must be positive")
        _check(self.max_tokens >= 1, f"{key}.max_tokens", "must be at least 1")
        for name, fields in (("revision_template", ("prompt", "answer")),
                             ("judge_template", ("prompt", "answer_a", "answer_b"))):
            template = getattr(self, name)
            for f in fields:
                _check(template is None or "{" + f + "}" in template, f"{key}.{name}", f"must contain {{{f}}}")
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as exc:
                raise ConfigError(f"{key}.answer_pattern: not a valid regex ({exc})") from None
            _check(groups >= 1, f"{key}.answer_pattern", "needs a group around the final answer")
        self.engine.validate(f"{key}.engine")


@dataclass
class ClairConfig:
    prompts: str | None = None
    output: str | None = None
    mode: Literal["clair", "stronger_preferred", "onpolicy_judge", "offpolicy"] = "clair"
    target_model: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    reviser: ReviserConfig = field(default_factory=ReviserConfig)
    # Refused when set: the judge of the judged modes is the reviser (clair.reviser.backend).
    judge: str | None = None
    format: Literal["jsonl", "parquet"] = "jsonl"
    # A shard of pairs and rejects is committed when rows_per_shard finished units wait, or
    # commit_seconds after the last one, whichever comes first: a crash loses at most that window.
    rows_per_shard: int = 200
    commit_seconds: float = 60.0
    limit: int | None = None
    max_total_tokens: int | None = None

    def validate(self, key: str) -> None:
        self.sampling.validate(f"{key}.sampling")
        self.engine.validate(f"{key}.engine")
        self.reviser.validate(f"{key}.reviser")
        _check(self.rows_per_shard >= 1, f"{key}.rows_per_shard", "must be at least 1")
        _check(self.commit_seconds > 0, f"{key}.commit_seconds", "must be positive")
        _check(self.limit is None or self.limit >= 1, f"{key}.limit", "must be at least 1")
        _check(
            self.max_total_tokens is None or self.max_total_tokens >= 1,
            f"{key}.max_total_tokens",
            "must be at least 1",
        )
        _check(self.judge is None, f"{key}.judge",
               f"the judge is clair.reviser.backend (here {self.reviser.backend!r}: the verifier, or a model "
               "with backend vllm or openai); remove clair.judge and set clair.reviser")
        if self.mode == "onpolicy_judge":
            _check(self.sampling.n >= 2, f"{key}.sampling.n", "must be at least 2 for mode 'onpolicy_judge'")


@dataclass
class ReferenceConfig:
    """The frozen reference model's log-probs, computed once as a Ray Data pass."""

    model: str | None = None
    batch_size: int = 16
    concurrency: int = 1
    # Logical CPUs (and torch threads) per reference actor.
    cpus_per_actor: int = 1
    # Compute reference log-probs inside the training step instead of a separate pass.
    on_the_fly: bool = False
    # Cache of tokenized pairs and reference log-probs; default <run_dir>/reference.
    output: str | None = None
    # Who computes the log-probs: a transformers forward on Ray Data actors (batch_size,
    # concurrency, cpus_per_actor), or vLLM's prompt log-probs through ray.data.llm on `engine`,
    # checked on the first batch_size pairs against the transformers forward.
    backend: Literal["transformers", "vllm"] = "transformers"
    # backend vllm: its engine; the dtype follows train.precision, and max_model_len must exceed
    # train.max_length (a whole pair sequence is one prompt).
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=4096))
    # backend vllm: the most the two may differ on the first batch, in nats per completion token
    # (a sequence's summed difference over its length); default 1e-3 in fp32, 5e-2 in bf16.
    tolerance: float | None = None

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _check(self.concurrency >= 1, f"{key}.concurrency", "must be at least 1")
        _check(self.cpus_per_actor >= 1, f"{key}.cpus_per_actor", "must be at least 1")
        _check(self.tolerance is None or self.tolerance > 0, f"{key}.tolerance", "must be positive")
        if self.backend == "vllm":
            self.engine.validate(f"{key}.engine")
            _check(self.engine.dtype == "auto", f"{key}.engine.dtype",
                   "must be auto: the reference log-probs are computed in train.precision")
            _check(not self.on_the_fly, f"{key}.backend",
                   "vllm computes a pass before training; reference.on_the_fly computes inside each step")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, key: str) -> None:
        _check(self.r >= 1, f"{key}.r", "must be at least 1")
        _check(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)")


LOSS_NAMES = ("apo_zero", "apo_down", "dpo", "ipo", "hinge", "sft", "kto", "apo_zero_unpaired")


@dataclass
class TrainConfig:
    model: str | None = None
    pairs: str | None = None
    # Local directory for the final model, metrics and curves; default <run_dir>/train.
    output: str | None = None
    # Where Ray Train keeps checkpoints: a local directory or an s3:// / gs:// URI;
    # default <train.output>/ray.
    storage_path: str | None = None
    # A name from LOSS_NAMES, or "auto": measure whether the winners beat the policy's own
    # answers (judged by clair.reviser, the verifier by default) and pick apo_zero or apo_down.
    loss: str = "apo_zero"
    # Prompts sampled from the pair file for `loss: auto`.
    auto_sample: int = 200
    beta: float = 0.1
    loss_options: dict[str, float] = field(default_factory=dict)
    # An added supervised term: sft_weight x the chosen answer's mean per-token negative
    # log-likelihood, added to a preference loss (0 = none).
    sft_weight: float = 0.0
    # Average the log-probs (policy and reference) over each completion's tokens before the
    # preference loss, instead of summing them.
    length_normalize: bool = False
    learning_rate: float = 2e-7
    warmup_ratio: float = 0.1
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    epochs: int = 1
    # Pairs per optimizer step across all workers.
    batch_size: int = 64
    micro_batch_size: int = 8
    # Pack the sequences of many pairs into each micro-batch, without padding (position ids restart
    # and attention stays within each sequence), up to tokens_per_micro_batch tokens; a step's
    # pairs and its gradient are the same as unpacked. Default budget: what a padded micro-batch
    # can hold, 2 x micro_batch_size x max_length (its chosen and rejected rows).
    packing: bool = False
    tokens_per_micro_batch: int | None = None
    # With packing: a pair's chosen and rejected share their common beginning (the prompt and the
    # answers' tokens up to their first difference), computed once; default on. Same log-probs
    # and gradient within rounding, fewer tokens.
    share_prefix: bool | None = None
    # Each worker's peak FLOP/s for the mfu metric; default: measured once per worker at the start
    # (square matrix products in the compute precision, a practical peak).
    peak_flops: float | None = None
    num_workers: int = 2
    # Logical CPUs (and torch threads) per worker: on CPU-only machines give one worker all the
    # cores it should use; on GPU workers this is the data-loading share.
    cpus_per_worker: int = 1
    # How Ray places the workers: PACK (default), STRICT_PACK (one node, e.g. one 8-GPU box), SPREAD.
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_length: int = 1024
    max_prompt_length: int = 512
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    checkpoint_every: int = 50
    # Steps between reports to Ray Train (checkpoints always report).
    report_every: int = 10
    keep_checkpoints: int = 2
    max_failures: int = 2
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, key: str) -> None:
        _check(self.loss in LOSS_NAMES + ("auto",), f"{key}.loss",
               f"must be one of {', '.join(LOSS_NAMES)} or auto, not {self.loss!r}")
        _check(self.auto_sample >= 1, f"{key}.auto_sample", "must be at least 1")
        _check(self.beta > 0, f"{key}.beta", "must be positive")
        _check(self.sft_weight >= 0, f"{key}.sft_weight", "must not be negative")
        _check(self.loss != "sft" or (self.sft_weight == 0 and not self.length_normalize),
               f"{key}.sft_weight" if self.sft_weight else f"{key}.length_normalize",
               "applies to preference losses; loss sft is already a per-token supervised loss")
        _check(self.learning_rate > 0, f"{key}.learning_rate", "must be positive")
        _check(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio", "must be in [0, 1)")
        _check(self.epochs >= 1, f"{key}.epochs", "must be at least 1")
        _check(self.num_workers >= 1, f"{key}.num_workers", "must be at least 1")
        _check(self.cpus_per_worker >= 1, f"{key}.cpus_per_worker", "must be at least 1")
        _check(self.micro_batch_size >= 1, f"{key}.micro_batch_size", "must be at least 1")
        _check(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", f"must be 0, 1, 2 or 3, not {self.zero_stage}")
        per_step = self.micro_batch_size * self.num_workers
        _check(
            self.batch_size % per_step == 0,
            f"{key}.batch_size",
            f"({self.batch_size}) must be a multiple of micro_batch_size x num_workers ({per_step})",
        )
        _check(self.max_prompt_length < self.max_length, f"{key}.max_prompt_length", "must be below max_length")
        _check(self.tokens_per_micro_batch is None or self.packing, f"{key}.tokens_per_micro_batch",
               "applies only with train.packing: true")
        _check(self.share_prefix is None or self.packing, f"{key}.share_prefix", "applies only with train.packing: true")
        _check(self.tokens_per_micro_batch is None or self.tokens_per_micro_batch >= 2 * self.max_length,
               f"{key}.tokens_per_micro_batch", f"({self.tokens_per_micro_batch}) must hold the longest pair, "
               f"2 x max_length ({2 * self.max_length}) tokens")
        _check(self.peak_flops is None or self.peak_flops > 0, f"{key}.peak_flops", "must be positive")
        _check(not (self.packing and self.offload_optimizer), f"{key}.offload_optimizer",
               "is not supported with train.packing: DeepSpeed's offloaded gradient accumulation counts on a "
               "fixed number of micro-batches per step, which packing varies")
        _check(self.gradient_clipping >= 0, f"{key}.gradient_clipping", "must not be negative")
        _check(self.checkpoint_every >= 1, f"{key}.checkpoint_every", "must be at least 1")
        _check(self.report_every >= 1, f"{key}.report_every", "must be at least 1")
        _check(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be at least 1")
        _check(self.max_failures >= 0, f"{key}.max_failures", "must not be negative")
        _check(not self.offload_optimizer or self.zero_stage >= 1, f"{key}.offload_optimizer",
               "needs zero_stage 1, 2 or 3")
        self.lora.validate(f"{key}.lora")

    @property
    def gradient_accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def shares_prefix(self) -> bool:
        """Whether packed pairs compute their common beginning once (train.share_prefix)."""
        return self.packing and self.share_prefix is not False

    @property
    def token_budget(self) -> int:
        """The most tokens in a packed micro-batch (train.packing)."""
        return self.tokens_per_micro_batch or 2 * self.micro_batch_size * self.max_length


@dataclass
class ServeConfig:
    # Model name -> checkpoint directory (or hub name).
    models: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    # In `rayalign pipeline`: leave the deployment running after evaluation.
    keep: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    # The Serve application's name on the cluster (`rayalign serve status/shutdown` use it).
    app_name: str = "rayalign"
    # Logical CPUs reserved by each model replica's actor and by the HTTP ingress (several models
    # only: one model is its own ingress), on top of the engine's own bundle
    # (engine.cpus_per_engine); 0 lets them fit on a small machine.
    replica_cpus: float = 0.0
    ingress_cpus: float = 0.0
    # How long to wait for the application to run before giving up with Serve's reason.
    ready_timeout_s: float = 600.0
    # CPU engines on x86, when `rayalign serve` starts its own Ray: vLLM's model workers keep the
    # CPUs vLLM binds them to by default, and Ray's own processes run on the others. Off for
    # engines with several workers (tensor, pipeline or data parallel) and where
    # VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU or CPU_VISIBLE_MEMORY_NODES is set.
    isolate_engine_cores: bool = True
    # Where the Serve config file (for `serve deploy`, KubeRay) is written; default <run_dir>/serve.
    output: str | None = None

    def validate(self, key: str) -> None:
        _check(0 < self.port < 65536, f"{key}.port", "must be a TCP port number")
        _check(self.min_replicas >= 0, f"{key}.min_replicas", "must not be negative")
        _check(self.max_replicas >= max(1, self.min_replicas), f"{key}.max_replicas", "must be at least min_replicas and 1")
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.app_name) is not None, f"{key}.app_name",
               "may hold only letters, digits, '.', '_' and '-'")
        _check(self.replica_cpus >= 0, f"{key}.replica_cpus", "must not be negative")
        _check(self.ingress_cpus >= 0, f"{key}.ingress_cpus", "must not be negative")
        _check(self.ready_timeout_s > 0, f"{key}.ready_timeout_s", "must be positive")
        _check(self.api_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
               f"{key}.api_key_env", "must be the name of an environment variable, not the key itself")
        self.engine.validate(f"{key}.engine")


@dataclass
class EvalConfig:
    kind: Literal["exact", "choice", "judge"] = "exact"
    data: str | None = None
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = None
    models: list[str] = field(default_factory=list)
    judge_model: str | None = None
    judge_base_url: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    concurrency: int = 8
    max_retries: int = 4
    output: str | None = None
    # Seconds before one request is abandoned (and retried).
    timeout_s: float = 60.0
    # Evaluate only the first N examples of eval.data.
    limit: int | None = None
    # kind 'exact': a regex whose group 1 is the final answer (default: the whole response).
    answer_pattern: str | None = None
    # The judge's key variable; default eval.api_key_env (then serve.api_key_env) when the
    # judge is on the same endpoint, none otherwise.
    judge_api_key_env: str | None = None
    # Ask the judge for JSON-schema output (verdict as an enum); judge_max_chars caps its free
    # strings so that a weak judge closes its JSON within judge_max_tokens.
    judge_structured: bool = False
    judge_max_chars: int | None = None
    judge_max_tokens: int = 512

    def validate(self, key: str) -> None:
        _check(self.max_tokens >= 1, f"{key}.max_tokens", "must be at least 1")
        _check(self.concurrency >= 1, f"{key}.concurrency", "must be at least 1")
        _check(self.max_retries >= 0, f"{key}.max_retries", "must not be negative")
        _check(self.timeout_s > 0, f"{key}.timeout_s", "must be positive")
        _check(self.limit is None or self.limit >= 1, f"{key}.limit", "must be at least 1")
        _check(self.judge_max_chars is None or self.judge_max_chars >= 1, f"{key}.judge_max_chars",
               "must be at least 1")
        _check(self.judge_max_tokens >= 1, f"{key}.judge_max_tokens", "must be at least 1")
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as exc:
                raise ConfigError(f"{key}.answer_pattern: not a valid regex ({exc})") from None
            _check(groups >= 1, f"{key}.answer_pattern", "needs a group around the final answer")
        if self.kind == "judge":
            _check(self.judge_model is not None, f"{key}.judge_model", "is required for kind 'judge'")
            _check(len(self.models) == 2, f"{key}.models", "must name exactly two models for kind 'judge'")


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    # On-policy rounds of `rayalign pipeline`: clair and train again with the new policy.
    rounds: int = 1
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    clair: ClairConfig = field(default_factory=ClairConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, key: str = "") -> None:
        _check(self.rounds >= 1, "rounds", "must be at least 1")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        # vLLM scores a whole sequence as its prompt and generates one token after it.
        _check(self.reference.backend != "vllm" or self.reference.engine.max_model_len > self.train.max_length,
               "reference.engine.max_model_len", f"({self.reference.engine.max_model_len}) must exceed "
               f"train.max_length ({self.train.max_length}): vLLM scores a whole pair sequence as its prompt")
        if self.cluster.use_gpu:
            for key, engine in self.vllm_engines().items():
                _check(engine.gpus_per_engine > 0, f"{key}.gpus_per_engine",
                       "is 0, but cluster.use_gpu is true: vLLM's CUDA build cannot run an engine without a GPU "
                       "(set it to 1, or a fraction to share a GPU)")

    def vllm_engines(self) -> dict[str, EngineConfig]:
        """The vLLM engines this config starts, by key: the target's, the reviser's when it is a
        vLLM model, and the served models'."""
        engines = {"clair.engine": self.clair.engine, "serve.engine": self.serve.engine}
        if self.clair.reviser.backend == "vllm":
            engines["clair.reviser.engine"] = self.clair.reviser.engine
        if self.reference.backend == "vllm":
            engines["reference.engine"] = self.reference.engine
        return engines

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        _check(value in typing.get_args(tp), key, f"must be {_type_name(tp)}, not {value!r}")
        return value
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `2e-7` (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.beta=0.2` -> ("train.beta", 0.2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or defaults), apply overrides, check every value."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    config = _build(RunConfig, data, "")
    config.validate()
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
