"""benchmarks/gpu_check.py end to end in its CPU mode (tiny random models, smallest sizes).

The GPU numbers themselves only come from a GPU machine (scripts/gpu_check_remote.sh); this keeps the
script runnable: every section runs or says why not, the fp16 correctness check passes, and the one
table comes out last, also to --table/--json.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check

SMALL = [
    "--device", "cpu", "--arch", "tiny", "--dtype", "float16",
    "--size", "64", "--check-size", "64", "--sdxl-size", "64",
    "--steps", "3", "--check-steps", "3", "--requests", "2", "--check-requests", "3",
    "--sdxl-requests", "2", "--bench-iters", "1", "--skip", "compile",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")
    ]


def test_cpu_mode_end_to_end(tmp_path, capsys):
    table_path, json_path = tmp_path / "table.md", tmp_path / "check.json"
    code = gpu_check.main([*SMALL, "--table", str(table_path), "--json", str(json_path)])
    out = capsys.readouterr().out

    assert code == 0, out
    table = out[out.index("## gpu_check") :]
    assert table.rstrip().endswith(table_path.read_text(encoding="utf-8").rstrip())  # the table is last
    rows = _table_rows(table)
    by_measure = {row[1]: row for row in rows[1:]}
    correctness = next(row for row in rows if row[0] == "a" and row[4] in ("PASS", "FAIL"))
    assert correctness[4] == "PASS", correctness
    assert any(row[0] == "a" and "exact" in row[1] for row in rows)
    assert any(row[0] == "b" and "stock, one at a time" in row[1] and "img/s" in row[2] for row in rows)
    assert any(row[0] == "b" and "stock grouped" in row[1] and "img/s" in row[2] for row in rows)
    assert any(row[0] == "b" and row[1].startswith("ratio engine / stock one") for row in rows)
    assert any(row[0] == "c" and "16 rows" in row[1] for row in rows)
    assert "SKIPPED: --skip compile" in by_measure["images/s, torch.compile"][4]
    assert any(row[0] == "d" and "SDXL" in row[1] and "img/s" in row[2] for row in rows)
    assert not any(row[4].startswith("ERROR") for row in rows), table

    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["figures"]["correctness"]["pass"] is True
    assert report["figures"]["sd_engine"]["images_per_s"] > 0
    assert report["figures"]["sd_ratios"]["engine_over_stock_one"] > 0


def test_a_spent_budget_skips_the_optional_sections_and_still_prints_the_table(capsys):
    code = gpu_check.main([*SMALL, "--budget-s", "1", "--reserve-s", "0", "--skip", "sdxl"])
    out = capsys.readouterr().out

    rows = _table_rows(out[out.index("## gpu_check") :])
    assert code == 0
    assert any(row[0] == "a" and row[4] == "PASS" for row in rows)  # correctness always runs
    skipped = [row for row in rows if row[4].startswith("SKIPPED")]
    assert any(row[0] == "b" and "budget" in row[4] for row in skipped), skipped
    assert any(row[0] == "d" and "--skip sdxl" in row[4] for row in skipped), skipped
