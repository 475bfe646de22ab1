"""rayalign as a Ray Job on real multi-node Ray clusters started on this machine with `ray start`:
two nodes, and an autoscaling cluster (Ray's fake_multinode provider, cluster/local-autoscaling.yaml).

Jobs are submitted the way cluster/README.md says (the repository as working_dir, the runtime env
of cluster/runtime_env.yaml) through the job submission API, and `rayalign clair` inside them
joins the job's cluster (RAY_ADDRESS) instead of starting a Ray of its own.
"""

import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from rayalign import records
from rayalign.tasks import addition_prompts
from tests.conftest import PYTHON, ROOT
from tests.local_cluster import LocalCluster

pytestmark = pytest.mark.integration

ENGINE = {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.1, "batch_size": 4,
          "engine_args": {"enforce_eager": True}}


def job_runtime_env() -> dict:
    """cluster/runtime_env.yaml with the repository as working_dir (`--working-dir .`)."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    return {**env, "working_dir": str(ROOT)}


def wait_for_job(client, job_id: str, timeout_s: float, every=lambda: None):
    """The job's final status; `every` runs between polls."""
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")
        every()
        time.sleep(2)
    return status


def state(cluster: LocalCluster, kind: str, job_id: str) -> list[dict]:
    """Tasks or actors of one Ray job, from the state API (with their node ids)."""
    path = (f"/api/v0/{kind}?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D"
            f"&filter_values={job_id}")
    return cluster.get(path)["data"]["result"]["result"]


def test_clair_job_on_two_nodes(tmp_path, student):
    prompts = addition_prompts(10, seed=61)
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    run_dir = tmp_path / "run"
    # The engine asks for more logical CPUs than the head has, so it can only be placed on the
    # worker node; the small Ray Data tasks spread over both. No cluster.address: inside a job
    # rayalign must join the job's cluster (RAY_ADDRESS), not start a Ray of its own.
    config = {"run_dir": str(run_dir),
              "clair": {"prompts": str(tmp_path / "prompts"), "target_model": str(student),
                        "engine": {**ENGINE, "cpus_per_engine": 5}, "rows_per_shard": 2,
                        "sampling": {"temperature": 1.0, "max_tokens": 8}}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    from ray.job_submission import JobStatus, JobSubmissionClient

    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=4, resources={"rayalign_head": 1})
        cluster.add_worker(num_cpus=8, resources={"rayalign_engine_node": 1})
        nodes = cluster.alive_nodes()
        head = next(n["node_id"] for n in nodes if n["is_head_node"])
        worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
        assert {n["resources_total"]["CPU"] for n in nodes} == {4.0, 8.0}

        # Token authentication is on: the job API refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(cluster.dashboard_url + "/api/jobs/", timeout=30)
        assert refused.value.code == 401

        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
        submission = client.submit_job(entrypoint=f"rayalign clair --config {config_path}",
                                       runtime_env=job_runtime_env())
        status = wait_for_job(client, submission, timeout_s=420)
        logs = client.get_job_logs(submission)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        info = client.get_job_info(submission)
        tasks = state(cluster, "tasks", info.job_id)
        actors = state(cluster, "actors", info.job_id)

    # It joined the job's cluster: both nodes' CPUs were visible, no local Ray was started.
    assert "Connecting to existing Ray cluster" in logs
    assert "Started a local Ray instance" not in logs
    assert info.driver_node_id == head

    out = run_dir / "clair"
    pairs = [r.value for r in records.read_records(out / "pairs")] if (out / "pairs").exists() else []
    rejects = [r.value for r in records.read_records(out / "rejects")] if (out / "rejects").exists() else []
    assert sorted(r["id"] for r in pairs + rejects) == sorted(p["id"] for p in prompts)
    assert pairs, "a partly trained student makes near misses"

    engines = [a for a in actors if "vLLMEngineStage" in a["class_name"]]
    assert engines and {a["node_id"] for a in engines} == {worker}, [(a["class_name"], a["node_id"]) for a in actors]
    on_head = [t["name"] for t in tasks if t["node_id"] == head]
    assert on_head, f"no task of the job ran on the head node: {[(t['name'], t['node_id']) for t in tasks]}"


