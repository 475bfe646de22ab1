"""Row schemas and file I/O for prompt files and preference-pair files.

Prompt rows: ``id``, ``prompt`` (non-empty text, or chat messages ending with a user message),
optional ``reference`` (a reference answer) and ``metadata`` (an object). Pair rows use TRL's
preference layout: ``id``, ``prompt``, ``chosen``, ``rejected``, optional ``source``,
``reviser``, ``jaccard``, ``levenshtein`` and ``metadata``; either all text, or conversational
(``prompt`` a message list, ``chosen``/``rejected`` lists of assistant messages). One file holds
one form, so each column has one type in Parquet and in Hugging Face ``datasets``.

Rows come back as plain dicts with canonical keys. An integer ``id`` becomes a string; a missing
one is derived from the content ("p-" and the first 16 hex digits of the sha256 of the canonical
JSON of the prompt; "pair-" and that of [prompt, chosen, rejected] for pairs), so equal content
gets an equal, hence duplicate, id. A null value counts as absent. An unknown top-level field is
an error naming it: extra data belongs in ``metadata`` (``rayalign.importers`` moves it there).

Files are JSONL or Parquet: one file, a directory of shards read in name order (every
``.jsonl`` and ``.parquet`` file in it), or a ``datasets`` ``save_to_disk`` directory. Parquet
stores ``metadata`` as a JSON string: a struct column cannot hold objects with differing keys.

No row is dropped silently. A bad row is reported as ``FILE:LINE: reason`` (JSONL, lines
counted from 1 including blank ones) or ``FILE:row N: reason`` (Parquet, ``datasets``). Loaders
raise DataError listing every bad row or, given ``quarantine=PATH``, append each to that JSONL
file as ``{"file", "line", "reason", "raw"}`` and return the good rows.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROLES = ("system", "user", "assistant")
PROMPT_FIELDS = ("id", "prompt", "reference", "metadata")
PAIR_FIELDS = ("id", "prompt", "chosen", "rejected", "source", "reviser", "jaccard",
               "levenshtein", "metadata")
FORMATS = ("jsonl", "parquet")


class DataError(ValueError):
    """Input data a user can fix; the message names the file, row and reason."""


class BadRow(Exception):
    """One row is bad; the exception message is the reason."""


@dataclass
class Record:
    """One row as read from a file; `error` holds the reason once the row is known to be bad."""

    file: str
    line: int
    unit: str  # "line" for JSONL, "row" for Parquet and datasets
    raw: str
    value: dict | None = None
    error: str | None = None

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}:row {self.line}"

    def __str__(self) -> str:
        return f"{self.location}: {self.error}"

    def reject(self) -> dict:
        """The quarantine entry for this bad row."""
        return {"file": self.file, "line": self.line, "reason": self.error, "raw": self.raw}


@dataclass
class ValidationReport:
    path: str
    rows: list[dict] = field(default_factory=list)
    problems: list[Record] = field(default_factory=list)

    @property
    def good(self) -> int:
        return len(self.rows)

    @property
    def bad(self) -> int:
        return len(self.problems)

    @property
    def read(self) -> int:
        return self.good + self.bad

    def error(self) -> DataError:
        plural = "" if self.bad == 1 else "s"
        lines = [f"{self.bad} bad row{plural} in {self.path}", *map(str, self.problems)]
        return DataError("\n".join(lines))


# ---- checking one row ----------------------------------------------------------------------

def normalise_prompt(obj: dict) -> dict:
    """Check one prompt row and return it with canonical keys; raise BadRow if it is bad."""
    _check_fields(obj, PROMPT_FIELDS)
    row_id = _id(obj.get("id"))
    prompt = _prompt(_required(obj, "prompt"))
    row = {"id": row_id or derive_id(prompt, "p-"), "prompt": prompt}
    if obj.get("reference") is not None:
        row["reference"] = _string(obj["reference"], "reference")
    row["metadata"] = _metadata(obj.get("metadata"))
    return row


def normalise_pair(obj: dict) -> dict:
    """Check one pair row and return it with canonical keys; raise BadRow if it is bad."""
    _check_fields(obj, PAIR_FIELDS)
    row_id = _id(obj.get("id"))
    prompt = _prompt(_required(obj, "prompt"))
    chosen = _completion(_required(obj, "chosen"), "chosen")
    rejected = _completion(_required(obj, "rejected"), "rejected")
    if not (isinstance(prompt, list) == isinstance(chosen, list) == isinstance(rejected, list)):
        raise BadRow("prompt, chosen and rejected must be all text or all message lists")
    if chosen == rejected:
        raise BadRow("chosen is identical to rejected")
    row = {"id": row_id or derive_id([prompt, chosen, rejected], "pair-"),
           "prompt": prompt, "chosen": chosen, "rejected": rejected}
    for key in ("source", "reviser"):
        if obj.get(key) is not None:
            row[key] = _string(obj[key], key)
    if obj.get("jaccard") is not None:
        row["jaccard"] = float(_typed(obj["jaccard"], "jaccard", (int, float), "a number"))
    if obj.get("levenshtein") is not None:
        row["levenshtein"] = _typed(obj["levenshtein"], "levenshtein", (int,), "an integer")
    row["metadata"] = _metadata(obj.get("metadata"))
    return row


def normalise_messages(value: list, name: str) -> list[dict]:
    """Check a non-empty list of chat messages and return them as {"role", "content"} dicts."""
    if not value:
        raise BadRow(f"'{name}' is an empty list")
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise BadRow(f"'{name}' message {i} is not an object")
        extra = [k for k, v in message.items() if k not in ("role", "content") and v is not None]
        if extra:
            raise BadRow(f"'{name}' message {i} has unknown key '{extra[0]}'")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise BadRow(f"'{name}' message {i} has no role")
        if role not in ROLES:
            raise BadRow(f"'{name}' message {i} has unknown role {role!r}")
        if content is None:
            raise BadRow(f"'{name}' message {i} has no content")
        if not isinstance(content, str):
            raise BadRow(f"'{name}' message {i} content must be a string, not {json_type(content)}")
        if not content.strip():
            raise BadRow(f"'{name}' message {i} has empty content")
        messages.append({"role": role, "content": content})
    return messages


def derive_id(value: Any, prefix: str) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return prefix + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def is_conversational(row: dict) -> bool:
    return isinstance(row["prompt"], list)


def prompt_messages(row: dict) -> list[dict]:
    """The prompt as chat messages; a text prompt becomes one user message."""
    if is_conversational(row):
        return row["prompt"]
    return [{"role": "user", "content": row["prompt"]}]


def question_text(row: dict) -> str:
    """The prompt's last user message: the question a reference answers (a system message's
    words may well be the answer)."""
    messages = prompt_messages(row)
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def json_type(value: Any) -> str:
    """The JSON name of a value's type, as users see it in their files."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names = {str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_fields(obj: dict, allowed: tuple[str, ...]) -> None:
    unknown = [k for k, v in obj.items() if k not in allowed and v is not None]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise BadRow(f"unknown field{plural} " + ", ".join(f"'{k}'" for k in unknown))


