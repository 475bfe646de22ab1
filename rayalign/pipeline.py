"""`rayalign pipeline`: clair -> reference -> train -> serve -> eval, under one run directory.

Each stage is skipped when its output is already complete for the same inputs and config:
CLAIR resumes unit by unit, the reference pass is cached by fingerprint, training resumes
from its newest checkpoint (a finished run is not retrained and its model is left as it is), and evaluation results are kept
under a fingerprint of what was evaluated. A resubmitted job therefore continues instead of
starting over. `rounds: N` repeats clair and train with the newly trained policy as the next
round's target and reference (on-policy rounds), each round in `round-K/`.

The run directory holds `manifest.json` (rayalign.driver, the driver `demo` and `replicate` use
too): the resolved config, package versions, seeds, the project's git commit, and per-stage
timings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rayalign.config import ConfigError, RunConfig
from rayalign.driver import Run
from rayalign.stage import finished, fingerprint, summary_of, tree_digest


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


def check_pipeline(config: RunConfig) -> None:
    """Every stage's own check, before the first stage starts: a bad training key or evaluation
    row fails now, not after CLAIR has run."""
    from rayalign.clair.pipeline import check_inputs
    from rayalign.evaluate import check_data
    from rayalign.train.run import check_keys

    if not config.clair.target_model:
        raise ConfigError("clair.target_model: is required (the model to align)")
    if config.eval.data is None:
        raise ConfigError("eval.data: is required (held-out prompts with reference answers)")
    first = round_config(config, 1, config.clair.target_model)
    check_inputs(first)
    check_keys(first)
    check_data(config)


def run_pipeline(config: RunConfig, run: Run | None = None) -> dict:
    """The stages under `config.run_dir`, recorded in `run` (the demo passes its own, which
    holds its earlier stages); returns the manifest."""
    from rayalign.clair.pipeline import run_clair
    from rayalign.cluster import check_shared_paths
    from rayalign.train.run import run_reference, run_train

    check_pipeline(config)
    check_shared_paths(config)
    run = run or Run(config.run_dir)
    run.describe(config)
    base = config.clair.target_model
    policy = base
    for k in range(1, config.rounds + 1):
        cfg = round_config(config, k, policy)
        tag = f"round-{k}/" if config.rounds > 1 else ""
        clair = run.stage(f"{tag}clair", lambda: run_clair(cfg))
        if clair["pairs"] == 0:
            raise ConfigError(f"clair: round {k} produced no pairs ({clair['rejects']} rejects, by reason "
                              f"{clair['rejects_by_reason']}); nothing to train on")
        run.stage(f"{tag}reference", lambda: {"path": str(run_reference(cfg))})
        trained = run.stage(f"{tag}train", lambda: run_train(cfg))
        policy = trained["final"]

    models = {"base": base, "aligned": policy}
    evaluated = evaluation_config(config, models)
    results = run.stage("serve+eval", lambda: serve_and_evaluate(evaluated))
    return run.finish(models=models, eval=results.get("summary", results))


def serve_and_evaluate(config: RunConfig) -> dict:
    """Serve the models, evaluate them through the endpoint, shut the deployment down (unless
    serve.keep); results are reused when the same models were already evaluated the same way."""
    from rayalign.cluster import connect
    from rayalign.evaluate import run_eval
    from rayalign.serve import serve_models, serve_shutdown

    out = Path(config.eval.output)
    key = fingerprint(dataclasses.asdict(config.eval), {name: tree_digest(path)
                                                        for name, path in config.serve.models.items()})
    done = finished(out, key)
    if done:
        print(f"rayalign pipeline: evaluation of {', '.join(config.serve.models)} is up to date in {out}")
        return summary_of(done)
    # The deployment lives as long as this process's Ray: start or join it here, since every
    # earlier stage may have been cached and never needed Ray.
    connect(config.cluster, config.run_dir)
    serve_models(config, config.serve.models, detach=True)
    try:
        return run_eval(config, key)
    finally:
        if not config.serve.keep:
            serve_shutdown(config)