def test_autoscaler_adds_a_worker_for_a_clair_job_and_removes_it_when_idle(tmp_path, student):
    prompts = addition_prompts(6, seed=71)
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    run_dir = tmp_path / "run"
    # 5 logical CPUs: more than the 4-CPU head has, so the engine needs an `engine` worker node.
    config = {"run_dir": str(run_dir),
              "clair": {"prompts": str(tmp_path / "prompts"), "target_model": str(student),
                        "engine": {**ENGINE, "cpus_per_engine": 5},
                        "sampling": {"temperature": 1.0, "max_tokens": 8}}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    from ray.job_submission import JobStatus, JobSubmissionClient

    with LocalCluster() as cluster:
        autoscaling = yaml.safe_load((ROOT / "cluster" / "local-autoscaling.yaml").read_text())
        autoscaling["provider"]["gcs_address"] = cluster.gcs_address
        autoscaling_path = tmp_path / "autoscaling.yaml"
        autoscaling_path.write_text(yaml.safe_dump(autoscaling))
        cluster.start_head(num_cpus=4, resources={}, autoscaling_config=autoscaling_path,
                           extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        head = cluster.alive_nodes()[0]["node_id"]
        counts = [len(cluster.alive_nodes())]
        added: dict[str, dict] = {}

        def sample() -> int:
            nodes = cluster.alive_nodes()
            added.update({n["node_id"]: n for n in nodes if n["node_id"] != head})
            counts.append(len(nodes))
            return len(nodes)

        # Submitted with cluster/submit.py, which passes a key from the submitting shell, and
        # authenticates from RAY_AUTH_MODE/RAY_AUTH_TOKEN as a user's shell would. Launched nodes
        # share the head's temp dir here, so the working_dir is used in place (local://, as with a
        # repository baked into a KubeRay image) instead of unpacked per node.
        secret = "rayalign-test-" + uuid.uuid4().hex
        shell = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token, "RAYALIGN_JOB_SECRET": secret}
        submitted = subprocess.run(
            [PYTHON, str(ROOT / "cluster" / "submit.py"), "--address", cluster.dashboard_url, "--working-dir",
             f"local://{ROOT}", "--env", "RAYALIGN_JOB_SECRET", "--", "rayalign", "clair", "--config", str(config_path)],
            env=shell, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        submission = re.search(r"submitted (\S+);", submitted.stdout).group(1)
        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
        status = wait_for_job(client, submission, timeout_s=420, every=sample)
        logs = client.get_job_logs(submission)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        during = len(counts)
        info = client.get_job_info(submission)
        engines = [a for a in state(cluster, "actors", info.job_id) if "vLLMEngineStage" in a["class_name"]]
        deadline = time.monotonic() + 180
        while sample() > 1 and time.monotonic() < deadline:
            time.sleep(2)

    assert counts[0] == 1, "only the head before the job"
    assert max(counts[:during]) == 2, f"one engine worker added for the job: {counts}"
    (worker_id, worker), = added.items()
    assert worker["resources_total"]["CPU"] == 6 and worker["resources_total"]["rayalign_engine_node"] == 1
    assert {a["node_id"] for a in engines} == {worker_id}, "the engine ran on the added node"
    assert counts[-1] == 1, f"the idle worker was removed after the job: {counts}"

    # The key travelled in the job's runtime env, and is in none of the run's outputs or logs.
    assert info.runtime_env["env_vars"]["RAYALIGN_JOB_SECRET"] == secret
    assert secret not in logs
    assert not [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]

    out = run_dir / "clair"
    done = [r.value["id"] for kind in ("pairs", "rejects") if (out / kind).exists()
            for r in records.read_records(out / kind)]
    assert sorted(done) == sorted(p["id"] for p in prompts)
