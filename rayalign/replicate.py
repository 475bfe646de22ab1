"""`rayalign replicate`: the paper's comparison at CPU scale, on the demo's task family.

For each student seed (a student as in the demo, taught addition until partly right):

1. three pair sets from the same training prompts and the same two samples per prompt, each
   built by `rayalign clair` on Ray Data and vLLM with the verifier:
   - `clair`: a wrong sample and its minimal correction (CLAIR);
   - `judge`: the sample closer to the reference answer against the other (on-policy judge);
   - `stronger`: a stronger model's own greedy answer against each sample (Stronger Preferred;
     the stronger model is the student taught further, to about 80%, answering greedily on vLLM:
     its answer is correct more often than the student's, but not always);
2. each set trained with each objective (APO-zero, APO-down, DPO, SFT on the winners) by
   `rayalign train` (reference pass, 2 Ray Train workers under DeepSpeed), same settings for all;
3. the base student and every trained policy of a set served side by side on Ray Serve and
   evaluated through the endpoint on the held-out prompts (greedy exact match).

Everything lands under one run directory (`seed-S/pairs/SET`, `seed-S/train/SET-LOSS`,
`seed-S/eval/SET`), and each step is skipped when its output is complete for the same inputs,
so a rerun (or a run interrupted and started again) only does what is missing. The steps run
on the pipeline's driver (rayalign.driver): `manifest.json` records each one's seconds as it
ends; a training cell that fails is recorded with its error (the traceback in `errors/`) and the
others go on. The tables (`replication.md`, `replication.json`) and plots (`accuracy.png`,
`contrast.png`) are written at the end.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import yaml

from rayalign.config import ConfigError, load_config
from rayalign.demo import STUDENT, demo_config, prepare_data

SETS = {"clair": "clair", "judge": "onpolicy_judge", "stronger": "stronger_preferred"}
SET_TITLES = {"clair": "CLAIR", "judge": "on-policy judge", "stronger": "stronger preferred"}
LOSSES = ("apo_zero", "apo_down", "dpo", "sft")
LOSS_TITLES = {"apo_zero": "APO-zero", "apo_down": "APO-down", "dpo": "DPO", "sft": "SFT on winners"}
# First student seed tried for each replicate; a student that stalls moves on to the next seed.
SEEDS = (0, 10, 20)


# The stronger model of Stronger Preferred: the student, taught further until about 80% right.
STRONGER = {"steps": 1500, "lr": 3e-4, "target_accuracy": 0.8}


def cell_config(run: Path, seed_dir: Path, student: Path, set_name: str, loss: str | None,
                overrides: dict) -> dict:
    raw = demo_config(seed_dir, student)
    raw["clair"].update(mode=SETS[set_name], output=str(seed_dir / "pairs" / set_name),
                        prompts=str(run / "data" / "train"))
    if set_name == "stronger":
        raw["clair"]["reviser"] = {"backend": "vllm", "model": str(seed_dir / "stronger"), "temperature": 0.0,
                                   "max_tokens": raw["clair"]["sampling"]["max_tokens"],
                                   "engine": raw["clair"]["engine"]}
    raw["reference"]["output"] = str(seed_dir / "reference")
    raw["train"].update(model=str(student), pairs=str(seed_dir / "pairs" / set_name / "pairs"),
                        output=str(seed_dir / "train" / f"{set_name}-{loss}"), loss=loss or "apo_zero")
    raw["eval"]["data"] = str(run / "data" / "eval")
    raw["eval"]["output"] = str(seed_dir / "eval" / set_name)
    _merge(raw, overrides)
    return raw


def load(raw: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


def run_replicate(run_dir: str | Path, seeds=SEEDS, sets=tuple(SETS), losses=LOSSES,
                  overrides: dict | None = None) -> dict:
    from rayalign.clair.pipeline import run_clair
    from rayalign.driver import Run
    from rayalign.pipeline import evaluation_config, serve_and_evaluate
    from rayalign.student import train_student
    from rayalign.train.run import run_train

    # Many small engines share this machine: keep each one's KV cache at 1 GiB (CPU memory).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    overrides = overrides or {}
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    driver = Run(run)
    driver.describe(seeds=list(seeds), sets=list(sets), losses=list(losses), overrides=overrides)
    started = time.perf_counter()
    data = prepare_data(run)
    cells: list[dict] = []
    seeds_info: list[dict] = []
    for seed in seeds:
        seed_dir = run / f"seed-{seed}"
        print(f"rayalign replicate: student seed {seed} (cached after the first run)", flush=True)
        student = driver.stage(f"seed-{seed}/student", lambda: train_student(
            seed_dir / "student", check_rows=data["check"], **{**STUDENT, "seed": seed}))
        info = json.loads((student / "manifest.json").read_text())
        seeds_info.append({"seed": seed, "student_seed": info["seed"], "student_check_accuracy": info["accuracy"]})
        if "stronger" in sets:
            print(f"rayalign replicate: seed {seed}: the stronger model (cached after the first run)", flush=True)
            stronger = driver.stage(f"seed-{seed}/stronger", lambda: train_student(
                seed_dir / "stronger", check_rows=data["check"], seed=info["seed"], start_from=student, **STRONGER))
            info = json.loads((stronger / "manifest.json").read_text())
            seeds_info[-1].update(stronger_seed=info["seed"], stronger_check_accuracy=info["accuracy"])
        for index, set_name in enumerate(sets):
            raw = cell_config(run, seed_dir, student, set_name, None, overrides)
            config = load(raw, seed_dir / "configs" / f"{set_name}.yaml")
            print(f"rayalign replicate: seed {seed}: {SET_TITLES[set_name]} pairs", flush=True)
            pairs = driver.stage(f"seed-{seed}/pairs/{set_name}", lambda: run_clair(config))
            models = {"base": str(student)} if index == 0 else {}
            for loss in losses:
                cell = {"seed": seed, "set": set_name, "loss": loss}
                cells.append(cell)
                raw = cell_config(run, seed_dir, student, set_name, loss, overrides)
                config = load(raw, seed_dir / "configs" / f"{set_name}-{loss}.yaml")
                # Training reuses a finished run with the same key (its config, pairs, reference and
                # model), so a rerun only trains the cells that are missing; a failed cell is
                # recorded with its error and the others go on.
                print(f"rayalign replicate: seed {seed}: {set_name} pairs with {loss}", flush=True)
                name = f"seed-{seed}/train/{set_name}-{loss}"
                summary = driver.stage(name, lambda: run_train(config), keep_going=True)
                if summary is None:
                    cell["error"] = driver.data["stages"][name]["error"]
                    continue
                cell["model"] = summary["final"]
                cell["train"] = {k: summary["final_metrics"].get(k) for k in
                                 ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies")}
                cell["steps"] = summary["steps"]
                models[f"{set_name}-{loss}"] = summary["final"]
            if len(models) > (1 if "base" in models else 0):
                print(f"rayalign replicate: seed {seed}: serving and evaluating {', '.join(models)}", flush=True)
                evaluated = driver.stage(f"seed-{seed}/eval/{set_name}",
                                         lambda: serve_and_evaluate(evaluation_config(config, models)))
                _collect(cells, seeds_info[-1], seed, set_name, evaluated)
            correct = winners_correct(Path(config.clair.output) / "pairs", data["train"])
            for c in cells:
                if c["seed"] == seed and c["set"] == set_name:
                    c.update(contrast=pairs["contrast"], pairs=pairs["pairs"], correct=correct)
    result = summarize(run, seeds_info, cells, sets, losses, time.perf_counter() - started)
    driver.finish(tables=str(run / "replication.md"), cells=len(cells),
                  failed=[f"{c['seed']}/{c['set']}-{c['loss']}" for c in cells if "error" in c])
    print(result["markdown"])
    print(f"rayalign replicate: done in {time.perf_counter() - started:.0f}s; tables in {run / 'replication.md'}")
    return result


def winners_correct(pairs_dir: Path, prompts: list[dict]) -> dict:
    """Shares of pairs whose chosen, and whose rejected, answer is right (by the verifier)."""
    from rayalign import records
    from rayalign.clair.verifier import is_correct
    from rayalign.train.data import completion_text

    references = {json.dumps(row["prompt"]): row["reference"] for row in prompts}
    pairs = records.load_pairs(pairs_dir)
    right = {side: sum(is_correct(completion_text(p[side]), references[json.dumps(p["prompt"])]) for p in pairs)
             for side in ("chosen", "rejected")}
    return {side: right[side] / len(pairs) if pairs else None for side in right}


def _collect(cells: list[dict], seed_info: dict, seed: int, set_name: str, evaluated: dict) -> None:
    results = evaluated["results"]
    if "base" in results:
        seed_info["base"] = results["base"]
    for c in cells:
        name = f"{c['set']}-{c['loss']}"
        if c["seed"] == seed and c["set"] == set_name and name in results:
            c["eval"] = results[name]


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval over seeds (None for one value)."""
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = t95.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def summarize(run: Path, seeds_info: list[dict], cells: list[dict], sets, losses, seconds: float) -> dict:
    base = {s["seed"]: s.get("base", {}).get("accuracy") for s in seeds_info}
    rows = []
    for set_name in sets:
        for loss in losses:
            mine = [c for c in cells if c["set"] == set_name and c["loss"] == loss]
            changes = [c["eval"]["accuracy"] - base[c["seed"]] for c in mine
                       if "eval" in c and c["eval"].get("accuracy") is not None and base.get(c["seed"]) is not None]
            mean, half = mean_interval(changes) if changes else (None, None)
            rows.append({"set": set_name, "loss": loss, "changes": changes, "mean_change": mean, "ci95": half,
                         "failed": [c["seed"] for c in mine if "error" in c or "eval" not in c]})
    contrast = []
    for set_name in sets:
        mine = {c["seed"]: c for c in cells if c["set"] == set_name and "contrast" in c}
        if mine:
            contrast.append({
                "set": set_name, "pairs": [c["pairs"] for c in mine.values()],
                "chosen_correct": statistics.fmean(c["correct"]["chosen"] for c in mine.values()),
                "rejected_correct": statistics.fmean(c["correct"]["rejected"] for c in mine.values()),
                "jaccard": statistics.fmean(c["contrast"]["jaccard"]["mean"] for c in mine.values()),
                "levenshtein": statistics.fmean(c["contrast"]["levenshtein"]["mean"] for c in mine.values())})
    result = {"seeds": seeds_info, "cells": cells, "comparison": rows, "contrast": contrast,
              "paired": paired_differences(cells, sets, losses), "seconds": round(seconds, 1)}
    result["markdown"] = markdown(result)
    (run / "replication.json").write_text(json.dumps({k: v for k, v in result.items() if k != "markdown"},
                                                     indent=2, default=str))
    (run / "replication.md").write_text(result["markdown"])
    plot(result, run)
    return result


