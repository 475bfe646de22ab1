"""Every touch of `ray.data.llm` lives here: its API moves between Ray releases.

`chat_stage` builds a Ray Data processor that sends one chat request per row to vLLM engine
actors and adds the answer as columns. The same code runs on CPU (engines on CPU bundles) and
on GPU clusters (GPU bundles, tensor parallelism, several replicas): only `EngineConfig`'s
resources differ.
"""

from __future__ import annotations

import functools
import json
from typing import Callable

from rayalign.config import EngineConfig


def engine_dtype(engine: EngineConfig) -> str:
    """`engine.dtype`, with `auto` on a CPU engine resolved as `train.precision: auto` is:
    bfloat16 where the CPU computes it natively, float32 otherwise. vLLM's own `auto` runs a
    float32 checkpoint in bfloat16, which a CPU without native bf16 (AVX2 only) runs about 8x
    slower. On GPUs `auto` stays vLLM's choice."""
    if engine.dtype != "auto" or engine.gpus_per_engine:
        return engine.dtype
    return _cpu_dtype()


@functools.lru_cache(maxsize=1)
def _cpu_dtype() -> str:
    from rayalign.train.engine import cpu_has_bf16

    native = cpu_has_bf16()
    dtype = "bfloat16" if native else "float32"
    print(f"rayalign: engine dtype auto -> {dtype} on CPU (this CPU {'has' if native else 'has no'} native bf16)",
          flush=True)
    return dtype


def engine_kwargs(engine: EngineConfig) -> dict:
    kwargs = {
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        # Without the whitespace rule a weak model can pad JSON with spaces until max_tokens.
        "structured_outputs_config": {"backend": engine.structured_output_backend, "disable_any_whitespace": True},
    }
    if engine_dtype(engine) != "auto":
        kwargs["dtype"] = engine_dtype(engine)
    if engine.gpus_per_engine == 0:
        # vLLM's CPU sampler rejects per-request seeds under chunked prefill ("CPU Generator
        # does not use offset", which kills the engine); seeds make redone units reproducible.
        # Without chunking a batch must hold a whole prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(engine.max_model_len, 2048)
    return {**kwargs, **engine.engine_args}


def placement(engine: EngineConfig) -> dict:
    bundle = {"CPU": engine.cpus_per_engine, **engine.resources}
    if engine.gpus_per_engine:
        bundle["GPU"] = engine.gpus_per_engine
    return {"bundles": [bundle] * engine.tensor_parallel_size}


def processor_config(model: str, engine: EngineConfig):
    """What `ray.data.llm` receives for `engine`: vLLM's engine arguments, the placement of each
    replica, the number of replicas and rows per batch."""
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs, env = engine_kwargs(engine), {}
    if _one_cpu_worker(engine, kwargs):
        # The model runs in the engine core's process instead of a worker process of its own, as
        # vLLM runs one GPU: one process fewer to spawn and import vLLM into (about 13 s of each
        # engine start on 2 cores). vLLM's CPU platform replaces `uni`
        # with its process-per-worker executor unless V1 multiprocessing is off in the process
        # that builds the engine's config; the engine core still runs in a process of its own.
        kwargs["distributed_executor_backend"] = "uni"
        env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=kwargs,
        runtime_env=env or None,
        placement_group_config=placement(engine),
        concurrency=engine.concurrency,
        batch_size=engine.batch_size,
        # A row the engine cannot answer (a prompt longer than the context) becomes an error
        # column, so it can go to rejects instead of failing the whole run.
        should_continue_on_error=True,
        # `chat_stage` renders the chat template in its preprocess map, vLLM tokenizes the
        # prompt as the tokenize stage would (special tokens added), and `chat_stage` decodes the
        # answer in its own map: each of these three stages is one more pool of actors loading
        # the tokenizer at every run's start (about 5 s each of a tiny model's run on 2 cores).
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


def _one_cpu_worker(engine: EngineConfig, kwargs: dict) -> bool:
    """Whether a batch engine runs its model on one CPU worker, where vLLM's executor is left to
    rayalign (a user's `engine_args.distributed_executor_backend` is theirs)."""
    workers = int(kwargs.get("tensor_parallel_size", 1)) * int(kwargs.get("pipeline_parallel_size", 1))
    return not engine.gpus_per_engine and workers == 1 and "distributed_executor_backend" not in kwargs


def sampling_params(req: dict) -> dict:
    """vLLM's SamplingParams fields for one request of `chat_stage` (temperature, max_tokens, and
    top_p, seed and a JSON schema where the request has them)."""
    params = {"temperature": req["temperature"], "max_tokens": req["max_tokens"]}
    if req.get("top_p") is not None:
        params["top_p"] = float(req["top_p"])
    if req.get("seed") is not None:
        params["seed"] = int(req["seed"])
    if req.get("schema") is not None:
        params["structured_outputs"] = {"json": json.dumps(req["schema"])}
    return params


