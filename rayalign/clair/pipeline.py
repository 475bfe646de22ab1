"""`rayalign clair`: prompts -> target answers (vLLM) -> revisions or judgements -> pairs.

The stream, on Ray Data:

    prompts -> units -> target model on vLLM (ray.data.llm) -> reject failed answers
            -> [onpolicy_judge: regroup the two samples of each prompt]
            -> reviser / judge (verifier, vLLM, or an OpenAI-compatible API)
            -> shard writer (pairs and rejects, atomically, exactly once)

Output under `clair.output` (default `<run_dir>/clair`): `pairs/`, `rejects/`,
`invalid_prompts.jsonl` (prompt rows that failed validation), `contrast.png`, `stage.json` (the
settings that shaped the pairs), `prompts.json` (a digest of each prompt) and, written last,
`manifest.json` (the run's counts, throughput and contrast statistics, rayalign.stage.finish).
A rerun into the same output sends only the units not done yet; one with other settings, or with
a changed prompt under an id whose pairs are done, is refused, naming the keys or the id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

from rayalign import records
from rayalign.clair import stages
from rayalign.clair.contrast import describe
from rayalign.clair.outcomes import REASONS, ShardWriter, commit_stream, completed_ids, make_units
from rayalign.clair.revision import judge_request, revision_request
from rayalign.config import ConfigError, RunConfig
from rayalign.stage import finish, fingerprint, flatten, guard


def output_dir(config: RunConfig) -> Path:
    return Path(config.clair.output or Path(config.run_dir) / "clair")


def check_inputs(config: RunConfig) -> None:
    c = config.clair
    if c.prompts is None:
        raise ConfigError("clair.prompts: is required (a JSONL or Parquet prompt file, or a directory of shards)")
    if not Path(c.prompts).exists():
        raise ConfigError(f"clair.prompts: {c.prompts} does not exist")
    if c.mode == "offpolicy":
        return
    if c.target_model is None:
        raise ConfigError("clair.target_model: is required for mode " + repr(c.mode))
    if c.reviser.backend == "openai":
        from rayalign.clair.endpoint import RequestFailed, api_key

        try:
            api_key(c.reviser.api_key_env)
        except RequestFailed as exc:
            raise ConfigError(f"clair.reviser.api_key_env: {exc}") from None


def reviser_fields(reviser) -> dict:
    """The clair.reviser fields that shape what it writes or judges: not its throughput, budget,
    retry, endpoint, price or engine resource settings."""
    return {k: v for k, v in dataclasses.asdict(reviser).items()
            if k not in ("max_concurrency", "requests_per_second", "max_retries", "timeout_s", "base_url",
                         "api_key_env", "price_per_million_input_tokens", "price_per_million_output_tokens", "engine")}


def shaping_fields(config: RunConfig) -> dict:
    """The clair keys that shape the pairs, as dotted keys: what a rerun into the same output must
    keep. Throughput, budget, retry, endpoint and price settings may change between runs."""
    c = config.clair
    shaping = {"prompts": c.prompts, "mode": c.mode, "target_model": c.target_model,
               "sampling": dataclasses.asdict(c.sampling), "format": c.format, "reviser": reviser_fields(c.reviser),
               "engine": {"dtype": c.engine.dtype, "max_model_len": c.engine.max_model_len}}
    return flatten("clair", shaping)


def guard_prompts(out: Path, units: list[dict], done_prompts: set[str], write: bool) -> None:
    """A prompt id keeps its prompt within one output: new ids may be added to the prompt file
    (only their units are sent), but a prompt whose units are done may not change under its id."""
    path = out / "prompts.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    current = {u["prompt_id"]: fingerprint(u["prompt_json"], u["reference"]) for u in units}
    changed = sorted(i for i in done_prompts if saved.get(i, current[i]) != current[i])
    if changed:
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:6])}{', ...' if len(changed) > 6 else ''})"
        raise ConfigError(f"clair.prompts: the prompt or reference under id {changed[0]!r}"
                          f"{more if len(changed) > 1 else ''} differs from the one its pairs in {out} were "
                          f"made from; give a changed prompt a new id, or use a new run_dir (or clair.output)")
    if write:
        path.write_text(json.dumps({**saved, **current}, sort_keys=True))


def run_clair(config: RunConfig, limit: int | None = None, dry_run: bool = False) -> dict:
    from rayalign.cluster import check_shared_paths

    check_inputs(config)
    check_shared_paths(config)
    c = config.clair
    out = output_dir(config)
    guard(out, shaping_fields(config), write=not dry_run, legacy="clair_config.json")
    out.mkdir(parents=True, exist_ok=True)
    if c.mode == "offpolicy":
        return import_offpolicy(config, out)

    # Processing stages quarantine bad prompt rows rather than stopping.
    invalid = out / "invalid_prompts.jsonl"
    invalid.unlink(missing_ok=True)
    prompts = records.load_prompts(c.prompts, quarantine=invalid)
    judged = c.mode == "onpolicy_judge"
    samples = 2 if judged else c.sampling.n
    units = make_units(prompts, samples, c.sampling.seed if c.sampling.seed is not None else config.seed)
    done = completed_ids(out)
    # The unit of output is one pair attempt; in judge mode that is a prompt (two samples).
    outcome_id = (lambda u: u["prompt_id"]) if judged else (lambda u: u["unit_id"])
    guard_prompts(out, units, {u["prompt_id"] for u in units if outcome_id(u) in done}, write=not dry_run)
    pending = [u for u in units if outcome_id(u) not in done]
    limit = c.limit if limit is None else limit  # --limit overrides clair.limit
    if limit is not None:
        keep = set(list(dict.fromkeys(outcome_id(u) for u in pending))[:limit])
        pending = [u for u in pending if outcome_id(u) in keep]
    todo = len({outcome_id(u) for u in pending})
    print(f"rayalign clair: {len(prompts)} prompts, {len({outcome_id(u) for u in units})} units, "
          f"{len(done)} already done, {todo} to do"
          + (f"; {sum(1 for _ in open(invalid))} invalid prompt rows in {invalid}" if invalid.exists() else ""))
    if dry_run:
        return estimate(config, pending)

    started = time.perf_counter()
    counts = []
    if pending:
        counts = stream(config, pending, todo, out)
    elapsed = time.perf_counter() - started
    summary = summarize(config, out, counts, elapsed)
    print_summary(summary)
    return summary


def stream(config: RunConfig, pending: list[dict], total: int, out: Path) -> list[dict]:
    """Run the pending units (`total` outcomes) through generation and revision; this process
    writes the shards as rows arrive (clair.rows_per_shard, clair.commit_seconds) and returns
    their counts."""
    from rayalign.cluster import connect
    from rayalign.llm import chat_stage

    c = config.clair
    ray = connect(config.cluster, config.run_dir)
    ds = ray.data.from_items(pending)
    generate = chat_stage(c.target_model, c.engine, stages.target_request(c.sampling), "answer")
    ds = generate(ds).map(stages.answer_outcome)
    if c.mode == "onpolicy_judge":
        ds = ds.groupby("prompt_id").map_groups(_two_samples)
    ds = revise(config, ds)
    writer = ShardWriter(str(out), c.format, source=c.mode, reviser=reviser_name(config))
    batches = _progress(ds.iter_batches(batch_size=None, batch_format="default"), total)
    return commit_stream(batches, writer, c.rows_per_shard, c.commit_seconds)


def _progress(batches, total: int, every: float = 30.0):
    """The batches as they come, with a console line every `every` seconds: units done and rate."""
    done, started = 0, time.monotonic()
    last = started
    for batch in batches:
        done += len(next(iter(batch.values()), []))
        now = time.monotonic()
        if now - last >= every and done < total:
            print(f"rayalign clair: {done}/{total} units done ({done / (now - started):.1f} a second)", flush=True)
            last = now
        yield batch


def revise(config: RunConfig, ds):
    c, r = config.clair, config.clair.reviser
    pattern = r.answer_pattern
    if r.backend == "verifier":
        row_fn = {"clair": functools.partial(stages.verifier_revise, pattern=pattern),
                  "stronger_preferred": stages.verifier_stronger,
                  "onpolicy_judge": functools.partial(stages.verifier_judge, pattern=pattern)}[c.mode]
        return ds.map(row_fn)
    if c.mode == "onpolicy_judge":
        ds = ds.flat_map(lambda row: [{**row, "order": 0}, {**row, "order": 1}])
        ds = ask(config, ds, stages.judge_request(r))
        combine = functools.partial(_judged, structured=r.structured_output)
        return ds.groupby("prompt_id").map_groups(combine)
    if c.mode == "stronger_preferred":
        return ask(config, ds, stages.stronger_request(r)).map(stages.stronger_outcome)
    return ask(config, ds, stages.revision_request(r)).map(
        functools.partial(stages.revision_outcome, structured=r.structured_output))


def ask(config: RunConfig, ds, request):
    """Send each row's request to the reviser backend; the reply lands in `reply_*` columns."""
    r = config.clair.reviser
    if r.backend == "vllm":
        from rayalign.llm import chat_stage

        ds = chat_stage(r.model, r.engine, request, "reply")(ds)
        return ds.map(lambda row: {**row, "reviser_tokens": row["reply_tokens"]})
    import ray

    budget = None
    if config.clair.max_total_tokens is not None:
        budget = ray.remote(stages.TokenBudget).options(num_cpus=0).remote(config.clair.max_total_tokens)
    return ds.map_batches(
        stages.OpenAIStage, fn_constructor_kwargs={"reviser": r, "request": request, "budget": budget},
        concurrency=1, batch_size=max(r.max_concurrency * 4, 16), num_cpus=0.5, batch_format="default",
    )


