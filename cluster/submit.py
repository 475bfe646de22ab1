"""`ray job submit` with keys from your own shell: submits a rayalign command as a Ray Job with the
repository as working_dir and cluster/runtime_env.yaml, adding the named environment variables of
this shell to the job's env_vars.

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...      # the cluster's Ray token
    python cluster/submit.py --address http://127.0.0.1:8265 --env OPENAI_API_KEY \\
        -- rayalign pipeline --config examples/paper-llama3-8b.yaml

`ray job submit` cannot do this: its runtime env file holds values, and a key must not be written
into a file. Here the value goes from this process's environment into the submission request only;
Ray then keeps it with the job's runtime env (readable through the job API by whoever holds the
cluster's token). Keys set on the cluster's nodes (Kubernetes secrets, the cloud's secret manager;
see cluster/README.md) need none of this: jobs inherit them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

RUNTIME_ENV = Path(__file__).with_name("runtime_env.yaml")


def runtime_env(working_dir: str, names: list[str], environ=os.environ) -> dict:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise SystemExit(f"submit.py: {', '.join(missing)} not set in this shell; export it, or drop --env")
    env["env_vars"] = {**env.get("env_vars", {}), **{name: environ[name] for name in names}}
    return {**env, "working_dir": working_dir}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                        help="the job API, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="copy this environment variable of the shell into the job (repeatable)")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- rayalign COMMAND ...")
    args = parser.parse_args(argv)
    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not command or not args.address:
        parser.error("give --address and a command after --")

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env(args.working_dir, args.env))
    print(f"submitted {job}; follow it with: ray job logs --address {args.address} --follow {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
