import hashlib
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayalign.importers import import_pairs
from rayalign.records import (DataError, derive_id, is_conversational, load_pairs, load_prompts,
                              prompt_messages, validate_file, write_rows)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_lines(path, lines):
    """Write JSONL lines given as dicts (dumped) or raw str/bytes (written as is)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")


def raw_line(line):
    return json.dumps(line) if isinstance(line, dict) else line


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# line number -> (line, expected reason); None marks a good row or a skipped blank line.
TEXT_PAIRS = [
    ({"id": "a", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Bleu."}, None),
    ("", None),
    ('{"id": "b", "prompt": "x"', "malformed JSON (Expecting ',' delimiter at column 26)"),
    ('"just a string"', "not a JSON object (got string)"),
    (b'{"id": "u", "prompt": "caf\xe9", "chosen": "x", "rejected": "y"}', "invalid UTF-8 at byte 27"),
    ({"id": "c", "prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    ({"id": "d", "prompt": 5, "chosen": "c", "rejected": "r"},
     "'prompt' must be a string or a list of messages, not number"),
    ({"id": "e", "prompt": "p", "chosen": "c", "rejected": "r", "metadata": "x"},
     "'metadata' must be an object, not string"),
    ({"id": 1.5, "prompt": "p", "chosen": "c", "rejected": "r"},
     "'id' must be a string or an integer, not number"),
    ({"id": True, "prompt": "p", "chosen": "c", "rejected": "r"},
     "'id' must be a string or an integer, not boolean"),
    ({"id": "f", "prompt": "p", "chosen": " \n\t", "rejected": "r"}, "'chosen' is empty"),
    ({"id": "g", "prompt": "p", "chosen": "c", "rejected": "r", "foo": 1}, "unknown field 'foo'"),
    ({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}, "duplicate id 'a' (first at line 1)"),
    ({"id": "h", "prompt": "p", "chosen": "same", "rejected": "same"}, "chosen is identical to rejected"),
    ({"id": "i", "prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
     "conversational row in a file of text rows (set by line 1)"),
    ({"id": 7, "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Bye.", "source": "clair",
      "jaccard": 0, "levenshtein": 3, "reviser": None}, None),
    ("   ", None),
    ({"id": "j", "prompt": "p", "chosen": "c", "rejected": "r", "jaccard": "0.5"},
     "'jaccard' must be a number, not string"),
    ({"id": "k", "prompt": "p", "chosen": "c", "rejected": "r", "levenshtein": 3.0},
     "'levenshtein' must be an integer, not number"),
    ({"id": "l", "prompt": "p", "chosen": [assistant("c")], "rejected": "r"},
     "prompt, chosen and rejected must be all text or all message lists"),
]

GOOD_TEXT_PAIRS = [
    {"id": "a", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Bleu.", "metadata": {}},
    {"id": "7", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Bye.", "source": "clair",
     "jaccard": 0.0, "levenshtein": 3, "metadata": {}},
]


def bad_lines(cases):
    return [(n, line, reason) for n, (line, reason) in enumerate(cases, 1) if reason]


def test_every_bad_text_pair_is_reported_with_file_line_and_reason(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [line for line, _ in TEXT_PAIRS])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    expected = [f"16 bad rows in {path}"] + [f"{path}:{n}: {reason}" for n, _, reason in bad_lines(TEXT_PAIRS)]
    assert str(info.value).splitlines() == expected


def test_quarantine_returns_good_rows_and_keeps_every_bad_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rejects = tmp_path / "out" / "rejects.jsonl"
    write_lines(path, [line for line, _ in TEXT_PAIRS])

    report = validate_file(path, "pairs", quarantine=rejects)
    assert (report.read, report.good, report.bad) == (18, 2, 16)
    assert report.rows == GOOD_TEXT_PAIRS
    assert load_pairs(path, quarantine=rejects) == GOOD_TEXT_PAIRS

    expected = [{"file": str(path), "line": n, "reason": reason, "raw": raw_line(line)}
                for n, line, reason in bad_lines(TEXT_PAIRS) if not isinstance(line, bytes)]
    expected.insert(2, {"file": str(path), "line": 5, "reason": "invalid UTF-8 at byte 27",
                        "raw": '{"id": "u", "prompt": "caf\\xe9", "chosen": "x", "rejected": "y"}'})
    # Appended, never truncated: the second call adds the same rows again.
    assert read_jsonl(rejects) == expected + expected


CHAT_PAIRS = [
    ({"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?")],
      "chosen": [assistant("4")], "rejected": [assistant("5")]}, None),
    ({"prompt": ["hi"], "chosen": [assistant("c")], "rejected": [assistant("r")]},
     "'prompt' message 1 is not an object"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": [assistant("c")], "rejected": [assistant("r")]},
     "'prompt' message 1 has unknown role 'bot'"),
    ({"prompt": [{"role": "user"}], "chosen": [assistant("c")], "rejected": [assistant("r")]},
     "'prompt' message 1 has no content"),
    ({"prompt": [user("a"), user(" ")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
     "'prompt' message 2 has empty content"),
    ({"prompt": [user("a"), assistant("b")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
     "'prompt' must end with a user message, not 'assistant'"),
    ({"prompt": [user("a")], "chosen": [user("c")], "rejected": [assistant("r")]},
     "'chosen' message 1 must be from the assistant, not 'user'"),
    ({"prompt": [], "chosen": [assistant("c")], "rejected": [assistant("r")]}, "'prompt' is an empty list"),
    ({"prompt": [user("a")], "chosen": [{"role": "assistant", "content": 3}], "rejected": [assistant("r")]},
     "'chosen' message 1 content must be a string, not number"),
    ({"prompt": "a", "chosen": "c", "rejected": "r"}, "text row in a file of conversational rows (set by line 1)"),
    ({"prompt": [{"role": "user", "content": "a", "name": "x"}], "chosen": [assistant("c")],
      "rejected": [assistant("r")]}, "'prompt' message 1 has unknown key 'name'"),
    ({"prompt": [user("2+2?")], "chosen": "4", "rejected": "5"}, "prompt, chosen and rejected must be all text or all message lists"),
]


def test_every_bad_conversational_pair_is_reported(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_lines(path, [line for line, _ in CHAT_PAIRS])
    report = validate_file(path, "pairs")
    assert [str(r) for r in report.problems] == [f"{path}:{n}: {reason}" for n, _, reason in bad_lines(CHAT_PAIRS)]
    first = CHAT_PAIRS[0][0]
    assert report.rows == [{"id": derive_id([first["prompt"], first["chosen"], first["rejected"]], "pair-"),
                            **first, "metadata": {}}]


def test_bad_prompt_rows_and_derived_duplicate_ids(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_lines(path, [
        {"id": 12, "prompt": "What is 2+2?", "reference": "4", "metadata": {"topic": "math"}},
        {"prompt": "p", "reference": 4},
        {"prompt": ""},
        {"id": "x"},
        {"prompt": "Same text."},
        {"prompt": "Same text.", "metadata": {"n": 2}},
        {"prompt": [user("chat")]},
    ])
    with pytest.raises(DataError) as info:
        load_prompts(path)
    same = "p-" + hashlib.sha256(b'"Same text."').hexdigest()[:16]
    assert str(info.value).splitlines() == [
        f"5 bad rows in {path}",
        f"{path}:2: 'reference' must be a string, not number",
        f"{path}:3: 'prompt' is empty",
        f"{path}:4: missing field 'prompt'",
        f"{path}:6: duplicate id '{same}' (first at line 5)",
        f"{path}:7: conversational row in a file of text rows (set by line 1)",
    ]
    rows = load_prompts(path, quarantine=tmp_path / "rejects.jsonl")
    assert rows == [
        {"id": "12", "prompt": "What is 2+2?", "reference": "4", "metadata": {"topic": "math"}},
        {"id": same, "prompt": "Same text.", "metadata": {}},
    ]


def test_derived_ids_are_stable_and_depend_only_on_content():
    # Pinned values: a change here silently renames every stored prompt.
    assert derive_id("Same text.", "p-") == "p-" + hashlib.sha256(b'"Same text."').hexdigest()[:16]
    assert derive_id("Hello", "p-") == "p-c25bf945aaff8fe1"
    assert derive_id([user("Hello")], "p-") == "p-" + hashlib.sha256(
        b'[{"content":"Hello","role":"user"}]').hexdigest()[:16]
    code = "from rayalign.records import derive_id; print(derive_id('Hello', 'p-'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "p-c25bf945aaff8fe1"


def test_prompt_helpers():
    assert prompt_messages({"prompt": "Hi"}) == [user("Hi")]
    chat = [{"role": "system", "content": "s"}, user("Hi")]
    assert prompt_messages({"prompt": chat}) == chat
    assert is_conversational({"prompt": chat}) and not is_conversational({"prompt": "Hi"})


CHAT_ROWS = [
    {"id": "c1", "prompt": [{"role": "system", "content": "Be kind."}, user("Hi")],
     "chosen": [assistant("Hello!")], "rejected": [assistant("What?")], "source": "clair",
     "reviser": "gpt", "jaccard": 0.25, "levenshtein": 4, "metadata": {"turns": 1}},
    {"id": "c2", "prompt": [user("Bye")], "chosen": [assistant("Goodbye.")],
     "rejected": [assistant("No.")], "metadata": {}},
]


@pytest.mark.parametrize("rows", [GOOD_TEXT_PAIRS, CHAT_ROWS], ids=["text", "conversational"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_round_trip(tmp_path, rows, fmt):
    paths = write_rows(rows, tmp_path / "out", fmt=fmt)
    assert paths == [tmp_path / "out" / f"part-00000.{fmt}"]
    assert load_pairs(tmp_path / "out") == rows
    assert load_pairs(paths[0]) == rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_keep_order_and_counts(tmp_path, fmt):
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?", "chosen": f"Good {i}", "rejected": f"Bad {i}",
             "metadata": {"i": i}} for i in range(25)]
    paths = write_rows(rows, tmp_path / "out", fmt=fmt, rows_per_shard=10)
    assert [p.name for p in paths] == [f"part-0000{i}.{fmt}" for i in range(3)]
    assert [len(load_pairs(p)) for p in paths] == [10, 10, 5]
    assert load_pairs(tmp_path / "out") == rows
    assert sorted(os.listdir(tmp_path / "out")) == [p.name for p in paths]


def test_bad_row_in_a_later_shard_names_that_shard_and_its_own_row(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "q", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(15)]
    rows[12]["chosen"] = rows[12]["rejected"] = "same"
    rows[3]["id"] = "r13"
    paths = write_rows(rows, tmp_path / "out", fmt="parquet", rows_per_shard=10)
    report = validate_file(tmp_path / "out")
    assert [str(r) for r in report.problems] == [
        f"{paths[1]}:row 3: chosen is identical to rejected",
        f"{paths[1]}:row 4: duplicate id 'r13' (first at {paths[0]}:row 4)",
    ]
    assert json.loads(report.problems[0].raw) == {"id": "r12", "prompt": "q", "chosen": "same", "rejected": "same"}


def test_atomic_write_leaves_no_temp_files_and_refuses_to_mix(tmp_path):
    rows = [{"id": str(i), "prompt": "q", "chosen": "c", "rejected": "r"} for i in range(10)]
    with pytest.raises(TypeError):
        write_rows(rows + [{"id": "x", "prompt": {1, 2}}], tmp_path / "out", rows_per_shard=10)
    # The first shard is complete; the failed second one left neither a shard nor a temp file.
    assert os.listdir(tmp_path / "out") == ["part-00000.jsonl"]
    assert len(load_pairs(tmp_path / "out")) == 10
    with pytest.raises(DataError, match=r"already holds data files \(part-00000.jsonl\)"):
        write_rows(rows, tmp_path / "out")


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv has an unsupported file type"):
        load_pairs(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no .jsonl or .parquet files"):
        load_pairs(tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_datasets_loads_written_pairs(tmp_path, fmt):
    datasets = pytest.importorskip("datasets")
    for rows, name in ((GOOD_TEXT_PAIRS, "text"), (CHAT_ROWS, "chat")):
        # One row per Parquet shard checks that all shards share a schema; see write_rows for
        # why JSONL shards cannot promise that to `datasets`.
        paths = write_rows(rows, tmp_path / name, fmt=fmt, rows_per_shard=1 if fmt == "parquet" else None)
        ds = datasets.load_dataset("parquet" if fmt == "parquet" else "json",
                                   data_files=[str(p) for p in paths], split="train",
                                   cache_dir=str(tmp_path / "cache"))
        assert ds.column_names == list(max(rows, key=len))  # the fullest row has every column, in order
        loaded = [{k: v for k, v in row.items() if v is not None} for row in ds]
        if fmt == "parquet":  # metadata is a JSON string column in Parquet
            loaded = [{**row, "metadata": json.loads(row["metadata"])} for row in loaded]
        assert loaded == rows


def test_saved_dataset_directory_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{k: v for k, v in row.items() if k != "metadata"} for row in CHAT_ROWS]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_pairs(tmp_path / "ds") == [{**row, "metadata": {}} for row in rows]


def uf_row(prompt_id, question, chosen, rejected, scores=(8.0, 3.0)):
    return {"prompt": question, "prompt_id": prompt_id,
            "chosen": [user(question), assistant(chosen)],
            "rejected": [user(question), assistant(rejected)],
            "messages": [user(question), assistant(chosen)],
            "score_chosen": scores[0], "score_rejected": scores[1]}


def test_ultrafeedback_import(tmp_path):
    source = [
        uf_row("abc", "Name a fruit.", "Apple.", "Carrot.", scores=(9.0, 2.0)),
        uf_row("abc", "Name a fruit.", "Banana.", "Potato.", scores=(8.5, 4.0)),
        uf_row("def", "Capital of France?", "Paris.", "Lyon."),
        uf_row("ghi", "Largest planet?", "Jupiter.", "Mars."),
    ]
    source[2]["rejected"][0] = user("Capital of Italy?")
    source[3]["prompt"] = "Smallest planet?"
    src = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(source), src)
    rejects = tmp_path / "rejects.jsonl"

    summary = import_pairs(src, tmp_path / "out", quarantine=rejects)

    assert (summary.layout, summary.read, summary.good, summary.bad) == ("ultrafeedback", 4, 2, 2)
    assert summary.paths == [tmp_path / "out" / "part-00000.jsonl"]
    assert load_pairs(tmp_path / "out") == [
        {"id": "abc", "prompt": [user("Name a fruit.")], "chosen": [assistant("Apple.")],
         "rejected": [assistant("Carrot.")], "source": "offpolicy",
         "metadata": {"score_chosen": 9.0, "score_rejected": 2.0}},
        {"id": "abc-1", "prompt": [user("Name a fruit.")], "chosen": [assistant("Banana.")],
         "rejected": [assistant("Potato.")], "source": "offpolicy",
         "metadata": {"score_chosen": 8.5, "score_rejected": 4.0}},
    ]
    assert [(r["file"], r["line"], r["reason"], json.loads(r["raw"])["prompt_id"]) for r in read_jsonl(rejects)] == [
        (str(src), 3, "chosen and rejected conversations differ before the final answer", "def"),
        (str(src), 4, "'prompt' does not match the first user message of chosen", "ghi"),
    ]


def test_import_without_quarantine_raises_and_writes_nothing(tmp_path):
    src = tmp_path / "uf.jsonl"
    write_lines(src, [uf_row("a", "Q?", "Yes.", "No."), uf_row("b", "Q2?", "Same.", "Same.")])
    with pytest.raises(DataError) as info:
        import_pairs(src, tmp_path / "out", layout="ultrafeedback")
    assert str(info.value) == f"1 bad row in {src}\n{src}:2: chosen is identical to rejected"
    assert not (tmp_path / "out").exists()


def test_implicit_import_of_hh_text(tmp_path):
    first = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    src = tmp_path / "hh.jsonl"
    write_lines(src, [
        {"chosen": first + " The answer is 4.", "rejected": first + " The answer is 5."},
        {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.", "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No.",
         "id": "h2", "split": "test"},
        {"chosen": "Plain text A", "rejected": "Plain text B"},
    ])
    summary = import_pairs(src, tmp_path / "out", fmt="parquet", quarantine=tmp_path / "rejects.jsonl")
    assert (summary.layout, summary.good, summary.bad) == ("implicit", 2, 1)
    rows = load_pairs(tmp_path / "out")
    assert rows[1] == {"id": "h2", "prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "chosen": " Blue.",
                       "rejected": " No.", "source": "offpolicy", "metadata": {"split": "test"}}
    assert rows[0]["prompt"] == first
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (" The answer is 4.", " The answer is 5.")
    assert rows[0]["id"] == derive_id([first, " The answer is 4.", " The answer is 5."], "pair-")
    assert [(r["line"], r["reason"]) for r in read_jsonl(tmp_path / "rejects.jsonl")] == [
        (3, "no '\\n\\nAssistant:' in the text shared by chosen and rejected")]


def test_implicit_import_of_conversations_and_trl_import(tmp_path):
    src = tmp_path / "implicit.jsonl"
    write_lines(src, [{"id": "m1", "chosen": [user("Hi"), assistant("Hello!")],
                       "rejected": [user("Hi"), assistant("Go away.")]}])
    import_pairs(src, tmp_path / "out1")
    assert load_pairs(tmp_path / "out1") == [
        {"id": "m1", "prompt": [user("Hi")], "chosen": [assistant("Hello!")],
         "rejected": [assistant("Go away.")], "source": "offpolicy", "metadata": {}}]

    src = tmp_path / "trl.jsonl"
    write_lines(src, [{"id": 3, "prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 7,
                       "source": "onpolicy_judge", "metadata": {"k": 1}}])
    summary = import_pairs(src, tmp_path / "out2")
    assert summary.layout == "trl"
    assert load_pairs(tmp_path / "out2") == [
        {"id": "3", "prompt": "Q", "chosen": "A", "rejected": "B", "source": "onpolicy_judge",
         "metadata": {"k": 1, "score_chosen": 7}}]


def test_import_is_fast_and_leaves_pyarrow_unloaded():
    code = ("import sys, time; t = time.perf_counter(); import rayalign.records, rayalign.importers; "
            "print(time.perf_counter() - t, 'pyarrow' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, pyarrow_loaded, datasets_loaded = out.stdout.split()
    assert float(seconds) < 0.5
    assert (pyarrow_loaded, datasets_loaded) == ("False", "False")