def _rows(batch: dict) -> list[dict]:
    columns = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _columns(rows: list[dict]) -> dict:
    return {key: [row[key] for row in rows] for key in rows[0]}


def _two_samples(batch: dict) -> dict:
    """One prompt's two samples -> one row with `answer` and `answer_b` (judge mode)."""
    rows = sorted(_rows(batch), key=lambda r: r["sample"])
    first, second = rows
    failed = first if first["outcome"] else second
    row = {**first, "unit_id": first["prompt_id"], "answer_b": second["answer"],
           "answer_b_token_ids": second["answer_token_ids"],
           "answer_tokens": first["answer_tokens"] + second["answer_tokens"]}
    if failed["outcome"]:
        row.update(outcome=failed["outcome"], detail=f"sample {failed['sample']}: {failed['detail']}")
    return _columns([row])


def _judged(batch: dict, structured: bool) -> dict:
    rows = sorted(_rows(batch), key=lambda r: r["order"])
    row = stages.judge_outcome(rows[0], rows[1], structured)
    row["reviser_tokens"] = rows[0]["reviser_tokens"] + rows[1]["reviser_tokens"]
    return _columns([row])


def reviser_name(config: RunConfig) -> str:
    r = config.clair.reviser
    return "verifier" if r.backend == "verifier" else f"{r.backend}:{r.model}"