def chat_stage(model: str, engine: EngineConfig, request: Callable[[dict], dict],
               output_prefix: str):
    """A function from dataset to dataset: `request(row)` returns {"messages", "temperature", "max_tokens", "seed",
    "schema"} and optionally "top_p"; the output row is the input row plus `{prefix}_text`, `{prefix}_tokens` (the count),
    `{prefix}_token_ids` (the generated ids, eos included), `{prefix}_truncated` (hit max_tokens
    without eos) and `{prefix}_error` ('' when fine)."""
    from ray.data.llm import build_processor

    config = processor_config(model, engine)

    def preprocess(row: dict) -> dict:
        req = request(row)
        return {**row, "prompt": render(model, req["messages"]), "sampling_params": sampling_params(req),
                "_max_tokens": req["max_tokens"]}

    def finish(row: dict) -> dict:
        error = row.get("__inference_error__") or ""
        tokens = list(row.get("generated_tokens") or [])
        tokenizer = _tokenizer(model)
        truncated = (not error and len(tokens) >= row["_max_tokens"]
                     and (not tokens or tokens[-1] != tokenizer.eos_token_id))
        keep = {k: v for k, v in row.items() if k not in _ENGINE_COLUMNS}
        # The answer's own tokens decoded, special tokens skipped. vLLM's text is decoded after
        # the prompt's tokens instead, and so starts with a separator for a tokenizer that puts
        # one between words (the student's word-level tokenizer).
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""
        return {**keep, f"{output_prefix}_text": text,
                f"{output_prefix}_tokens": len(tokens), f"{output_prefix}_token_ids": [int(t) for t in tokens],
                f"{output_prefix}_truncated": bool(truncated),
                f"{output_prefix}_error": str(error)}

    # Rows the engine failed on skip the processor's postprocess (ray.data.llm returns them
    # as they are), so the outputs are built in a map that sees every row. Each of the two maps
    # runs as many tasks at a time as there are engines, as ray.data.llm's stages that they
    # replace ran actors: each task's process imports transformers and loads the tokenizer
    # once, and on 2 cores four of them at a time starved the engine's start.
    at_once = {"concurrency": engine.concurrency}
    processor = build_processor(config, preprocess=preprocess, postprocess=lambda row: row,
                                preprocess_map_kwargs=at_once, postprocess_map_kwargs=at_once)
    return lambda ds: processor(ds).map(finish, **at_once)


# One generated token; the prompt's own log-probs (the sampled token's only: 0 alternatives),
# from the raw logits (vLLM's default logprobs_mode), not detokenized.
SCORE_PARAMS = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}


def score_stage(model: str, engine: EngineConfig):
    """A function from dataset to dataset: each row's `token_ids` (a whole sequence) is sent to vLLM
    as its prompt; the output row is the input row less the ids, plus `logp`, the sum of the
    log-probs of the tokens from `start` on (the first token has none) given all before them
    (vLLM's prompt log-probs), and `error` ('' when fine)."""
    from ray.data.llm import build_processor

    config = processor_config(model, engine)

    def preprocess(row: dict) -> dict:
        return {**row, "tokenized_prompt": row["token_ids"], "sampling_params": dict(SCORE_PARAMS)}

    def finish(row: dict) -> dict:
        error = str(row.get("__inference_error__") or "")
        keep = {k: v for k, v in row.items() if k not in _ENGINE_COLUMNS and k != "token_ids"}
        logp = float("nan")
        if not error:
            ids, scores = list(row["prompt_token_ids"]), row["prompt_logprobs"]
            # The first token has no log-prob (nothing precedes it), as in the training forward.
            logp = sum(_logprob(scores[i], ids[i]) for i in range(max(int(row["start"]), 1), len(ids)))
        return {**keep, "logp": logp, "error": error}

    # As in chat_stage: the sums are taken in a map that sees every row, failed ones included.
    at_once = {"concurrency": engine.concurrency}
    processor = build_processor(config, preprocess=preprocess, postprocess=lambda row: row,
                                preprocess_map_kwargs=at_once, postprocess_map_kwargs=at_once)
    return lambda ds: processor(ds).map(finish, **at_once)


def _logprob(scores: dict, token: int) -> float:
    """One prompt position's log-prob of `token`: ray.data.llm gives a dict per position keyed by
    token id (string keys once it has passed through an Arrow block)."""
    entry = scores[token] if token in scores else scores[str(token)]
    return float(entry["logprob"])


def render(model: str, messages: list[dict]) -> str:
    """The prompt text for `messages` by the model's chat template, as ray.data.llm's chat template
    stage renders it: with the generation prompt after a user turn, continuing an assistant turn
    that ends the list."""
    ends_with_user = messages[-1]["role"] == "user"
    return _tokenizer(model).apply_chat_template(messages, tokenize=False, add_generation_prompt=ends_with_user,
                                                 continue_final_message=not ends_with_user)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    """The model's tokenizer, loaded once per process (Ray Data runs `finish` in pooled workers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


# Columns the processor adds for its own use (`prompt` is the rendered chat prompt, so callers
# must not name a column `prompt`); everything else is the caller's and is kept.
_ENGINE_COLUMNS = {
    "messages", "sampling_params", "_max_tokens", "generated_text", "generated_tokens",
    "num_generated_tokens", "num_input_tokens", "prompt_token_ids", "request_id", "batch_uuid",
    "time_taken_llm", "params", "metrics", "logprobs", "prompt_logprobs", "embeddings", "tokenized_prompt",
    "__inference_error__", "prompt",
}

