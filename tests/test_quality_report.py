"""The quality study's verdict on the default against the low-precision peer: a difference inside the
hash-seed spread is a tie, and only fewer bytes make a tie worth having."""

from benchmarks.quality_report import _against_the_peer


def summary(ppl, bytes_ratio):
    return {"final_ppl": ppl, "bytes_ratio_run": bytes_ratio}


STOCK = summary(100.0, 1.0)
SPREAD = (1.006, 1.014, 3)  # one setting at three hash seeds: 0.8 points apart


def verdict(default_ppl, default_bytes, peer_ppl=100.2, peer_bytes=0.518):
    runs = {"stock": STOCK, "mxfp8": summary(peer_ppl, peer_bytes), "default": summary(default_ppl, default_bytes)}
    (line,) = _against_the_peer(runs, STOCK, SPREAD)
    return line


def test_lower_perplexity_at_fewer_bytes_is_ahead():
    assert "ahead: lower perplexity at fewer bytes" in verdict(100.1, 0.35)


def test_a_gap_inside_the_seed_spread_at_fewer_bytes_is_a_tie():
    line = verdict(100.8, 0.35)
    assert "a tie in perplexity (0.6 points behind, inside the hash-seed spread of 0.8)" in line


def test_a_gap_beyond_the_seed_spread_is_behind_whatever_the_bytes():
    assert "behind: 1.3 points" in verdict(101.5, 0.35)
    assert "no fewer bytes than mxfp8" in verdict(100.1, 0.6)


def test_no_verdict_without_both_runs():
    assert _against_the_peer({"stock": STOCK, "default": summary(100.5, 0.35)}, STOCK, SPREAD) == []


def test_a_candidate_beside_the_default_gets_its_own_targets_and_verdict():
    from benchmarks.quality_report import _main_section

    def run(ppl, bytes_ratio, last, flags):
        return {**summary(ppl, bytes_ratio), "bytes_ratio_last_10pct": last, "flags": flags, "iters": 1500,
                "compression": [], "relative_error": []}

    runs = {"stock": run(100.0, 1.0, 1.0, ["--no-lsh"]), "mxfp8": run(100.2, 0.518, 0.518, ["--no-lsh"]),
            "default": run(100.8, 0.348, 0.381, ["--lsh"]),
            "bisect": run(100.9, 0.24, 0.249, ["--lsh", "--lsh-split", "bisect"])}
    text = "\n".join(_main_section("quickstart", runs, "main", "Main runs", SPREAD))
    assert "Other LSH settings beside the default: bisect, `--lsh --lsh-split bisect`." in text
    assert "- Target, bytes at most 0.25x over the run and its last 10%: 0.348x, 0.381x, **not met**." in text
    assert "- Target (bisect), bytes at most 0.25x over the run and its last 10%: 0.240x, 0.249x, **met**." in text
    assert "- Target (bisect), final perplexity at most 1.01x stock's: 1.009x, **met**." in text
    assert "- Against the peer (mxfp8 alone): bisect at 0.240x bytes" in text
    assert text.index("the default at 0.348x") < text.index("bisect at 0.240x")
