"""scripts/gpu-check --cpu: the reduced GPU check, run on the CPU with gloo as a user runs it."""

import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.conftest import PYTHON, ROOT, free_port


def test_the_cpu_check_runs_every_part_and_passes():
    done = subprocess.run([PYTHON, str(ROOT / "scripts" / "gpu-check"), "--cpu"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert lines[0].startswith("rayalign gpu-check (reduced) on CPU: torch ") and lines[0].endswith("gloo of size 1")
    # DeepSpeed is installed here, so the carried files are not needed and the steps run on it.
    found = [line for line in lines if line.startswith("deepspeed ")]
    assert len(found) == 1 and re.fullmatch(r"deepspeed  0\.\d+\.\d+ from .*site-packages", found[0])
    parts = [line.split()[0] for line in lines if re.match(r"^(losses|log-probs|reference|train|packed) ", line)]
    assert parts == ["losses", "log-probs", "reference", "train", "train", "packed"]
    assert "8 losses agree with the CPU" in done.stdout
    assert "16 pairs agree with the CPU" in next(line for line in lines if line.startswith("reference"))
    trains = [line for line in lines if line.startswith("train")]
    assert "DeepSpeed ZeRO-2: 4 steps, first step as on the CPU" in trains[0]
    assert "DeepSpeed ZeRO-3: 2 steps, first step as on the CPU" in trains[1]
    # Four updates of the same four-pair batches move the loss (APO-zero starts at exactly 1).
    first, last = (float(x) for x in re.search(r"loss (\S+), logps.*last loss (\S+),", trains[0]).groups())
    assert first == pytest.approx(1.0, abs=1e-6) and last < first
    # The packed step: ten steps of micro-batches of unequal numbers of pairs, as the padded ones.
    packed = next(line for line in lines if line.startswith("packed"))
    # Then packed sharing each pair's common beginning (fewer tokens, so other micro-batches).
    assert re.match(r"packed +DeepSpeed ZeRO-2: 10 packed steps \(.*\(\d+, \d+.*\) pairs per micro-batch; shared "
                    r"prefixes \(.*\)\) agree with the padded ones \(max relative diff \S+ <= 1e-06\)", packed), packed
    assert re.fullmatch(r"rayalign gpu-check: passed in \d+ s", lines[-1])


def test_a_disagreement_fails_the_check_by_name(monkeypatch):
    from rayalign import gpu_check

    assert gpu_check.check_losses("cpu").startswith("8 losses agree")
    # No real device disagrees on demand here; a tolerance below zero makes every part disagree.
    monkeypatch.setattr(gpu_check, "LOSS_TOLERANCE", -1.0)
    with pytest.raises(gpu_check.CheckFailed, match=r"^loss apo_zero: 0\.00e\+00 from the CPU \(> -1\.0\)$"):
        gpu_check.check_losses("cpu")


def _source_archive(folder, name, version, module, text):
    """A source archive as PyPI serves DeepSpeed's: setup.py and one module."""
    root = folder / f"{name}-{version}"
    root.mkdir()
    (root / "setup.py").write_text(f"from setuptools import setup\nsetup(name={name!r}, version={version!r}, "
                                   f"py_modules=[{module!r}])\n")
    (root / f"{module}.py").write_text(text)
    (root / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    with tarfile.open(folder / f"{name}-{version}.tar.gz", "w:gz") as archive:
        archive.add(root, arcname=root.name)


def _wheel(folder, name, version, module, text):
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{module}.py", text)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def test_carried_files_install_without_network_into_their_own_folder(tmp_path):
    """What a bare machine does with .gpu-check-wheels/: a source archive (DeepSpeed has no wheel)
    and a wheel, installed offline, without resolving dependencies, beside the checkout."""
    from rayalign import gpu_check

    carried = tmp_path / "carried"
    carried.mkdir()
    build = tmp_path / "build"
    build.mkdir()
    _source_archive(build, "carried_source", "1.2", "carried_source", "VALUE = 'from the source archive'\n")
    (build / "carried_source-1.2.tar.gz").rename(carried / "carried_source-1.2.tar.gz")
    _wheel(carried, "carried_wheel", "3.4", "carried_wheel", "VALUE = 'from the wheel'\n")

    site = gpu_check.install_carried(carried)
    assert site == carried / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    done = subprocess.run([PYTHON, "-c", "import carried_source, carried_wheel; "
                                         "print(carried_source.VALUE, '|', carried_wheel.VALUE, '|', carried_source.__file__)"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, check=True)
    assert done.stdout.strip() == f"from the source archive | from the wheel | {site / 'carried_source.py'}"
    # Installed once: a second call finds the folder and installs nothing.
    (carried / "carried_wheel-3.4-py3-none-any.whl").unlink()
    assert gpu_check.install_carried(carried) == site


def test_carried_files_that_do_not_install_are_named(tmp_path):
    from rayalign import gpu_check

    with pytest.raises(gpu_check.CheckFailed, match="no wheels or sources in .*: fill it with `scripts/gpu-check --fetch-wheels`"):
        gpu_check.install_carried(tmp_path)
    (tmp_path / "broken-1.0.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(gpu_check.CheckFailed, match=r"installing the files of .* failed: "):
        gpu_check.install_carried(tmp_path)
    assert not any(p.name.startswith("site-py") for p in tmp_path.iterdir())


def test_the_fetch_command_brings_deepspeed_as_installed_here_and_wheels_for_python_3_12(tmp_path):
    from importlib.metadata import version

    from rayalign import gpu_check

    source, wheels = gpu_check.fetch_commands(tmp_path)
    assert source[-4:] == ["--no-deps", "--no-binary", "deepspeed", f"deepspeed=={version('deepspeed')}"]
    assert wheels[wheels.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in wheels
    # Every dependency DeepSpeed declares is carried, or comes with torch and transformers.
    from importlib.metadata import requires

    declared = {re.split(r"[<>=!;\[ ]", r)[0].lower() for r in requires("deepspeed") if "extra ==" not in r}
    assert declared - set(gpu_check.DEEPSPEED_NEEDS) == {"numpy", "packaging", "torch", "tqdm"}
    assert set(gpu_check.DEEPSPEED_NEEDS) <= declared


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_the_full_check_asks_for_a_gpu_everywhere_and_for_4_and_2_steps(tmp_path, cpu):
    import yaml

    from rayalign.config import load_config
    from rayalign.gpu_check_full import FITS, PAIRS, full_config
    from rayalign.train.data import Schedule

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(full_config(tmp_path, tmp_path / "model", cpu, 8123)))
    config = load_config(path)  # valid, the check that every engine has a GPU on a GPU cluster included
    assert config.cluster.use_gpu is (not cpu)
    assert {key: engine.gpus_per_engine for key, engine in config.vllm_engines().items()} == (
        {"clair.engine": 0, "serve.engine": 0} if cpu else {"clair.engine": 0.25, "serve.engine": 0.25})
    assert config.eval.base_url == "http://127.0.0.1:8123/v1" and config.serve.port == 8123
    steps = {stage: Schedule(PAIRS, fit["batch_size"], fit["micro_batch_size"], config.train.num_workers, 1, 0)
             for stage, fit in FITS.items()}
    assert {stage: (s.total_steps, s.accumulation, s.dropped_per_epoch) for stage, s in steps.items()} == {
        2: (4, 2, 0), 3: (2, 2, 0)}
