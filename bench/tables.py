"""Print the Markdown tables of BENCHMARKS.md from bench/results/*.json.

Usage: python bench/tables.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def generation(r: dict) -> str:
    steady = r["rayalign_steady"]
    rows = [
        ("vLLM `LLM.chat` (raw engine, warm)", f"{r['vllm_raw']['tokens_per_s']:.0f}", f"{r['vllm_raw']['prompts']} prompts"),
        ("rayalign CLAIR generation stage, steady state", f"{steady['tokens_per_s']:.0f}",
         f"{steady['extra_tokens']} extra tokens in {steady['extra_seconds']} s (10N run minus N run)"),
        ("transformers `generate` (batch 32)", f"{r['transformers']['tokens_per_s']:.0f}",
         f"{r['transformers']['prompts']} prompts"),
    ]
    out = ["| system | generated tokens/s | measured on |", "| --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    ratios = r["ratios"]
    out += ["", f"- rayalign / raw vLLM: **{ratios['rayalign_vs_vllm']:.2f}x**; rayalign / transformers: "
            f"**{ratios['rayalign_vs_transformers']:.1f}x**",
            f"- peak memory of the whole run (driver, Ray, engine): N = {r['rayalign_N']['prompts']} prompts "
            f"{r['rayalign_N']['peak_rss_gb']} GB, 10N = {r['rayalign_10N']['prompts']} prompts "
            f"{r['rayalign_10N']['peak_rss_gb']} GB (ratio **{ratios['peak_memory_10N_over_N']:.2f}**)",
            f"- wall time including engine start-up: N {r['rayalign_N']['wall_s']} s, 10N {r['rayalign_10N']['wall_s']} s"]
    if "cpu" in r:
        out.append(f"- {r['model']}, {r['dtype']}, {r['max_tokens']} tokens at most; CPU: {r['cpu']['model']} "
                   f"({r['cpu']['cpus']} CPUs), flags {', '.join(r['cpu']['flags'])}")
    return "\n".join(out)


def training(r: dict) -> str:
    out = ["| precision | system | pairs/s (steady) | tokens/s | start-up s | reference pass s | peak RSS GB | share of matmul peak |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for precision in ("fp32", "bf16"):
        for name, label in (("rayalign", "rayalign (1 Ray Train worker, DeepSpeed ZeRO-0)"),
                            ("trl", "TRL DPOTrainer, apo_zero, precomputed reference")):
            x = r[precision][name]
            out.append(f"| {precision} | {label} | {x['pairs_per_s']} | {x['tokens_per_s']} | {x['startup_s']} | "
                       f"{x['reference_pass_s']} | {x['peak_rss_gb']} | {x['matmul_peak_share']:.1%} |")
    out += ["", f"- rayalign / TRL pairs/s: fp32 **{r['fp32']['ratio_pairs_per_s']}x**, bf16 "
            f"**{r['bf16']['ratio_pairs_per_s']}x**; best precision of each: **{r['ratio_best_precision']}x**",
            f"- matmul peak measured in the same run: fp32 {r['fp32']['matmul_peak_gflops']} GFLOP/s, "
            f"bf16 {r['bf16']['matmul_peak_gflops']} GFLOP/s"]
    return "\n".join(out)


def packing(r: dict) -> str:
    rows = ["| system | pairs/s (steady) | tokens/s | padding | share of matmul peak | logged mfu | reference pass s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in r.get("systems", ("rayalign-packed", "rayalign-unpacked", "trl-micro2", "trl-micro4", "trl-micro8")):
        x = r[name]
        mfu = f"{x['mfu']:.1%}" if "mfu" in x else "-"
        rows.append(f"| {name} | {x['pairs_per_s']} | {x['tokens_per_s']} | {x['padding_fraction']:.1%} | "
                    f"{x['matmul_peak_share']:.1%} | {mfu} | {x['reference_pass_s']} |")
    ratios = "; ".join(f"{k.removeprefix('ratio_').replace('_', ' ')}: {v}x" for k, v in r.items() if k.startswith("ratio_"))
    return "\n".join(rows) + (f"\n\n{ratios}; best TRL: {r.get('trl_best', '-')}; {r['cpu']} ({', '.join(r['flags'])}), "
                              f"matmul peak {r['matmul_peak_gflops']} GFLOP/s")


def reference_pass(r: dict) -> str:
    rows = ["| backend | seconds | pairs/s | tokens/s | max difference from padded (nats) |", "| --- | --- | --- | --- | --- |"]
    for name in ("transformers-padded", "transformers-packed", "vllm"):
        x = r[name]
        rows.append(f"| {name} | {x['seconds']} | {x['pairs_per_s']} | {x['tokens_per_s']} | "
                    f"{x.get('max_abs_difference_from_padded', 0):.2g} |")
    check = r["vllm"]["check"]
    return "\n".join(rows) + (f"\n\nvllm: scoring {check['vllm_seconds']} s, first-batch check {check['check_seconds']} s "
                              f"({check['pairs']} pairs, at most {check['max_per_token']:.2g} nats per token); "
                              f"padded / vllm: {r['ratio_vllm_over_padded']}x, packed / vllm: "
                              f"{r['ratio_vllm_over_packed']}x; {r['cpu']} ({', '.join(r['flags'])})")


def serving(r: dict) -> str:
    return "\n\n".join(f"### {p['model']}\n\n" + serving_preset(r, p) for p in r["presets"].values())


def serving_preset(r: dict, p: dict) -> str:
    out = ["| server | requests/s | mean ms | p50 ms | p99 ms | one request alone, 1 token: p50 ms |",
           "| --- | --- | --- | --- | --- | --- |"]
    for key, label in (("vllm_serve", "vLLM's OpenAI server"), ("rayalign_serve", "rayalign serve (Ray Serve)")):
        x = p[key]
        out.append(f"| {label} | {x['requests_per_s']} | {x['mean_ms']} | {x['p50_ms']} | {x['p99_ms']} | "
                   f"{x['one_token_alone_p50_ms']} |")
    ratios = p["ratios"]
    requests = p["rounds"]["vllm_serve"][0]["load"]["requests"]
    out += ["", f"- rayalign / vLLM throughput: **{ratios['throughput_vs_vllm']:.2f}x**; p50 overhead "
            f"**{ratios['p50_overhead_ms']} ms**, mean {ratios['mean_overhead_ms']} ms, p99 "
            f"{ratios['p99_overhead_ms']} ms; one request "
            f"alone: p50 overhead **{ratios['one_token_alone_p50_overhead_ms']} ms**",
            f"- medians of {len(p['rounds']['vllm_serve'])} rounds; each: {r['concurrency']} concurrent clients, "
            f"{requests} requests of {r['max_tokens']} tokens, then {requests} requests of 1 token one at a time; "
            f"rayalign's HTTP ingress: {r['rayalign_http_ingress']}; load generator on "
            f"cores {p['rounds']['vllm_serve'][0]['load_generator_cores']}",
            "- per round (requests/s, p50 ms): "
            + "; ".join(f"{label} " + ", ".join(f"{x['load']['requests_per_s']} / {x['load']['p50_ms']}"
                                               for x in p["rounds"][key])
                        for key, label in (("vllm_serve", "vLLM"), ("rayalign_serve", "rayalign"))),
            "- seconds the load generator waited for a core during the load, per round: "
            + "; ".join(f"{label} " + ", ".join(str(x["load"]["load_generator_run_delay_s"]) for x in p["rounds"][key])
                        for key, label in (("vllm_serve", "vLLM"), ("rayalign_serve", "rayalign")))]
    return "\n".join(out)


def stalls(r: dict) -> str:
    out = ["| server | requests/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | stalls | stalled time | "
           "load generator waited for a core |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, label in (("vllm_serve", "vLLM's OpenAI server"), ("rayalign_serve", "rayalign serve")):
        for x in r["rounds"][key]:
            lengths = [length for _, length in x["stall_list"]]
            shown = f"{x['stalls']} ({min(lengths):.2f}-{max(lengths):.2f} s)" if lengths else "0"
            out.append(f"| {label} | {x['requests_per_s']} | {x['ttft_p50_ms']:.0f} | {x['ttft_p90_ms']:.0f} | "
                       f"{x['ttft_p99_ms']:.0f} | {shown} | {x['stalled_s']} s of {x['seconds']} s "
                       f"({x['stalled_share']:.0%}) | {x['load_generator_run_delay_s']} s |")
    return "\n".join(out)


def revisers(r: dict) -> str:
    out = ["| reviser | pairs | rejects | token Jaccard | Levenshtein | chosen right | rejected right | "
           "fixed | broke | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, label in (("verifier", "verifier"), ("vllm", "SmolLM2 on vLLM (JSON)"),
                       ("openai", "SmolLM2 via `rayalign serve` (openai backend, JSON)")):
        x = r[key]
        rejects = ", ".join(f"{k} {v}" for k, v in x["rejects"].items() if v) or "none"
        out.append(f"| {label} | {x['pairs']} | {rejects} | {x['jaccard_mean']:.3f} | {x['levenshtein_mean']:.1f} | "
                   f"{x['chosen_right']} | {x['rejected_right']} | {x['fixed']} | {x['broke']} | {x['seconds']} |")
    out += ["", f"- {r['prompts']} question prompts, one sample each (temperature 0.7, seeded per unit); "
            f"CPU: {r['cpu']['model']}, flags {', '.join(r['cpu']['flags'])}"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    results = Path(args.results)
    for name, render in (("clair_generation", generation), ("clair_generation_smollm2-135m-instruct", generation),
                         ("revisers", revisers), ("train_throughput", training), ("train_packing", packing),
                         ("reference_pass", reference_pass),
                         ("serve_latency", serving), ("serve_stalls", stalls)):
        path = results / f"{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            print(f"## {name}\n\n`{r.get('command', '')}` (finished {r.get('finished', '?')})\n\n{render(r)}\n")


if __name__ == "__main__":
    main()
