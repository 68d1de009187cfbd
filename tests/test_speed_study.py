"""The speed study's bookkeeping: which runs it plans, and how it turns perplexity curves into wall
times to stock's final perplexity and the issue's verdicts (no cluster needed)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import speed_study  # noqa: E402  (a script that imports its siblings as top-level modules)
from speed_study import Run, plan, reach_cell, targets, time_to_reach  # noqa: E402


def run(setting, curve, rate=1000, repeat=0):
    return Run(setting, rate, repeat, 300 if setting == "stock" else 375, 300,
               {"ppl_curve": curve, "final_ppl": curve[-1][1] if setting == "stock" else 0.0})


def test_stock_runs_the_schedule_and_the_others_a_quarter_longer_interleaved_by_repeat():
    runs = plan(300, repeats=3, slow_repeats=1)
    assert [r.key for r in runs[:10]] == ["stock-1000mbit-0", "mxfp8-1000mbit-0", "default-1000mbit-0",
                                          "bisect-1000mbit-0", "bisect-0.2-1000mbit-0", "stock-100mbit-0",
                                          "mxfp8-100mbit-0", "default-100mbit-0", "bisect-100mbit-0",
                                          "bisect-0.2-100mbit-0"]
    assert len(runs) == 5 * 3 + 5
    assert {(r.setting, r.iters) for r in runs} == {("stock", 300), ("mxfp8", 375), ("default", 375),
                                                    ("bisect", 375), ("bisect-0.2", 375)}
    assert all(r.schedule_iters == 300 and "--lr-decay-iters" in r.flags() for r in runs)
    assert all(r.flags()[r.flags().index("--lr-decay-iters") + 1] == "300" for r in runs)


def test_time_to_reach_interpolates_between_evaluations_and_is_none_when_never_reached():
    curve = [(0, 1000.0), (10, 400.0), (20, 200.0)]
    assert time_to_reach(curve, 300.0) == pytest.approx(15.0)
    assert time_to_reach(curve, 1000.0) == 0.0
    assert time_to_reach(curve, 199.0) is None


def test_the_default_meets_the_target_when_it_reaches_stocks_final_perplexity_sooner_than_both():
    runs = [run("stock", [(0, 900.0), (100, 300.0)], repeat=i) for i in range(3)]
    runs += [run("mxfp8", [(0, 900.0), (80, 300.0), (90, 290.0)], repeat=i) for i in range(3)]
    runs += [run("default", [(0, 900.0), (60 + i, 300.0), (80, 295.0)], repeat=i) for i in range(3)]
    checks = {name: (value, met) for name, value, met in targets(runs)}
    assert checks["the default reaches stock's final perplexity at 1 Gbit/s"] == ("61 s", True)
    value, met = checks["... at least 1.3x sooner than stock"]
    assert met and value.startswith(f"{100 / 61:.2f}x")
    assert checks["... and sooner than 8-bit payloads alone"][1] is True


def test_a_default_that_misses_stocks_final_perplexity_in_any_repeat_fails_the_target():
    runs = [run("stock", [(0, 900.0), (100, 300.0)])]
    runs += [run("default", [(0, 900.0), (60, 310.0)], repeat=0), run("default", [(0, 900.0), (60, 300.0)], repeat=1)]
    checks = targets(runs)
    assert checks == [("the default reaches stock's final perplexity at 1 Gbit/s", "not in every run", False)]
    cell = reach_cell([None, 60.0], [100.0], is_stock=False)
    assert cell == "60 s (1 of 2 runs reached it)"  # no speedup claimed from the runs that made it


def test_report_only_refuses_a_summary_from_the_previous_version(tmp_path, monkeypatch):
    old = tmp_path / "speed_study.json"
    old.write_text('{"iters": 120, "runs": [], "fixed": []}')
    monkeypatch.setattr(speed_study, "RESULTS", old)
    monkeypatch.setattr(speed_study, "REPO", tmp_path)
    monkeypatch.setattr(sys, "argv", ["speed_study.py", "--report-only"])
    with pytest.raises(SystemExit, match="older version"):
        speed_study.main()


def test_a_finished_run_is_reused_only_when_it_trained_with_the_same_flags(tmp_path):
    finished = plan(300, repeats=1, slow_repeats=0)[0]
    finished.results = {"final_ppl": 150.0}
    (tmp_path / "runs" / finished.key).mkdir(parents=True)
    (tmp_path / "runs" / finished.key / "results.json").write_text(json.dumps(finished.to_json()))
    same = plan(300, repeats=1, slow_repeats=0)[0]
    assert speed_study.reuse(same, tmp_path) and same.results == {"final_ppl": 150.0}
    longer = plan(400, repeats=1, slow_repeats=0)[0]
    assert not speed_study.reuse(longer, tmp_path) and longer.results == {}


def test_a_fresh_clone_takes_runs_from_the_committed_summary_by_the_same_rules(tmp_path):
    finished = plan(300, repeats=1, slow_repeats=0)[2]  # the default
    finished.results = {"final_ppl": 150.0}
    committed = {finished.key: finished.to_json()}
    again = plan(300, repeats=1, slow_repeats=0)[2]
    assert speed_study.reuse(again, tmp_path, committed) and again.results == {"final_ppl": 150.0}
    longer = plan(400, repeats=1, slow_repeats=0)[2]
    assert not speed_study.reuse(longer, tmp_path, {longer.key: finished.to_json()})
    moved = {**finished.to_json(), "lsh_settings": {**finished.lsh_settings(), "lsh_split": "bisect"}}
    assert not speed_study.reuse(plan(300, repeats=1, slow_repeats=0)[2], tmp_path, {finished.key: moved})


def test_the_committed_summary_is_read_by_run_key_and_an_older_version_not_at_all(tmp_path, monkeypatch):
    finished = plan(300, repeats=1, slow_repeats=0)[2]
    summary = tmp_path / "speed_study.json"
    monkeypatch.setattr(speed_study, "RESULTS", summary)
    assert speed_study.committed_runs() == {}
    summary.write_text(json.dumps({"version": 2, "elapsed_s": 1.0, "runs": [finished.to_json()]}))
    assert list(speed_study.committed_runs()) == [finished.key]
    summary.write_text(json.dumps({"version": 1, "runs": [finished.to_json()]}))
    assert speed_study.committed_runs() == {}


def test_a_run_whose_flags_now_mean_other_lsh_settings_is_run_again(tmp_path):
    """Plain --lsh is the same flag before and after a default changes; the settings it resolved to
    are what a result is reused by. Results kept before the settings were are reused only without LSH."""
    stock, _, default = plan(300, repeats=1, slow_repeats=0)[:3]
    for run_ in (stock, default):
        run_.results = {"final_ppl": 150.0}
        saved = run_.to_json()
        del saved["lsh_settings"]  # as an older invocation kept them
        (tmp_path / "runs" / run_.key).mkdir(parents=True)
        (tmp_path / "runs" / run_.key / "results.json").write_text(json.dumps(saved))
    again_stock, _, again_default = plan(300, repeats=1, slow_repeats=0)[:3]
    assert speed_study.reuse(again_stock, tmp_path)
    assert not speed_study.reuse(again_default, tmp_path)
    changed = default.to_json()
    changed["lsh_settings"] = {**changed["lsh_settings"], "lsh_split": "bisect"}  # had --lsh meant bisection
    (tmp_path / "runs" / default.key / "results.json").write_text(json.dumps(changed))
    assert not speed_study.reuse(again_default, tmp_path)
    (tmp_path / "runs" / default.key / "results.json").write_text(json.dumps(default.to_json()))
    assert speed_study.reuse(again_default, tmp_path)


def test_the_doc_says_which_settings_an_earlier_invocation_measured():
    together = [run("stock", [(0, 1.0)]), run("default", [(0, 1.0)])]
    for r in together:
        r.results["invocation"] = "the invocation of 2026-12-02 21:10 UTC"
    assert speed_study.invocations_note(together) == ""
    del together[0].results["invocation"]  # kept from before invocations were recorded
    note = speed_study.invocations_note(together)
    assert "stock (an earlier invocation); default (the invocation of 2026-12-02 21:10 UTC)" in note