def _required(obj: dict, key: str) -> Any:
    if obj.get(key) is None:
        raise BadRow(f"missing field '{key}'")
    return obj[key]


def _typed(value: Any, key: str, types: tuple[type, ...], what: str) -> Any:
    # bool is an int in Python but never a valid id, count or score here.
    if isinstance(value, bool) or not isinstance(value, types):
        raise BadRow(f"'{key}' must be {what}, not {json_type(value)}")
    return value


def _string(value: Any, key: str) -> str:
    return _typed(value, key, (str,), "a string")


def _id(value: Any) -> str | None:
    if value is None:
        return None
    text = str(_typed(value, "id", (str, int), "a string or an integer"))
    if not text.strip():
        raise BadRow("'id' is empty")
    return text


def _metadata(value: Any) -> dict:
    return {} if value is None else _typed(value, "metadata", (dict,), "an object")


def _text(value: str, key: str) -> str:
    if not value.strip():
        raise BadRow(f"'{key}' is empty")
    return value


def _prompt(value: Any) -> str | list[dict]:
    if isinstance(value, str):
        return _text(value, "prompt")
    if isinstance(value, list):
        messages = normalise_messages(value, "prompt")
        if messages[-1]["role"] != "user":
            raise BadRow(f"'prompt' must end with a user message, not {messages[-1]['role']!r}")
        return messages
    raise BadRow(f"'prompt' must be a string or a list of messages, not {json_type(value)}")


