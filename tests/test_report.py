"""`rayalign report`: the page checked through a real headless Chromium (selenium + chromedriver)."""

import base64
import json
import shutil
from pathlib import Path

import pytest

from rayalign import records
from rayalign.report import word_diff, write_report
from rayalign.train.logs import plot_curves
from tests.conftest import ROOT

HOSTILE = '<script>window.__pwned = 1</script><b>bold</b> & <img src=x onerror="window.__pwned=2">'


def test_word_diff_marks_changed_words_and_escapes():
    assert word_diff("The cat sat on the mat.", "The cat sat on a mat.") == \
        "The cat sat on <del>the</del><ins>a</ins> mat."
    assert word_diff("<b>x</b>", "<b>y</b>") == "&lt;b&gt;<del>x</del><ins>y</ins>&lt;/b&gt;"


def make_run(run: Path) -> None:
    clair = run / "clair"
    pairs = [
        {"id": "cat", "prompt": "Where is the cat?", "chosen": "The cat sat on a mat.",
         "rejected": "The cat sat on the mat.", "source": "clair", "reviser": "verifier", "jaccard": 0.8,
         "levenshtein": 3, "metadata": {"reviser_output": "<revision>The cat sat on a mat.</revision>"}},
        {"id": "evil", "prompt": HOSTILE, "chosen": HOSTILE + " fixed", "rejected": HOSTILE, "source": "clair",
         "reviser": "verifier", "jaccard": 0.9, "levenshtein": 6, "metadata": {}},
    ] + [{"id": f"j{i}", "prompt": f"Question {i}", "chosen": f"answer {i} good", "rejected": f"answer {i} bad",
          "source": "onpolicy_judge", "reviser": "verifier", "jaccard": 0.5, "levenshtein": 4, "metadata": {}}
         for i in range(3)]
    records.write_shard(pairs, clair / "pairs" / "part-a.jsonl")
    records.write_shard([{"id": "r1", "reason": "identical", "detail": "no change", "raw": HOSTILE, "prompt": "q",
                          "answer": "a"}], clair / "rejects" / "part-b.jsonl")
    (clair / "manifest.json").write_text("{}")
    train = run / "train"
    train.mkdir(parents=True)
    metrics = [{"step": s, "loss": 1 - s / 10, "rewards/chosen": s / 10, "rewards/rejected": -s / 10,
                "rewards/margins": s / 5, "rewards/accuracies": 1.0, "logps/chosen": -s, "logps/rejected": -2 * s,
                "grad_norm": 1.0, "learning_rate": 1e-5} for s in range(1, 6)]
    (train / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    plot_curves(metrics, train / "curves.png")  # as the training stage draws them
    ev = run / "eval"
    ev.mkdir()
    (ev / "manifest.json").write_text(json.dumps({"kind": "exact", "data": "held-out", "results": {
        "base": {"accuracy": 0.452, "ci95": [0.409, 0.496], "correct": 226, "scored": 500, "failed": 0}}}))
    (ev / "examples.jsonl").write_text(json.dumps({"model": "base", "answer": HOSTILE, "correct": False}) + "\n")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_report_in_a_real_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run = tmp_path / "run"
    make_run(run)
    page = write_report(run)
    text = page.read_text()
    assert "<script>window.__pwned" not in text and "http" not in text.replace("http://www.w3", "")
    browser.get(page.as_uri())

    # The diff of the known pair highlights exactly the changed word.
    row = browser.find_element(By.XPATH, "//table[@id='pairs']//tr[td[1]='cat']")
    assert [e.text for e in row.find_elements(By.TAG_NAME, "del")] == ["the"]
    assert [e.text for e in row.find_elements(By.TAG_NAME, "ins")] == ["a"]

    # Untrusted text shows literally and runs nothing.
    evil = browser.find_element(By.XPATH, "//table[@id='pairs']//tr[td[1]='evil']")
    assert HOSTILE in evil.find_elements(By.TAG_NAME, "td")[2].text
    assert browser.execute_script("return window.__pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, "#pairs b, #pairs img, #rejects img, #examples img") == []

    def visible():
        return [r.find_element(By.TAG_NAME, "td").text
                for r in browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr") if r.is_displayed()]

    assert sorted(visible()) == ["cat", "evil", "j0", "j1", "j2"]
    Select(browser.find_element(By.ID, "source-filter")).select_by_value("onpolicy_judge")
    assert sorted(visible()) == ["j0", "j1", "j2"]
    Select(browser.find_element(By.ID, "source-filter")).select_by_value("")
    # Sorting by the Jaccard column, twice: ascending, then descending.
    header = browser.find_element(By.XPATH, "//table[@id='pairs']//th[text()='Jaccard']")
    header.click()
    assert visible()[-1] == "evil"
    header.click()
    assert visible()[0] == "evil"

    assert "45.2%" in browser.find_element(By.TAG_NAME, "body").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png;base64,']")) == 2
    # The training curves are the stage's own curves.png, carried in the page, not drawn again.
    curves = browser.find_element(By.CSS_SELECTOR, "img[alt='training curves']").get_attribute("src")
    assert base64.b64decode(curves.split(",", 1)[1]) == (run / "train" / "curves.png").read_bytes()
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "report.png"))


def test_report_of_a_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    from rayalign.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"rayalign report: error: {tmp_path / 'nope'}: not found"