def import_offpolicy(config: RunConfig, out: Path) -> dict:
    """Mode `offpolicy`: existing judged pairs, imported as they are (with contrast statistics)."""
    from rayalign.clair.contrast import contrast
    from rayalign.importers import import_pairs
    from rayalign.train.data import completion_text

    if (out / "pairs").exists() and any((out / "pairs").iterdir()):
        print(f"rayalign clair: {out / 'pairs'} already holds the imported pairs")
    else:
        staging = out / "imported"
        import_pairs(config.clair.prompts, staging, fmt=config.clair.format, quarantine=out / "rejects.jsonl")
        rows = records.load_pairs(staging)
        for row in rows:
            row.update(contrast(completion_text(row["chosen"]), completion_text(row["rejected"])))
        records.write_rows(rows, out / "pairs", config.clair.format, config.clair.rows_per_shard)
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    summary = summarize(config, out, [], 0.0)
    print_summary(summary)
    return summary


def estimate(config: RunConfig, pending: list[dict]) -> dict:
    """Dry run: an upper bound of the tokens the run would send, and its cost, without sending."""
    c, r = config.clair, config.clair.reviser
    answer_stub = "x" * (4 * c.sampling.max_tokens)  # the longest answer the target may give
    per_unit_in = 0
    for unit in pending:
        prompt = json.loads(unit["prompt_json"])
        if c.mode == "onpolicy_judge":
            text = judge_request(prompt, answer_stub, answer_stub, r.judge_template, r.structured_output)
        else:
            text = revision_request(prompt, answer_stub, r.revision_template, r.structured_output)
        per_unit_in += len(text) // 4 + 1
    # One request per unit; in judge mode a prompt has two units (samples) and two orders.
    requests = len(pending)
    input_tokens = per_unit_in
    output_tokens = requests * r.max_tokens
    remote = r.backend == "openai"
    cost = (input_tokens * r.price_per_million_input_tokens + output_tokens * r.price_per_million_output_tokens) / 1e6
    result = {"dry_run": True, "units": len(pending), "reviser_requests": requests if r.backend != "verifier" else 0,
              "target_generated_tokens_max": len(pending) * c.sampling.max_tokens,
              "reviser_input_tokens_max": input_tokens if r.backend != "verifier" else 0,
              "reviser_output_tokens_max": output_tokens if r.backend != "verifier" else 0,
              "estimated_cost": round(cost, 4) if remote else 0.0}
    print("rayalign clair --dry-run: nothing was sent")
    for key, value in result.items():
        if key != "dry_run":
            print(f"  {key:<30} {value}")
    return result


