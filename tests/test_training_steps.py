"""benchmarks/training_steps.py and scripts/gpu_check.sh: the step-time benchmark's report, and the
GPU check rehearsed on CPU, so that a session with a GPU can spend its minutes measuring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import training_steps  # noqa: E402  (a script, imported for its report)


def result(step_ms, bytes_ratio=None, compression=1.0):
    return {"step_ms": step_ms, "tokens_per_s": 1000.0, "compression": compression,
            "a2a_bytes_ratio": bytes_ratio, "final_loss": 10.3}


def summary(nproc, runs):
    return {"command": "python benchmarks/training_steps.py", "environment": f"{nproc} x GPU", "device": "cuda",
            "dtype": "bf16", "nproc": nproc, "flags": "--hidden-size 1024", "tokens_per_rank_micro_batch": 8192,
            "settings": {name: "--lsh" for name in runs}, "runs": runs}


def test_stock_comes_first_whatever_the_order_asked():
    assert training_steps.parse_args(["--settings", "default", "stock"]).settings == ["stock", "default"]
    assert training_steps.parse_args(["--settings", "default"]).settings == ["stock", "default"]


def test_rows_give_the_median_over_repeats_its_spread_and_the_ratio_to_stock():
    rows = training_steps.table(summary(2, {
        "stock": [result(100.0), result(110.0), result(90.0)],
        "default": [result(95.0, 0.3, 0.6), result(99.0, 0.3, 0.6), result(120.0, 0.3, 0.6)]}))
    assert rows[2] == "| stock | 100.0 (90.0-110.0) | 1.000x | 1000 | 1.000 | 1.000 | 10.300 |"
    assert rows[3] == "| default | 99.0 (95.0-120.0) | 0.990x | 1000 | 0.600 | 0.300 | 10.300 |"


def test_on_one_process_nothing_crosses_and_the_bytes_say_so():
    rows = training_steps.table(summary(1, {"stock": [result(100.0)], "default": [result(104.0, None, 0.6)]}))
    assert rows[2].split(" | ")[5] == "-" and rows[3].split(" | ")[5] == "-"
    assert "| 1.040x |" in rows[3]


def test_the_doc_has_a_section_per_summary_or_says_how_to_measure(tmp_path):
    training_steps.write_doc(tmp_path, tmp_path / "doc.md")
    assert "Nothing measured yet" in (tmp_path / "doc.md").read_text()
    (tmp_path / "cuda-bf16-1proc.json").write_text(json.dumps(summary(1, {"stock": [result(100.0)]})))
    training_steps.write_doc(tmp_path, tmp_path / "doc.md")
    text = (tmp_path / "doc.md").read_text()
    assert "## cuda-bf16-1proc" in text and "| stock | 100.0 (100.0-100.0) | 1.000x |" in text


@pytest.mark.slow
def test_the_gpu_check_rehearses_every_step_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    finished = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "no CUDA" in (tmp_path / "environment.log").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in (tmp_path / "training_steps.log").read_text().splitlines() if line.startswith("| ")}
    assert {"stock", "default"} <= set(rows)
    gemm = (tmp_path / "gemm.log").read_text()
    assert all(f"{local} local experts: sequential" in gemm for local in (8, 32, 64))
    assert "done: iteration 20" in (tmp_path / "speed_flags.log").read_text()
    assert float(rows["stock"][5]) == 1.0
    assert 0 < float(rows["default"][4]) <= 1 and float(rows["default"][5]) < 0.53  # 8-bit rows, fewer of them
    assert "overhead" in (tmp_path / "lsh_overhead.log").read_text()
    assert not list(tmp_path.glob("*.json"))  # a rehearsal keeps no summaries