def paired_differences(cells: list[dict], sets, losses) -> list[dict]:
    """Within-seed accuracy differences, which cancel each student's own level: CLAIR against
    each other pair set under the same objective, and each objective against APO-zero on the
    same pair set. Only seeds where both cells were evaluated count."""
    acc = {(c["seed"], c["set"], c["loss"]): c["eval"]["accuracy"] for c in cells
           if c.get("eval", {}).get("accuracy") is not None}
    comparisons = [(("clair", loss), (other, loss)) for loss in losses for other in sets
                   if "clair" in sets and other != "clair"]
    comparisons += [((set_name, loss), (set_name, "apo_zero")) for set_name in sets for loss in losses
                    if "apo_zero" in losses and loss != "apo_zero"]
    seeds = sorted({c["seed"] for c in cells})
    rows = []
    for a, b in comparisons:
        diffs = [acc[(s, *a)] - acc[(s, *b)] for s in seeds if (s, *a) in acc and (s, *b) in acc]
        if diffs:
            mean, half = mean_interval(diffs)
            rows.append({"a": list(a), "b": list(b), "diffs": diffs, "mean": mean, "ci95": half})
    return rows


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}"


def markdown(result: dict) -> str:
    lines = ["### Students", "",
             "| replicate | student seed | check accuracy | base accuracy (held out) | 95% CI | stronger model: seed, check accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in result["seeds"]:
        b = s.get("base", {})
        ci = b.get("ci95") or [None, None]
        stronger = (f"{s['stronger_seed']}, {s['stronger_check_accuracy']:.1%}" if "stronger_seed" in s else "n/a")
        lines.append(f"| {s['seed']} | {s['student_seed']} | {s['student_check_accuracy']:.1%} | "
                     + (f"{b['accuracy']:.1%} | {ci[0]:.1%} - {ci[1]:.1%} |" if b.get("accuracy") is not None
                        else "n/a | n/a |") + f" {stronger} |")
    lines += ["", "### Contrast of the pair sets (mean over pairs, averaged over seeds)", "",
              "| pair set | pairs per seed | token Jaccard (higher = more minimal) | character Levenshtein | "
              "chosen right | rejected right |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c in result["contrast"]:
        lines.append(f"| {SET_TITLES[c['set']]} | {', '.join(map(str, c['pairs']))} | {c['jaccard']:.3f} | "
                     f"{c['levenshtein']:.2f} | {c['chosen_correct']:.1%} | {c['rejected_correct']:.1%} |")
    lines += ["", "### Accuracy change over the base student (points; mean over seeds, 95% t-interval)", "",
              "| pair set | objective | mean change | 95% CI | per seed |", "| --- | --- | --- | --- | --- |"]
    for r in result["comparison"]:
        ci = "n/a" if r["ci95"] is None else f"{_pts(r['mean_change'] - r['ci95'])} to {_pts(r['mean_change'] + r['ci95'])}"
        per_seed = ", ".join(_pts(x) for x in r["changes"]) or "none"
        failed = f" (failed: seeds {r['failed']})" if r["failed"] else ""
        lines.append(f"| {SET_TITLES[r['set']]} | {LOSS_TITLES[r['loss']]} | {_pts(r['mean_change'])} | {ci} | "
                     f"{per_seed}{failed} |")
    if result.get("paired"):
        lines += ["", "### Paired differences within each seed (points; mean, 95% t-interval)", "",
                  "| comparison | mean difference | 95% CI | per seed |", "| --- | --- | --- | --- |"]
        name = lambda cell: f"{SET_TITLES[cell[0]]} {LOSS_TITLES[cell[1]]}"
        for d in result["paired"]:
            ci = "n/a" if d["ci95"] is None else f"{_pts(d['mean'] - d['ci95'])} to {_pts(d['mean'] + d['ci95'])}"
            lines.append(f"| {name(d['a'])} - {name(d['b'])} | {_pts(d['mean'])} | {ci} | "
                         f"{', '.join(_pts(x) for x in d['diffs'])} |")
    return "\n".join(lines) + "\n"


def _wrap(title: str) -> str:
    return title.replace(" ", "\n")  # "stronger preferred" under its bar, not across the next one


def plot(result: dict, run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["comparison"] if r["mean_change"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(12, 4.5))
        labels = [f"{_wrap(SET_TITLES[r['set']])}\n{LOSS_TITLES[r['loss']]}" for r in rows]
        means = [r["mean_change"] * 100 for r in rows]
        errors = [(r["ci95"] or 0) * 100 for r in rows]
        ax.bar(range(len(rows)), means, yerr=errors, capsize=3, color="#8fb3d9", edgecolor="black")
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["changes"]), [x * 100 for x in r["changes"]], color="black", s=10, zorder=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("accuracy change (points)")
        ax.set_title("Held-out accuracy change over the base student (bars: mean, 95% CI; dots: seeds)")
        fig.tight_layout()
        fig.savefig(run / "accuracy.png", dpi=100)
        plt.close(fig)
    if result["contrast"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        names = [_wrap(SET_TITLES[c["set"]]) for c in result["contrast"]]
        axes[0].bar(names, [c["jaccard"] for c in result["contrast"]], color="#9bd09b", edgecolor="black")
        axes[0].set_ylabel("token Jaccard (higher = more minimal)")
        axes[1].bar(names, [c["levenshtein"] for c in result["contrast"]], color="#e3a88f", edgecolor="black")
        axes[1].set_ylabel("character Levenshtein")
        fig.suptitle("Contrast of the pair sets (mean per pair, averaged over seeds)")
        fig.tight_layout()
        fig.savefig(run / "contrast.png", dpi=100)
        plt.close(fig)


def parse_overrides(items: list[str]) -> dict:
    """`section.key=value` items (train, reference, clair, eval; keys may be nested, as in
    clair.sampling.n=4) into nested updates."""
    overrides: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        path = key.split(".")
        if not sep or len(path) < 2 or path[0] not in ("train", "reference", "clair", "eval"):
            raise ConfigError(f"{item!r}: expected train.KEY=VALUE (or reference., clair., eval.)")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value)
    return overrides


def _merge(target: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value

