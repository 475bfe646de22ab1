from pathlib import Path

import pytest
import yaml

from rayalign.config import ConfigError, RunConfig, dump_config, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_typed():
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.train.loss == "apo_zero"
    assert config.train.beta == 0.1
    assert config.train.learning_rate == 2e-7  # the paper's setting
    assert config.train.gradient_accumulation == 64 // (8 * 2)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_loads(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # The file's values reach the dataclasses (spot-check every top-level scalar).
    for key, value in raw.items():
        if not isinstance(value, dict):
            assert getattr(config, key) == value


def test_overrides_are_parsed_as_yaml_and_nested(tmp_path):
    path = write(tmp_path, "train:\n  beta: 0.3\n")
    config = load_config(path, ["train.beta=0.2", "train.loss=dpo", "clair.sampling.n=4",
                                "serve.models={base: /m/a, aligned: /m/b}", "cluster.address=null"])
    assert config.train.beta == 0.2
    assert config.train.loss == "dpo"
    assert config.clair.sampling.n == 4
    assert config.serve.models == {"base": "/m/a", "aligned": "/m/b"}
    assert config.cluster.address is None


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["train.beta=1"]).train.beta == 1.0
    assert isinstance(load_config(None, ["train.beta=1"]).train.beta, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lerning_rate=1e-5"], "train.lerning_rate: unknown key (known keys: auto_sample, batch_size, beta,"),
        (["tain.beta=1"], "tain: unknown key"),
        (["train.zero_stage=5"], "train.zero_stage: must be 0, 1, 2 or 3, not 5"),
        (["train.loss=apo_sideways"], "train.loss: must be one of apo_zero, apo_down, dpo"),
        (["train.beta=high"], "train.beta: expected a number, got 'high'"),
        (["train.epochs=1.5"], "train.epochs: expected an integer, got 1.5"),
        (["train.gradient_checkpointing=yes please"], "train.gradient_checkpointing: expected true or false"),
        (["train.batch_size=10", "train.micro_batch_size=4", "train.num_workers=2"],
         "train.batch_size: (10) must be a multiple of micro_batch_size x num_workers (8)"),
        (["train.beta=-0.1"], "train.beta: must be positive"),
        (["clair.mode=onpolicy_judge"], "clair.sampling.n: must be at least 2 for mode 'onpolicy_judge'"),
        (["clair.reviser.backend=openai", "clair.reviser.model=gpt-4-turbo"],
         "clair.reviser.base_url: is required for backend 'openai'"),
        (["clair.engine.gpu_memory_utilization=1.5"], "clair.engine.gpu_memory_utilization: must be in (0, 1]"),
        (["clair.sampling.top_p=0"], "clair.sampling.top_p: must be in (0, 1]"),
        (["serve.port=70000"], "serve.port: must be a TCP port number"),
        (["serve.models=[a, b]"], "serve.models: expected a mapping"),
        (["eval.kind=judge"], "eval.judge_model: is required for kind 'judge'"),
        (["clair.format=csv"], "clair.format: must be one of 'jsonl', 'parquet', not 'csv'"),
        (["train.lora.r=0"], "train.lora.r: must be at least 1"),
        (["train.beta"], "override 'train.beta': expected section.key=value"),
        (["train.beta.x=1"], "train.beta: expected a number, got {'x': 1}"),
        # On a GPU cluster every vLLM engine the config starts needs a GPU, the reviser's only
        # when the reviser is a vLLM model.
        (["cluster.use_gpu=true", "serve.engine.gpus_per_engine=1"],
         "clair.engine.gpus_per_engine: is 0, but cluster.use_gpu is true: vLLM's CUDA build cannot run"),
        (["clair.judge=llm"], "clair.judge: the judge is clair.reviser.backend (here 'verifier': the verifier, "
                              "or a model with backend vllm or openai); remove clair.judge and set clair.reviser"),
        (["cluster.use_gpu=true", "clair.engine.gpus_per_engine=0.5"],
         "serve.engine.gpus_per_engine: is 0, but cluster.use_gpu is true"),
        (["cluster.use_gpu=true", "clair.engine.gpus_per_engine=1", "serve.engine.gpus_per_engine=1",
          "clair.reviser.backend=vllm", "clair.reviser.model=/m/big"],
         "clair.reviser.engine.gpus_per_engine: is 0, but cluster.use_gpu is true"),
        (["cluster.use_gpu=true", "clair.engine.gpus_per_engine=1", "serve.engine.gpus_per_engine=1",
          "reference.backend=vllm"], "reference.engine.gpus_per_engine: is 0, but cluster.use_gpu is true"),
        # The vLLM reference pass: computed in train.precision, before training, whole sequences.
        (["reference.backend=vllm", "reference.engine.dtype=float16"],
         "reference.engine.dtype: must be auto: the reference log-probs are computed in train.precision"),
        (["reference.backend=vllm", "reference.on_the_fly=true"],
         "reference.backend: vllm computes a pass before training; reference.on_the_fly computes inside each step"),
        (["reference.backend=vllm", "reference.engine.max_model_len=1024"],
         "reference.engine.max_model_len: (1024) must exceed train.max_length (1024)"),
        (["reference.backend=vllm", "reference.engine.batch_size=0"], "reference.engine.batch_size: must be at least 1"),
        (["reference.tolerance=0"], "reference.tolerance: must be positive"),
        (["reference.backend=onnx"], "reference.backend: must be one of 'transformers', 'vllm', not 'onnx'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_a_gpu_config_with_a_gpu_for_every_engine_it_starts_is_valid():
    config = load_config(None, ["cluster.use_gpu=true", "clair.engine.gpus_per_engine=0.5",
                                "serve.engine.gpus_per_engine=1"])  # the verifier reviser starts no engine
    assert set(config.vllm_engines()) == {"clair.engine", "serve.engine"}
    assert load_config(ROOT / "examples" / "paper-llama3-8b.yaml").cluster.use_gpu


def test_bad_yaml_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: the top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"^train\.beta: expected a number, got '0\.1x'$"):
        load_config(write(tmp_path, "train:\n  beta: 0.1x\n"))


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["train.beta=0.25", "serve.models={a: /x}"])
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_parse_override_keeps_strings():
    assert parse_override("clair.prompts=data/p.jsonl") == ("clair.prompts", "data/p.jsonl")
    assert parse_override("train.beta=0.5") == ("train.beta", 0.5)


def test_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 2e-7 as a string; the config still takes it as the number users mean.
    assert load_config(write(tmp_path, "train:\n  learning_rate: 2e-7\n")).train.learning_rate == 2e-7
    assert load_config(None, ["train.learning_rate=1e-5"]).train.learning_rate == 1e-5


def test_scalar_where_a_section_is_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.beta\.x: beta is not a section$"):
        load_config(write(tmp_path, "train:\n  beta: 0.1\n"), ["train.beta.x=1"])


def test_engine_resources_and_placement(monkeypatch):
    from rayalign.cluster import check_shared_paths
    from rayalign.llm import placement

    config = load_config(None, ["clair.engine.resources={rayalign_engine_node: 1}", "clair.engine.cpus_per_engine=2",
                                "train.placement_strategy=STRICT_PACK"])
    assert placement(config.clair.engine) == {"bundles": [{"CPU": 2.0, "rayalign_engine_node": 1.0}]}
    with pytest.raises(ConfigError, match=r"clair\.engine\.resources\.GPU: use cpus_per_engine or gpus_per_engine"):
        load_config(None, ["clair.engine.resources={GPU: 1}"])
    # Outside a job relative outputs are fine; inside one they would land on each node's own disk.
    check_shared_paths(config)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match=r"^run_dir: 'runs/default' must be absolute .* when running as a Ray Job$"):
        check_shared_paths(config)
    check_shared_paths(load_config(None, ["run_dir=/mnt/shared/run", "train.storage_path=s3://bucket/ckpt"]))


