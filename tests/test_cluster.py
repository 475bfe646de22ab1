"""The cluster definitions under cluster/: checked against Ray's own schema and rayalign's own
config and Serve code, so that they cannot drift from the code, and searched for secrets."""

import copy
import json
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from rayalign.config import load_config
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml", "local-autoscaling.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
PAPER = ROOT / "examples" / "paper-llama3-8b.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def kuberay(kind: str) -> dict:
    (doc,) = [d for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
              if d and d.get("kind") == kind]
    return doc


# ---- Ray cluster launcher --------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_validates_against_rays_schema(name):
    config = load(CLUSTER / name)
    jsonschema.validate(config, ray_schema())
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in workers), \
        "every worker type scales from zero"
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_the_schema_check_rejects_a_broken_file():
    config = load(CLUSTER / "aws.yaml")
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["resources"] = {"CPU": "many"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_typo"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_file_passes_rays_own_config_preparation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(CLUSTER / name)))


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_file_fits_the_paper_setup(name):
    config = load(CLUSTER / name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0, "a CPU head that runs no tasks"
    gpus = {n: t["resources"].get("GPU", 0) for n, t in types.items()}
    # ZeRO-3 training of the paper config: all of train.num_workers on one node's GPUs.
    paper = load_config(PAPER)
    assert paper.train.num_workers in gpus.values()
    eight = next(n for n, g in gpus.items() if g == paper.train.num_workers)
    assert types[eight]["node_config"].get("InstanceType", types[eight]["node_config"].get("machineType")) in \
        {"p4de.24xlarge", "a2-ultragpu-8g"}
    # Generation and serving replicas: one engine per single-GPU node.
    assert paper.clair.engine.gpus_per_engine == 1 and 1 in gpus.values()
    one = next(n for n, g in gpus.items() if g == 1)
    assert types[one]["resources"]["CPU"] >= paper.clair.engine.cpus_per_engine
    assert types[one]["max_workers"] >= paper.serve.max_replicas
    # Setup installs rayalign with the gpu extra; the paper's /mnt/shared is mounted in the container.
    assert any("[gpu]" in c and "pip install" in c for c in config["setup_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])
    assert paper.run_dir.startswith("/mnt/shared/") and paper.train.storage_path.startswith("/mnt/shared/")


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_file_keeps_the_cluster_private_and_authenticated(name):
    config = load(CLUSTER / name)
    assert config["provider"]["use_internal_ips"] is True
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard and job API listen on the head's loopback"
    assert "0.0.0.0" not in head
    for commands in (head, worker):
        assert "export RAY_AUTH_MODE=token;" in commands
        assert "export RAY_SERVE_ENABLE_HA_PROXY=1;" in commands, "HAProxy is Serve's HTTP ingress on every node"
        # The run's keys come from the secret manager at start, by name only.
        for key in ("OPENAI_API_KEY", "RAYALIGN_SERVE_KEY"):
            assert re.search(rf'export {key}="\$\(python ~/rayalign/cluster/secret\.py \w+ [\w-]+ [\w/-]+\)";',
                             commands), key
    assert any("~/.ray/auth_token" in c and "umask 077" in c for c in config["setup_commands"])


def test_local_autoscaling_has_what_fake_multinode_needs():
    config = load(CLUSTER / "local-autoscaling.yaml")
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    assert provider["use_node_id_as_ip"] and provider["disable_node_updaters"] and provider["disable_launch_config_check"]
    assert config["head_node_type"] == "ray.head.default"
    assert config["idle_timeout_minutes"] == 0.2
    # Ray's config preparation cannot fill these in for fake_multinode; the monitor needs them.
    assert {"file_mounts", "cluster_synced_files", "file_mounts_sync_continuously", "setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"} <= set(config)
    engine = config["available_node_types"]["engine"]
    assert engine["resources"]["rayalign_engine_node"] == 1
    assert engine["resources"]["CPU"] > config["available_node_types"]["ray.head.default"]["resources"]["CPU"]


# ---- the runtime env of `ray job submit` -----------------------------------------------------

def test_runtime_env_is_valid_and_uploads_code_but_not_runs(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env, working_dir=str(ROOT))
    assert "pip" not in env and "uv" not in env and "working_dir" not in env
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    files = ["rayalign/cli.py", "examples/paper-llama3-8b.yaml", "cluster/runtime_env.yaml", "runs/demo/clair/pairs/p.jsonl",
             ".venv/bin/python", "bench/results/speed.json", ".git/HEAD", "rayalign/__pycache__/cli.pyc",
             "rayalign.egg-info/PKG-INFO", "bench/bench_clair.py"]
    for name in files:
        (tmp_path / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name).write_text("x")
    # Without .gitignore: the excludes alone must keep runs and environments out.
    create_package(str(tmp_path / "repo"), tmp_path / "pkg.zip", include_gitignore=False, excludes=env["excludes"])
    uploaded = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    assert uploaded == {"rayalign/cli.py", "examples/paper-llama3-8b.yaml", "cluster/runtime_env.yaml",
                        "bench/bench_clair.py"}


def test_submit_adds_named_keys_from_the_shell_and_refuses_missing_ones():
    import runpy

    runtime_env = runpy.run_path(str(CLUSTER / "submit.py"))["runtime_env"]
    env = runtime_env(".", ["OPENAI_API_KEY"], environ={"OPENAI_API_KEY": "from-the-shell", "OTHER": "x"})
    base = load(CLUSTER / "runtime_env.yaml")
    assert env == {**base, "working_dir": ".", "env_vars": {**base["env_vars"], "OPENAI_API_KEY": "from-the-shell"}}
    with pytest.raises(SystemExit, match="RAYALIGN_SERVE_KEY not set in this shell"):
        runtime_env(".", ["RAYALIGN_SERVE_KEY"], environ={})


# ---- KubeRay -----------------------------------------------------------------------------------

def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"] == {"mode": "token", "secretName": "rayalign-ray-token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "the dashboard and job API stay inside the Kubernetes cluster"
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 == group["minReplicas"] < group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict) and group["template"]["spec"]["containers"]
        if "resources" in group["rayStartParams"]:
            # KubeRay passes the value to `ray start --resources` as is: JSON inside quotes.
            assert isinstance(json.loads(json.loads(group["rayStartParams"]["resources"])), dict)
    for container in containers(spec):
        assert container["image"] and container["resources"]["limits"]
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/mnt/shared" in mounts
        keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert {"OPENAI_API_KEY", "RAYALIGN_SERVE_KEY"} <= set(keys)
        assert all(ref["name"] == "rayalign-keys" for ref in keys.values())
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container["env"]


def test_raycluster_manifest():
    cluster = kuberay("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    check_cluster_spec(cluster["spec"])
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    gpus = {g["groupName"]: int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in cluster["spec"]["workerGroupSpecs"]}
    assert load_config(PAPER).train.num_workers in gpus.values() and 1 in gpus.values()
    claim = kuberay("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = [v for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
               for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes} == {claim["metadata"]["name"]}


def test_rayjob_runs_the_pipeline_with_a_config_that_loads():
    from ray.runtime_env import RuntimeEnv

    job = kuberay("RayJob")
    spec = job["spec"]
    assert spec["rayClusterSpec"] == kuberay("RayCluster")["spec"], "the job's cluster is raycluster.yaml's"
    check_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["rayalign", "pipeline"]
    config_path = argv[argv.index("--config") + 1]
    config = load_config(ROOT / config_path, argv[argv.index("--config") + 2:])
    assert config.rounds >= 1 and config.train.loss == "apo_zero"
    runtime = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime)
    assert runtime["env_vars"] == load(CLUSTER / "runtime_env.yaml")["env_vars"]
    # The working_dir is the repository in the image (cluster/Dockerfile), used in place.
    image_repo = re.search(r"^COPY \S+ \. (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert runtime["working_dir"] == f"local://{image_repo}"
    assert spec["submissionMode"] == "HTTPMode" and spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1


def test_rayservice_serves_what_rayalign_serve_deploys(tmp_path):
    from rayalign import serve

    service = kuberay("RayService")
    spec = service["spec"]
    base = kuberay("RayCluster")["spec"]
    cluster = spec["rayClusterConfig"]
    check_cluster_spec(cluster)
    assert cluster["headGroupSpec"] == base["headGroupSpec"]
    assert all(group in base["workerGroupSpecs"] for group in cluster["workerGroupSpecs"])

    applications = yaml.safe_load(spec["serveConfigV2"])["applications"]
    (app,) = applications
    assert app["import_path"] == serve.ONE_MODEL_BUILDER
    # What `rayalign serve` would deploy for the paper config, up to the checkpoint's location.
    paper = load_config(PAPER)
    checkpoint = Path(app["args"]["llm_config"]["model_loading_config"]["model_source"])
    assert checkpoint == Path(paper.run_dir) / "train" / "final"
    local = tmp_path / "final"
    local.mkdir()
    (local / "config.json").write_text("{}")
    expected = serve.deploy_file(paper.serve, serve.app_args(paper.serve, {"aligned": str(local)}))["applications"][0]
    expected["args"]["llm_config"]["model_loading_config"]["model_source"] = str(checkpoint)
    assert app == expected
    key_env = app["args"]["api_key_env"]
    assert key_env == paper.serve.api_key_env
    assert all(key_env in {e["name"] for e in c["env"] if "valueFrom" in e} for c in containers(cluster))


# ---- secrets -------------------------------------------------------------------------------------

KEY_PATTERNS = [
    r"sk-[A-Za-z0-9_-]{16,}",                              # OpenAI-style keys
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",                        # AWS access key ids
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",                       # GitHub tokens
    r"\bhf_[A-Za-z0-9]{30,}",                              # Hugging Face tokens
    r"\bAIza[0-9A-Za-z_-]{35}\b",                          # Google API keys
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",                     # Slack tokens
    # NAME: value / NAME=value for a secret-like name, with a literal value rather than a
    # reference ($VAR, $(command), valueFrom, a secret's name).
    r"(?i)\b[\w-]*(key|token|secret|password)[\w-]*\b\s*[:=]\s*['\"]?(?![$<{(]|valueFrom)[A-Za-z0-9+/=_-]{24,}",
    r"\b[0-9a-f]{40,}\b",                                  # long hex strings (tokens)
]


def key_like(text: str) -> list[str]:
    return [m.group(0) for p in KEY_PATTERNS for m in re.finditer(p, text)]


def test_the_secret_search_finds_planted_keys():
    planted = ["OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx", "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
               "RAY_AUTH_TOKEN: 6f1d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f7", "serve-key: c2VjcmV0LXZhbHVlLXRoYXQtaXMtbG9uZw==",
               "-----BEGIN RSA PRIVATE KEY-----", "token = hf_abcdefghijklmnopqrstuvwxyzABCDEF"]
    for line in planted:
        assert key_like(line), line
    references = ['export OPENAI_API_KEY="$(python ~/rayalign/cluster/secret.py aws us-east-1 rayalign/openai-api-key)"',
                  "- {name: RAYALIGN_SERVE_KEY, valueFrom: {secretKeyRef: {name: rayalign-keys, key: serve-key}}}",
                  "api_key_env: RAYALIGN_SERVE_KEY", "secretName: rayalign-ray-token"]
    for line in references:
        assert not key_like(line), line


def test_no_file_under_cluster_holds_a_key():
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 10
    found = {str(p.relative_to(ROOT)): key_like(p.read_text()) for p in files}
    assert not {path: hits for path, hits in found.items() if hits}


def test_kuberay_keys_come_only_from_secrets():
    secret_name = re.compile(r"(?i)(KEY|TOKEN|SECRET|PASSWORD)")
    for kind in ("RayCluster", "RayJob", "RayService"):
        doc = kuberay(kind)
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        for container in containers(spec):
            for env in container.get("env", []):
                if secret_name.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (kind, env["name"])
    assert not list(CLUSTER.rglob("*secret*.yaml")), "no Secret manifest (with values) in the repository"
