"""How a stage's output records what made it, by one rule for every stage.

- `fingerprint(*parts)`: a short hash of JSON-able parts (the config fields that shape an output),
  `digest(value)` the whole one;
- `tree_digest(path)`: the content of a file or of the files under a folder (a model, a data set);
  files over 64 MiB count by their size and their first and last 8 MiB, so multi-GB weights are
  not read in full; a path that does not exist is taken to be a hub name and counts by its name;
- `guard(out, fields)`: `<out>/stage.json` keeps the fields that shaped the output; a rerun with
  the same fields continues it, one with other fields is refused, naming every key that changed
  with its old and new value;
- `finish(out, stage, key, summary)`: `<out>/manifest.json`, the last file a stage writes: the
  stage, its key, when it finished and its summary; `finished(out, key)` reads it back, so an
  output with a manifest of the same key is complete and reused as it is.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from rayalign.config import ConfigError
from rayalign.records import atomic_write

LARGE_FILE = 64 * 2**20
SAMPLE = 8 * 2**20
RECORD = "stage.json"
MANIFEST = "manifest.json"
# What `finish` adds to a stage's summary.
ENVELOPE = ("stage", "key", "finished")


def digest(value) -> str:
    """The SHA-256 of a JSON-able value, keys sorted: the whole hash, where a cache keeps it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(*parts) -> str:
    return digest(parts)[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= LARGE_FILE:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
        else:
            h.update(f"size={size}".encode())
            h.update(f.read(SAMPLE))
            f.seek(size - SAMPLE)
            h.update(f.read(SAMPLE))
    return h.hexdigest()


def tree_digest(path: str | Path, names: tuple[str, ...] | None = None) -> str:
    """Digest of a file, or of the non-hidden files under a directory (only `names` if given);
    anything else is taken to be a hub name. A directory's own `manifest.json` (the record a
    stage keeps of it, whose time changes when the stage finishes again) is not its content."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "name:" + str(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts) and p != path / MANIFEST)
    if names is not None:
        files = [p for p in files if p.name in names and p.parent == path]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}={file_digest(p)}\n".encode())
    return h.hexdigest()


def guard(out: Path, fields: dict, write: bool = True, legacy: str | None = None, added: tuple[str, ...] = ()) -> None:
    """Refuse to add to `out` when it was made with other `fields` (dotted config keys and their
    values); otherwise record them (unless `write` is false: a dry run leaves no trace). `legacy`
    names the file an earlier version kept the same fields in, without their section prefix;
    `added`, fields a later version added, which an output recorded without them is not refused
    for."""
    saved = _saved(out, legacy, next(iter(fields), "").split(".")[0])
    if saved is not None:
        changed = [f"{key} ({_show(saved.get(key))} -> {_show(fields.get(key))})"
                   for key in sorted(set(saved) | set(fields))
                   if saved.get(key) != fields.get(key) and not (key in added and key not in saved)]
        if changed:
            raise ConfigError(f"{out} holds output made with other settings: {'; '.join(changed)}. "
                              f"Put back the old values, or use a new run_dir (or output), or remove {out}")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD).write_text(json.dumps(fields, indent=2, sort_keys=True))


def finish(out: Path, stage: str, key: str, summary: dict) -> dict:
    """Write `<out>/manifest.json` whole (a kill or a reader meanwhile never meets half a file):
    the stage's name, its key (the fingerprint of what shaped the output), when it finished, and
    its summary. A stage writes it last, after everything the summary describes."""
    clash = sorted(set(summary) & set(ENVELOPE))
    if clash:
        raise ValueError(f"a {stage} summary may not hold {clash}: the manifest's own fields")
    record = {"stage": stage, "key": key,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **summary}
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out) / MANIFEST, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    return record


def finished(out: Path, key: str | None = None) -> dict | None:
    """The manifest of `out` when it has one (made with `key`, if given), else None."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if key is None or record.get("key") == key else None


def summary_of(record: dict) -> dict:
    """A manifest without what `finish` added: the stage's own summary."""
    return {k: v for k, v in record.items() if k not in ENVELOPE}


def flatten(prefix: str, value) -> dict:
    """{"a": {"b": 1}} under prefix "x" -> {"x.a.b": 1}."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, inner in value.items():
        flat.update(flatten(f"{prefix}.{key}", inner))
    return flat


def _saved(out: Path, legacy: str | None, section: str) -> dict | None:
    if (out / RECORD).exists():
        return json.loads((out / RECORD).read_text())
    if legacy and (out / legacy).exists():
        old = json.loads((out / legacy).read_text())
        old.pop("judge", None)  # a key that chose nothing (the reviser judges)
        return flatten(section, old)
    return None


def _show(value) -> str:
    return "unset" if value is None else json.dumps(value)
