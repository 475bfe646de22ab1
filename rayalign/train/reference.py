"""Tokenized pairs and their reference log-probs, computed once and cached by fingerprint.

The pair file is tokenized on the driver (see `data.py` for the truncation policy); then a Ray
Data pass runs `ReferenceLogps`, a callable class holding the frozen reference model, over the
tokenized pairs and adds `ref_chosen_logps` and `ref_rejected_logps`. The result is one Parquet
file with the columns index, id, prompt_ids, chosen_ids, rejected_ids, truncated and the two
log-prob columns, so training workers hold only the policy.

The cache lives in `<reference.output>/<fingerprint>/` (default `<run_dir>/reference`): the
Parquet file, `rejects.jsonl` (skipped pairs with their reason) and `manifest.json`, written
last, so a directory without a manifest is an unfinished pass. The fingerprint covers the
reference model's files, the tokenizer's files, the pair data, max_length, max_prompt_length
and the compute precision, by content (`rayalign.stage.tree_digest`); any change yields a new
fingerprint and a fresh pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rayalign.config import EngineConfig, RunConfig
from rayalign.records import load_pairs, write_shard
from rayalign.stage import digest, finish, finished, tree_digest

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


@dataclass
class Prepared:
    path: Path          # the Parquet file of tokenized pairs
    manifest: dict
    reused: bool


class ReferenceLogps:
    """Ray Data stage: summed log-probs of chosen and rejected under the frozen reference model.

    Call it with a batch of columns (index, prompt_ids, chosen_ids, rejected_ids); it returns
    index, ref_chosen_logps and ref_rejected_logps (float32). With `packed_budget` (train.packing)
    it packs the batch's pairs, in order, into forwards of at most that many tokens, as the policy
    will be computed (sharing each pair's common beginning with `share_prefix`); `threads` is the
    torch threads of a CPU actor (its reference.cpus_per_actor)."""

    def __init__(self, model: str, precision: str, pad_id: int, device: str = "cpu",
                 packed_budget: int | None = None, threads: int | None = None, share_prefix: bool = False):
        import torch

        from rayalign.train.engine import load_model

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        # On the GPU Ray gave the actor (num_gpus=1 with cluster.use_gpu), not on its host.
        self.model = load_model(model, precision, trainable=False, packed=packed_budget is not None).to(device)
        self.pad_id, self.packed_budget, self.share_prefix = pad_id, packed_budget, share_prefix

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from rayalign.train.forward import pair_logps

        pairs = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                 for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])]
        chosen, rejected = [], []
        with torch.inference_mode():
            for part in self._parts(pairs):
                out = pair_logps(self.model, part, self.pad_id, packed=self.packed_budget is not None,
                                 share_prefix=self.share_prefix)
                chosen.append(out["chosen"].float().cpu())
                rejected.append(out["rejected"].float().cpu())
        return {"index": np.asarray(batch["index"]), "ref_chosen_logps": torch.cat(chosen).numpy(),
                "ref_rejected_logps": torch.cat(rejected).numpy()}

    def _parts(self, pairs: list[dict]) -> list[list[dict]]:
        """The whole batch padded; packed, consecutive runs of pairs within the token budget."""
        if self.packed_budget is None:
            return [pairs]
        from rayalign.train.data import pair_tokens

        parts, tokens = [[]], 0
        for pair in pairs:
            size = pair_tokens(pair, self.share_prefix)
            if parts[-1] and tokens + size > self.packed_budget:
                parts.append([])
                tokens = 0
            parts[-1].append(pair)
            tokens += size
        return parts


# ---- fingerprints ----------------------------------------------------------------------------

def fingerprint_inputs(config: RunConfig, precision: str, with_reference: bool) -> dict:
    train = config.train
    inputs = {
        "format": FORMAT_VERSION,
        "tokenizer": tree_digest(train.model, TOKENIZER_FILES),
        "data": tree_digest(train.pairs),
        "max_length": train.max_length,
        "max_prompt_length": train.max_prompt_length,
        "reference": None,
    }
    if with_reference:
        inputs["reference"] = {"model": tree_digest(reference_model(config)), "precision": precision}
        if config.reference.backend == "vllm":  # equal to the transformers forward within the tolerance
            inputs["reference"]["backend"] = "vllm"
            inputs["reference"]["engine_args"] = config.reference.engine.engine_args  # may change the numbers
        elif train.packing:  # computed as the policy will be: packed (equal to padded within fp32 rounding)
            inputs["reference"]["packed"] = "shared prefixes" if train.shares_prefix else True
    return inputs


def reference_model(config: RunConfig) -> str:
    return config.reference.model or config.train.model


def cache_root(config: RunConfig) -> Path:
    return Path(config.reference.output or Path(config.run_dir) / "reference").resolve()


# ---- the pass --------------------------------------------------------------------------------

def prepare_pairs(config: RunConfig, precision: str, with_reference: bool) -> Prepared:
    """Tokenized pairs (with reference log-probs when `with_reference`), from the cache when
    its fingerprint matches, else computed now. Ray must be initialised for the reference pass."""
    inputs = fingerprint_inputs(config, precision, with_reference)
    fingerprint = digest(inputs)
    out = cache_root(config) / fingerprint[:16]
    manifest = finished(out)
    if manifest is not None:
        manifest.setdefault("key", manifest.get("fingerprint"))  # a cache written before stage manifests
        check = manifest.get("check")  # backend vllm: measured when computed, on reference.batch_size pairs
        wanted = min(config.reference.batch_size, manifest.get("counts", {}).get("pairs", 0))
        if manifest["key"] == fingerprint and (not check or check["pairs"] >= wanted):
            if check:  # the tolerance may have changed since
                check_agreement(check, tolerance(config, precision), out)
            print(f"rayalign: reusing tokenized pairs{' and reference log-probs' * with_reference} from {out}")
            return Prepared(out / "pairs.parquet", manifest, reused=True)

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from rayalign.train.data import tokenize_pairs

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(config.train.model)
    report = tokenize_pairs(tokenizer, load_pairs(config.train.pairs), config.train.max_length,
                            config.train.max_prompt_length)
    columns = {key: [row[key] for row in report.rows]
               for key in ("index", "id", "prompt_ids", "chosen_ids", "rejected_ids", "truncated")}
    table = pa.table({
        **columns,
        **{k: pa.array(columns[k], pa.list_(pa.int32())) for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
        "index": pa.array(columns["index"], pa.int64()),
    })
    check = None
    if with_reference and len(table):
        if config.reference.backend == "vllm":
            logps, check = vllm_reference_pass(table, config, precision, pad_id(tokenizer))
        else:
            logps = reference_pass(table, config, precision, pad_id(tokenizer))
        table = table.append_column("ref_chosen_logps", pa.array(logps[0], pa.float32()))
        table = table.append_column("ref_rejected_logps", pa.array(logps[1], pa.float32()))

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(table, tmp / "pairs.parquet")
    rejects = [{"file": str(config.train.pairs), "id": s["id"], "reason": s["reason"],
                "raw": json.dumps(s["row"], ensure_ascii=False)} for s in report.skipped]
    write_shard(rejects, tmp / "rejects.jsonl")
    summary = {"inputs": inputs, "counts": report.counts(),
               "reference_model": reference_model(config) if with_reference else None,
               "seconds": round(time.perf_counter() - start, 3)}
    if check:
        summary["check"] = check
    manifest = finish(tmp, "reference", fingerprint, summary)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if check:  # kept either way: a run with a tolerance it meets reuses them
        check_agreement(check, check["tolerance"], out)
    counts = report.counts()
    print(f"rayalign: tokenized {counts['pairs']} pairs into {out} ({counts['prompts_truncated']} prompts and "
          f"{counts['completions_truncated']} completions truncated, {counts['skipped']} skipped into "
          f"{out / 'rejects.jsonl'})")
    return Prepared(out / "pairs.parquet", manifest, reused=False)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def reference_pass(table, config: RunConfig, precision: str, pad: int):
    """Ray Data map_batches of ReferenceLogps; returns (chosen, rejected) log-probs in row order."""
    import numpy as np
    import ray.data

    from rayalign.cluster import connect

    connect(config.cluster, config.run_dir)  # not Ray Data's own ray.init, which ignores cluster.*
    ref = config.reference
    ds = ray.data.from_arrow(table.select(["index", "prompt_ids", "chosen_ids", "rejected_ids"]))
    ds = ds.map_batches(
        ReferenceLogps,
        fn_constructor_kwargs={"model": reference_model(config), "precision": precision, "pad_id": pad,
                               "device": "cuda" if config.cluster.use_gpu else "cpu",
                               "packed_budget": config.train.token_budget if config.train.packing else None,
                               "threads": ref.cpus_per_actor, "share_prefix": config.train.shares_prefix},
        batch_size=ref.batch_size, compute=ray.data.ActorPoolStrategy(size=ref.concurrency), batch_format="numpy",
        num_cpus=ref.cpus_per_actor, num_gpus=1 if config.cluster.use_gpu else 0,
    )
    chosen = np.full(len(table), np.nan, dtype=np.float32)
    rejected = chosen.copy()
    for row in ds.iter_rows():
        chosen[row["index"]] = row["ref_chosen_logps"]
        rejected[row["index"]] = row["ref_rejected_logps"]
    if np.isnan(chosen).any() or np.isnan(rejected).any():
        raise RuntimeError("the reference pass returned fewer rows than it was given")
    return chosen, rejected


# ---- backend vllm ----------------------------------------------------------------------------

def tolerance(config: RunConfig, precision: str) -> float:
    """reference.tolerance, or its default for the precision, in nats per completion token."""
    if config.reference.tolerance is not None:
        return config.reference.tolerance
    return 1e-3 if precision == "fp32" else 5e-2


def reference_engine(config: RunConfig, precision: str) -> EngineConfig:
    """reference.engine in the compute precision (its dtype is `auto`, which follows train.precision)."""
    return dataclasses.replace(config.reference.engine, dtype={"fp32": "float32", "bf16": "bfloat16"}[precision])


def vllm_reference_pass(table, config: RunConfig, precision: str, pad: int):
    """(chosen, rejected) log-probs in row order from vLLM's prompt log-probs, each pair's two
    sequences scored as prompts by ray.data.llm on reference.engine, and the first-batch check:
    the first reference.batch_size pairs computed again by the transformers forward (the
    ReferenceLogps pass) and compared, refused above the tolerance. Returns ((chosen, rejected),
    the check's figures for the manifest)."""
    import numpy as np
    import ray.data

    from rayalign.cluster import connect
    from rayalign.llm import score_stage

    connect(config.cluster, config.run_dir)
    engine = reference_engine(config, precision)
    rows = [{"index": int(index), "side": side, "start": len(prompt), "token_ids": list(prompt) + list(completion)}
            for index, prompt, chosen, rejected in zip(*(table.column(k).to_pylist() for k in
                                                         ("index", "prompt_ids", "chosen_ids", "rejected_ids")))
            for side, completion in ((0, chosen), (1, rejected))]
    print(f"rayalign: reference log-probs of {len(table)} pairs from vLLM's prompt log-probs "
          f"(reference.backend vllm, {engine.dtype})", flush=True)
    started = time.perf_counter()
    logps = np.zeros((2, len(table)), dtype=np.float64)
    seen = np.zeros(logps.shape, dtype=bool)
    ids = table.column("id").to_pylist()
    for row in score_stage(reference_model(config), engine)(ray.data.from_items(rows)).iter_rows():
        side = ("chosen", "rejected")[row["side"]]
        if row["error"] or not np.isfinite(row["logp"]):
            raise RuntimeError(f"reference.backend vllm: the engine failed on pair {ids[row['index']]!r} ({side}): "
                               f"{row['error'] or 'its log-prob is ' + str(row['logp'])}")
        logps[row["side"], row["index"]] = row["logp"]
        seen[row["side"], row["index"]] = True
    if not seen.all():
        raise RuntimeError("the reference pass returned fewer rows than it was given")

    scored = time.perf_counter()
    first = table.slice(0, min(config.reference.batch_size, len(table)))
    expected = np.stack(reference_pass(first, config, precision, pad)).astype(np.float64)
    lengths = np.stack([[len(c) for c in first.column(k).to_pylist()] for k in ("chosen_ids", "rejected_ids")])
    check = agreement(logps[:, :len(first)], expected, lengths, first.column("id").to_pylist(),
                      tolerance(config, precision))
    check["vllm_seconds"] = round(scored - started, 1)
    check["check_seconds"] = round(time.perf_counter() - scored, 1)
    return (logps[0].astype(np.float32), logps[1].astype(np.float32)), check


def agreement(vllm, transformers, lengths, ids: list[str], tolerance: float) -> dict:
    """How far vLLM's summed log-probs are from the transformers forward's: arrays of shape
    (2, pairs), chosen then rejected; the largest difference per completion token, the sequence
    where it is, and the largest summed difference."""
    import numpy as np

    diff = np.abs(np.asarray(vllm, dtype=np.float64) - np.asarray(transformers, dtype=np.float64))
    per_token = diff / np.maximum(np.asarray(lengths), 1)
    # A non-finite difference (a log-prob of -inf on one side) is the worst there is.
    per_token = np.where(np.isfinite(per_token), per_token, np.inf)
    side, at = np.unravel_index(int(np.argmax(per_token)), per_token.shape)
    return {"pairs": len(ids), "max_per_token": float(per_token[side, at]), "worst_summed": float(diff[side, at]),
            "max_summed": float(np.nanmax(diff)), "worst": f"{ids[at]} ({('chosen', 'rejected')[side]})",
            "tolerance": tolerance}


def check_agreement(check: dict, tolerance: float, out: Path) -> None:
    """Stop above the tolerance (the log-probs stay in `out`); else say how close the two are."""
    if not check["max_per_token"] <= tolerance:
        raise RuntimeError(
            f"reference.backend vllm: on the first {check['pairs']} pairs vLLM's log-probs differ from the "
            f"transformers forward by up to {check['max_per_token']:.3g} nats per token (pair {check['worst']}: "
            f"{check['worst_summed']:.3g} summed), above reference.tolerance {tolerance:g}; raise "
            f"reference.tolerance (the log-probs are kept in {out} and will be reused) or use "
            f"reference.backend: transformers")
    print(f"rayalign: vLLM agrees with the transformers forward on the first {check['pairs']} pairs within "
          f"{check['max_per_token']:.2e} nats per token (reference.tolerance {tolerance:g})", flush=True)