def summarize(config: RunConfig, out: Path, counts: list[dict], elapsed: float) -> dict:
    """Counts by outcome over everything written so far, this run's throughput, contrast stats."""
    pairs = [r.value for r in records.read_records(out / "pairs")] if (out / "pairs").exists() else []
    rejects = [r.value for r in records.read_records(out / "rejects")] if (out / "rejects").exists() else []
    by_reason = {reason: 0 for reason in REASONS}
    for row in rejects:
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    this_run = {key: sum(c[key] for c in counts) for key in
                ("pairs", "rejects", "deferred", "generated_tokens", "reviser_tokens")}
    jaccards = [p["jaccard"] for p in pairs if p.get("jaccard") is not None]
    distances = [p["levenshtein"] for p in pairs if p.get("levenshtein") is not None]
    summary = {
        "mode": config.clair.mode, "reviser": reviser_name(config) if config.clair.mode != "offpolicy" else "import",
        "pairs": len(pairs), "rejects": len(rejects), "rejects_by_reason": by_reason,
        "this_run": {**this_run, "seconds": round(elapsed, 2),
                     "generated_tokens_per_s": round(this_run["generated_tokens"] / elapsed, 1) if elapsed else None},
        "contrast": {"jaccard": describe(jaccards, lo=0.0, hi=1.0), "levenshtein": describe(distances)},
    }
    plot_contrast(summary, out / "contrast.png")
    finish(out, "clair", fingerprint(shaping_fields(config)), summary)  # last
    return summary


def plot_contrast(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "jaccard", "token Jaccard (higher = more minimal)"),
                           (axes[1], "levenshtein", "character Levenshtein (lower = more minimal)")):
        hist = summary["contrast"][key]["histogram"]
        if hist["counts"]:
            edges = hist["edges"]
            ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
                   edgecolor="black")
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
    fig.suptitle(f"{summary['mode']} pairs ({summary['pairs']}), reviser {summary['reviser']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(summary: dict) -> None:
    run = summary["this_run"]
    print(f"rayalign clair: {summary['pairs']} pairs, {summary['rejects']} rejects "
          f"({', '.join(f'{k} {v}' for k, v in summary['rejects_by_reason'].items() if v) or 'none'})")
    if run["seconds"]:
        print(f"  this run: {run['pairs']} pairs, {run['rejects']} rejects in {run['seconds']:.1f}s, "
              f"{run['generated_tokens']} tokens generated ({run['generated_tokens_per_s']} tokens/s)")
    if run["deferred"]:
        print(f"  {run['deferred']} units deferred by the token budget (clair.max_total_tokens): run again to continue")
    j = summary["contrast"]["jaccard"]
    if j["count"]:
        lev = summary["contrast"]["levenshtein"]
        print(f"  contrast: token Jaccard mean {j['mean']:.3f} (median {j['median']:.3f}), "
              f"Levenshtein mean {lev['mean']:.1f} (median {lev['median']:.1f})")
