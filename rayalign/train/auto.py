"""`train.loss: auto`: choose APO-zero or APO-down from a measurement, as the APO paper advises.

APO-zero pushes the winners' likelihood up and the losers' down; it suits pairs whose winners
are better than the model being trained. APO-down pushes both down, the winners less; it suits
pairs whose winners are worse than the model. Which case holds is measured before training:

1. up to `train.auto_sample` distinct prompts are drawn from the pair file (seeded);
2. the policy (`train.model`) answers each greedily on vLLM through Ray Data, with
   `clair.engine` and `clair.sampling.max_tokens`;
3. the configured judge (`clair.reviser`: the verifier, which needs the reference answers of
   `clair.prompts`, or a vLLM or OpenAI-compatible judge, asked in both orders) compares the
   policy's answer with the pair's chosen answer: the CLAIR stage's own on-policy judging path;
4. winners better (more wins for the chosen answers than for the policy's) -> `apo_zero`;
   policy better -> `apo_down`; no decisive comparison -> `apo_zero`, the paper's default.

The evidence and the choice go to `<train.output>/loss_choice.json` and the terminal. The file
is reused while the model, its engine and max_tokens, the pair file (by content), the judge
(the `clair.reviser` fields that shape a verdict), the token budget and the sample size stay the same, so a resumed run keeps its choice. The policy's answers go to
`<train.output>/policy_answers.json` and are reused while the model, its engine and max_tokens
stay the same: a choice for other pairs or another judge sends only new prompts to vLLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

from rayalign.config import ConfigError, RunConfig
from rayalign.stage import tree_digest

CHOICE_FILE = "loss_choice.json"
ANSWERS_FILE = "policy_answers.json"


def decide(chosen_wins: int, policy_wins: int) -> tuple[str, str]:
    """The loss and the one-line reason, from the judged comparisons."""
    if chosen_wins > policy_wins:
        return "apo_zero", f"the chosen answers beat the policy's own answers ({chosen_wins} to {policy_wins})"
    if policy_wins > chosen_wins:
        return "apo_down", f"the policy's own answers beat the chosen answers ({policy_wins} to {chosen_wins})"
    return "apo_zero", (f"no decisive difference ({chosen_wins} to {policy_wins}); "
                        "apo_zero is the default")


def resolve_loss(config: RunConfig) -> RunConfig:
    """The config with `train.loss: auto` replaced by the measured choice (others unchanged)."""
    if config.train.loss != "auto":
        return config
    evidence = choose_loss(config)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, loss=evidence["choice"]))


def choose_loss(config: RunConfig) -> dict:
    from rayalign import records
    from rayalign.train.data import completion_text

    train, clair = config.train, config.clair
    reviser = clair.reviser
    pairs = records.load_pairs(train.pairs)
    by_prompt: dict[str, dict] = {}
    for pair in pairs:
        by_prompt.setdefault(_key(pair["prompt"]), pair)
    keys = sorted(by_prompt)
    random.Random(train.seed).shuffle(keys)
    keys = keys[:train.auto_sample]

    references: dict[str, str] = {}
    if reviser.backend == "verifier":
        if not clair.prompts or not Path(clair.prompts).exists():
            raise ConfigError("train.loss: auto judges with the verifier (clair.reviser.backend), which needs "
                              "clair.prompts: a prompt file with reference answers for the pairs' prompts")
        for row in records.load_prompts(clair.prompts):
            if row.get("reference"):
                references[_key(row["prompt"])] = row["reference"]

    judge = reviser.backend if reviser.backend == "verifier" else f"{reviser.backend}:{reviser.model}"
    policy = answer_inputs(config)  # the model's digest is read once, for both files
    inputs = choice_inputs(config, policy, references)
    path = Path(train.output) / CHOICE_FILE
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("inputs") == inputs:
            print(f"rayalign train: loss auto -> {cached['choice']} ({cached['reason']}; from {path})")
            return cached

    units = []
    unscored = {"no_reference": 0}
    for n, key in enumerate(keys):
        pair = by_prompt[key]
        reference = references.get(key, "")
        if reviser.backend == "verifier" and not reference:
            unscored["no_reference"] += 1
            continue
        units.append({"unit_id": f"auto-{n}", "prompt_id": f"auto-{n}", "prompt_json": json.dumps(pair["prompt"]),
                      "reference": reference, "sample": 0, "seed": train.seed + n,
                      "winner": completion_text(pair["chosen"])})
    tally = {"chosen": 0, "policy": 0, "tie": 0}
    if units:
        for row in _judged_rows(config, units, policy):
            verdict = _verdict(row)
            if verdict in tally:
                tally[verdict] += 1
            else:
                unscored[verdict] = unscored.get(verdict, 0) + 1
    choice, reason = decide(tally["chosen"], tally["policy"])
    evidence = {"choice": choice, "reason": reason, "prompts": len(keys), "chosen_wins": tally["chosen"],
                "policy_wins": tally["policy"], "ties": tally["tie"],
                "unscored": {k: v for k, v in unscored.items() if v}, "judge": judge, "inputs": inputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evidence, indent=2))
    print(f"rayalign train: loss auto -> {choice}: {reason}; {tally['tie']} ties, "
          f"{sum(unscored.values())} unscored, of {len(keys)} prompts (evidence in {path})")
    return evidence


def _judged_rows(config: RunConfig, units: list[dict], inputs: dict) -> list[dict]:
    """The policy answers each unit on vLLM; the CLAIR judge compares that answer (`answer`)
    with the winner (`answer_b`). The policy's answers are kept in `<train.output>/ANSWERS_FILE`
    and reused while `inputs` (answer_inputs: the model, its engine and max_tokens) stay the same:
    with other pairs (or another judge) only the prompts not answered yet go to vLLM."""
    from rayalign.clair import stages
    from rayalign.clair.pipeline import revise
    from rayalign.cluster import connect
    from rayalign.llm import chat_stage

    clair = config.clair
    path = Path(config.train.output) / ANSWERS_FILE
    answers = saved_answers(path, inputs)
    todo = [u for u in units if u["prompt_json"] not in answers]
    ray = connect(config.cluster, config.run_dir)
    if todo:
        greedy = dataclasses.replace(clair.sampling, temperature=0.0, n=1)
        generate = chat_stage(config.train.model, clair.engine, stages.target_request(greedy), "answer")
        for row in generate(ray.data.from_items(todo)).take_all():
            answers[row["prompt_json"]] = {k: _plain(v) for k, v in row.items() if k.startswith("answer_")}
        path.parent.mkdir(parents=True, exist_ok=True)
        # A failed generation is judged as failed in this run, and tried again in the next.
        kept = {prompt: answer for prompt, answer in answers.items() if not answer["answer_error"]}
        path.write_text(json.dumps({"inputs": inputs, "answers": kept}))
    print(f"rayalign train: loss auto: {len(todo)} policy answers generated, {len(units) - len(todo)} "
          f"reused (from {path})")
    rows = [{**unit, **answers[unit["prompt_json"]], "answer_b": unit["winner"]} for unit in units]
    ds = ray.data.from_items(rows).map(stages.answer_outcome)
    judging = dataclasses.replace(config, clair=dataclasses.replace(clair, mode="onpolicy_judge"))
    return revise(judging, ds).take_all()


def choice_inputs(config: RunConfig, policy: dict, references: dict[str, str]) -> dict:
    """What the choice depends on: the policy's answers (`policy`, answer_inputs: the model, its
    engine and max_tokens), the pairs by content, the judge (the clair.reviser fields that shape
    a verdict, as for clair's own output, and its engine's dtype and context), the token budget
    that can leave comparisons unjudged, the sample and the verifier's reference answers. Not the
    judge's rate limits, retries or prices."""
    from rayalign.clair.pipeline import reviser_fields

    reviser = config.clair.reviser
    judge = {**reviser_fields(reviser), "engine": {"dtype": reviser.engine.dtype,
                                                   "max_model_len": reviser.engine.max_model_len}}
    return {**policy, "pairs": tree_digest(config.train.pairs), "judge": judge, "sample": config.train.auto_sample,
            "seed": config.train.seed, "max_total_tokens": config.clair.max_total_tokens,
            "references": hashlib.sha256(json.dumps(sorted(references.items())).encode()).hexdigest()[:16]}


def answer_inputs(config: RunConfig) -> dict:
    """What the policy's greedy answers depend on: the model's files, its engine and max_tokens."""
    engine = json.loads(json.dumps(dataclasses.asdict(config.clair.engine), default=str))
    return {"model": tree_digest(config.train.model), "max_tokens": config.clair.sampling.max_tokens, "engine": engine}


def saved_answers(path: Path, inputs: dict) -> dict:
    """The answers saved in `path` by prompt, if they were made from `inputs`; else none."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    return saved.get("answers", {}) if saved.get("inputs") == inputs else {}


def _plain(value):
    """A value of a Ray Data row as JSON can hold it (arrays as lists)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _verdict(row: dict) -> str:
    """'chosen', 'policy' or 'tie' for a judged row, else the reason it could not be scored."""
    outcome = row["outcome"]
    if outcome in ("tie", "identical"):
        return "tie"
    if outcome != "pair":
        return outcome
    return "policy" if row["chosen"] == row["answer"] and row["chosen"] != row["answer_b"] else "chosen"


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)