def _completion(value: Any, key: str) -> str | list[dict]:
    if isinstance(value, str):
        return _text(value, key)
    if isinstance(value, list):
        messages = normalise_messages(value, key)
        for i, message in enumerate(messages, 1):
            if message["role"] != "assistant":
                raise BadRow(f"'{key}' message {i} must be from the assistant, not {message['role']!r}")
        return messages
    raise BadRow(f"'{key}' must be a string or a list of messages, not {json_type(value)}")


# ---- checking a whole file -----------------------------------------------------------------

def validate_file(path: str | os.PathLike, kind: str = "pairs", quarantine: str | os.PathLike | None = None,
                  convert: Callable[[dict], dict] | None = None) -> ValidationReport:
    """Read and check every row of `path`; bad rows are collected, never raised.

    `convert` translates each JSON object before it is checked (importers use it for foreign
    layouts). With `quarantine`, bad rows are also appended to that JSONL file.
    """
    normalise = {"prompts": normalise_prompt, "pairs": normalise_pair}[kind]
    report = ValidationReport(str(path))
    first_with_id: dict[str, Record] = {}
    form: tuple[bool, Record] | None = None  # the first good row fixes the file's form
    for record in read_records(path):
        try:
            if record.error:
                raise BadRow(record.error)
            row = normalise(convert(record.value) if convert else record.value)
            conversational = is_conversational(row)
            if form is None:
                form = (conversational, record)
            elif conversational != form[0]:
                names = {True: "conversational", False: "text"}
                raise BadRow(f"{names[conversational]} row in a file of {names[form[0]]} rows "
                             f"(set by {_relative(form[1], record)})")
            first = first_with_id.get(row["id"])
            if first is not None:
                raise BadRow(f"duplicate id {row['id']!r} (first at {_relative(first, record)})")
            first_with_id[row["id"]] = record
            report.rows.append(row)
        except BadRow as bad:
            record.error = str(bad)
            report.problems.append(record)
    if quarantine is not None and report.problems:
        Path(quarantine).parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl((r.reject() for r in report.problems), Path(quarantine), mode="a")
    return report


def load_prompts(path: str | os.PathLike, quarantine: str | os.PathLike | None = None) -> list[dict]:
    """Good prompt rows of `path`; raises DataError listing every bad row unless quarantined."""
    return _load(path, "prompts", quarantine)


def load_pairs(path: str | os.PathLike, quarantine: str | os.PathLike | None = None) -> list[dict]:
    """Good pair rows of `path`; raises DataError listing every bad row unless quarantined."""
    return _load(path, "pairs", quarantine)


def _load(path, kind: str, quarantine) -> list[dict]:
    report = validate_file(path, kind, quarantine)
    if report.problems and quarantine is None:
        raise report.error()
    return report.rows


def _relative(first: Record, later: Record) -> str:
    if first.file == later.file:
        return f"{first.unit} {first.line}"
    return first.location


# ---- reading -------------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Every row of a file or directory of shards, in order, as unchecked Records."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if (path / "dataset_dict.json").exists():
        raise DataError(f"{path} holds a DatasetDict; pass one split directory, such as {path / 'train'}")
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        yield from _read_saved_dataset(path)
        return
    files = [path]
    if path.is_dir():
        # Hidden files are skipped: they include macOS "._" copies with a data suffix.
        files = sorted(p for p in path.iterdir()
                       if p.suffix in (".jsonl", ".parquet") and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path} holds no .jsonl or .parquet files")
    for file in files:
        if file.suffix == ".jsonl":
            yield from _read_jsonl(file)
        elif file.suffix == ".parquet":
            yield from _read_parquet(file)
        else:
            raise DataError(f"{file} has an unsupported file type; expected .jsonl or .parquet")