def test_haproxy_env_gives_each_ray_its_own_files_and_ports(monkeypatch):
    from rayalign.cluster import DRAIN, HAPROXY, haproxy_env

    monkeypatch.delenv(HAPROXY, raising=False)
    first, second = haproxy_env(), haproxy_env()
    assert first[HAPROXY] == "1"
    base = first["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert Path(base).is_dir() and base != second["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert first["RAY_SERVE_HAPROXY_SOCKET_PATH"] == f"{base}/admin.sock"
    # Serve puts the node id (56 hex digits) between the directory and the file; HAProxy caps a socket path at 97.
    assert len(f"{base}/{'0' * 56}/admin.sock") <= 97
    ports = {int(env[key]) for env in (first, second)
             for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")}
    assert len(ports) == 4 and not ports & {8404, 9101}
    # A stopping replica drains for 2 s behind Serve's own HAProxy, unless the user says otherwise.
    monkeypatch.delenv(DRAIN, raising=False)
    assert haproxy_env()[DRAIN] == "2"
    monkeypatch.setenv(DRAIN, "45")
    assert haproxy_env()[DRAIN] == "45"
    monkeypatch.setenv(HAPROXY, "0")  # the user's choice: Serve's Python proxy
    assert haproxy_env() == {}


def test_free_port_is_free_new_and_outside_the_ports_ray_and_the_kernel_hand_out(monkeypatch):
    import socket

    from rayalign import cluster

    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert cluster._ephemeral_ports() == (low, high)
    ports = [cluster.free_port() for _ in range(20)]
    assert len(set(ports)) == 20  # never the same port twice in one process
    for port in ports:
        assert port not in cluster.RAY_WORKER_PORTS and not low <= port <= high
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        taken = busy.getsockname()[1]
        # A range holding only a busy port: the kernel chooses instead.
        monkeypatch.setattr(cluster, "_ephemeral_ports", lambda: (taken + 1, high))
        monkeypatch.setattr(cluster, "RAY_WORKER_PORTS", range(taken))
        port = cluster.free_port()
    assert port != taken and low <= port <= high


def fake_cpus(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu holding `cpu -> (numa node, physical core)`."""
    for cpu, (node, core) in topology.items():
        siblings = ",".join(str(c) for c, (_, other) in sorted(topology.items()) if other == core)
        (root / f"cpu{cpu}" / f"node{node}").mkdir(parents=True)
        (root / f"cpu{cpu}" / "topology").mkdir()
        (root / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    return root


def test_engine_core_split_takes_vllms_cpus_for_the_model_worker(tmp_path):
    from rayalign.cluster import engine_core_split

    def split(allowed, cpus, node=0, machine="x86_64"):
        return engine_core_split(allowed, node=node, machine=machine, cpus=cpus)

    # Two cores (as here): the worker gets the first, everything else the second.
    two = fake_cpus(tmp_path / "two", {0: (0, 0), 1: (0, 1)})
    assert split({0, 1}, two) == ([0], [1])
    assert split({1}, two) is None  # one CPU: nothing to split
    assert split({0, 1}, two, machine="aarch64") is None  # vLLM binds differently there
    # Hyper-threads: CPUs 0 and 2 share core 0, 1 and 3 core 1; vLLM takes the last sibling of
    # each core and leaves the last core to others; the other siblings stay with the rest.
    smt = fake_cpus(tmp_path / "smt", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert split({0, 1, 2, 3}, smt) == ([2], [0, 1, 3])
    # Two NUMA nodes: the worker stays on the first memory node; the second goes to the rest.
    numa = fake_cpus(tmp_path / "numa", {c: (c // 4, c) for c in range(8)})
    assert split(set(range(8)), numa) == ([0, 1, 2], [3, 4, 5, 6, 7])
    assert split({4, 5, 6}, numa) is None  # no allowed CPU on node 0: vLLM binds nothing there
    assert split({4, 5, 6}, numa, node=1) == ([4, 5], [6])


def test_engine_dtype_auto_on_cpu_follows_the_cpu(capsys):
    from rayalign.llm import _cpu_dtype, engine_kwargs
    from rayalign.train.engine import cpu_has_bf16, resolve_precision

    _cpu_dtype.cache_clear()
    native = cpu_has_bf16()
    expected = "bfloat16" if native else "float32"
    engine = load_config(None, []).clair.engine
    assert engine.dtype == "auto"
    assert engine_kwargs(engine)["dtype"] == expected
    # The same choice as train.precision: auto on this machine, said once.
    assert {"bf16": "bfloat16", "fp32": "float32"}[resolve_precision("auto", use_gpu=False)] == expected
    engine_kwargs(engine)
    said = f"rayalign: engine dtype auto -> {expected} on CPU (this CPU {'has' if native else 'has no'} native bf16)\n"
    assert capsys.readouterr().out == said
    # A dtype the user chose, and GPU engines, are left to them and to vLLM.
    assert engine_kwargs(load_config(None, ["clair.engine.dtype=bfloat16"]).clair.engine)["dtype"] == "bfloat16"
    assert "dtype" not in engine_kwargs(load_config(None, ["clair.engine.gpus_per_engine=1"]).clair.engine)


def test_the_smollm2_example_holds_the_real_model_demos_settings():
    from rayalign.demo import pretrained_config

    example = yaml.safe_load((ROOT / "examples" / "smollm2-cpu.yaml").read_text())
    run = Path(example["run_dir"])
    demo = pretrained_config(run, run / "model")
    # The example also names the model and pairs for `rayalign train` on its own.
    assert {k: v for k, v in example["train"].items() if k not in ("model", "pairs")} == demo["train"]
    assert (example["train"]["model"], example["train"]["pairs"]) == (str(run / "model"), str(run / "clair" / "pairs"))
    assert {k: v for k, v in example.items() if k != "train"} == {k: v for k, v in demo.items() if k != "train"}