def _read_jsonl(path: Path) -> Iterator[Record]:
    # Read bytes and decode line by line, so one line of bad UTF-8 costs only that line.
    with open(path, "rb") as f:
        for n, data in enumerate(f, 1):
            raw = data.decode("utf-8", "backslashreplace").rstrip("\r\n")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(str(path), n, "line", raw, error=f"invalid UTF-8 at byte {e.start + 1}")
                continue
            if not text.strip():
                continue
            record = Record(str(path), n, "line", raw)
            try:
                value = json.loads(text.rstrip("\r\n"))  # so error columns point into the line
            except json.JSONDecodeError as e:
                record.error = f"malformed JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(value, dict):
                    record.value = value
                else:
                    record.error = f"not a JSON object (got {json_type(value)})"
            yield record


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    n = 0
    for batch in batches:
        for value in batch.to_pylist():
            n += 1
            yield _table_record(str(path), n, value)


def _read_saved_dataset(path: Path) -> Iterator[Record]:
    import datasets

    for n, value in enumerate(datasets.load_from_disk(str(path)), 1):
        yield _table_record(str(path), n, value)


def _table_record(file: str, n: int, value: dict) -> Record:
    raw = json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value.get("metadata"), str):
        try:
            value["metadata"] = json.loads(value["metadata"])
        except json.JSONDecodeError:
            pass  # left as a string, which the row check reports
    return Record(file, n, "row", raw, value=value)


# ---- writing -------------------------------------------------------------------------------

def write_rows(rows: Iterable[dict], out_dir: str | os.PathLike, fmt: str = "jsonl",
               rows_per_shard: int | None = None) -> list[Path]:
    """Write rows as shards part-00000.<fmt>, ... into `out_dir`; return their paths.

    Each shard appears atomically. Refuses a directory that already holds data files, since
    readers would mix them with the new shards. `datasets` infers JSONL column types from the
    first shard, so it cannot load JSONL shards where a column is null throughout the first
    but not later; Parquet shards carry their schema and have no such limit.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    # Every row gets every column, null where absent, and all Parquet shards share one schema:
    # readers such as `datasets` take the first shard's columns as the schema of all.
    rows = _uniform(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir() if p.suffix in (".jsonl", ".parquet"))
    if existing:
        raise DataError(f"{out} already holds data files ({existing[0]}); remove them or write elsewhere")
    size = rows_per_shard or max(len(rows), 1)
    table = _to_table(rows, out) if fmt == "parquet" else None
    paths = []
    for shard, start in enumerate(range(0, max(len(rows), 1), size)):
        path = out / f"part-{shard:05d}.{fmt}"
        if table is None:
            atomic_write(path, lambda tmp: _write_jsonl(rows[start:start + size], tmp))
        else:
            atomic_write(path, lambda tmp: _write_parquet(table.slice(start, size), tmp))
        paths.append(path)
    return paths


def write_shard(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write one shard atomically; the format follows the suffix (.jsonl or .parquet).

    Rewriting a shard with the same content is harmless, which makes retried writers
    idempotent when the shard's name is derived from its rows.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = _uniform(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        atomic_write(path, lambda tmp: _write_jsonl(rows, tmp))
    else:
        table = _to_table(rows, path)
        atomic_write(path, lambda tmp: _write_parquet(table, tmp))
    return path


def _uniform(rows: Iterable[dict]) -> list[dict]:
    rows = list(rows)
    columns = sorted(dict.fromkeys(key for row in rows for key in row), key=_column_rank)
    return [{key: row.get(key) for key in columns} for row in rows]


def _column_rank(key: str) -> int:
    """Known columns in schema order, then unknown ones (stable), then metadata."""
    order = ("id", "prompt", "reference", "chosen", "rejected", "source", "reviser", "jaccard",
             "levenshtein")
    return order.index(key) if key in order else len(order) + (key == "metadata")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then a rename onto `path`: a reader, or a kill meanwhile, never meets a
    half-written file (a shard, a manifest); the hidden temporary file is never left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_jsonl(rows: Iterable[dict], path: Path, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _to_table(rows: list[dict], where: Path):
    import pyarrow as pa

    try:
        return pa.Table.from_pylist([{k: _parquet_value(k, v) for k, v in row.items()} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"cannot write {where} as Parquet: {e}") from e


def _parquet_value(key: str, value: Any) -> Any:
    if key == "metadata" and value is not None:
        return json.dumps(value, ensure_ascii=False)
    return value


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)
