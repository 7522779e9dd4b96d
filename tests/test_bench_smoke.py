"""Smoke test of the benchmark suite's statistics and report code on fixed numbers (no timing)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import report
from benchmarks.runner import Results
from benchmarks.stats import paired_ratio, paired_ratios, rotate, summarize
from benchmarks.targets import judge


def test_summary_is_median_min_max_of_present_samples() -> None:
    summary = summarize([3.0, None, 1.0, 2.0, 10.0])
    assert summary is not None
    assert (summary.median, summary.minimum, summary.maximum, summary.count) == (2.5, 1.0, 10.0, 4)
    assert summarize([None, None]) is None


def test_paired_ratio_is_median_of_per_round_ratios() -> None:
    ours = [2.0, 3.0, None, 8.0]
    theirs = [1.0, 1.0, 5.0, 2.0]
    assert paired_ratios(ours, theirs) == [2.0, 3.0, 4.0]
    assert paired_ratio(ours, theirs) == 3.0
    assert paired_ratio([None], [1.0]) is None


def test_rotation_gives_each_system_each_position() -> None:
    systems = ["a", "b", "c"]
    firsts = {rotate(systems, index)[0] for index in range(3)}
    assert firsts == {"a", "b", "c"}


def test_targets_met_missed_and_missing() -> None:
    assert judge("stat-warm", {"fuse-overlayfs": 1.05, "overlay": 1.2}, 1.0)[0] == "met"
    verdict, detail = judge("stat-warm", {"fuse-overlayfs": 1.5, "overlay": 1.2}, 1.0)
    assert verdict == "missed" and "fuse-overlayfs" in detail
    assert judge("rm-rf", {"fuse-overlayfs": 0.05}, 1.0)[0] == "n/a"
    assert judge("lookup-growth", {}, 1.4)[0] == "met"
    assert judge("lookup-1", {}, 1.0) == ("", "")


def test_report_and_readme_section(tmp_path: Path) -> None:
    results = Results(
        samples={
            "stat-warm": {
                "overlay": [1.0, 2.0],
                "fuse-overlayfs": [1.0, 1.0],
                "unionfs": [1.0, 2.2],
            },
            "lookup-2": {"unionfs": [1.0, 1.0]},
            "lookup-100": {"unionfs": [1.2, 1.6]},
        },
        meta={"scale": "small", "rounds": 2},
    )
    document = report.build(results, {"stat-warm": "stat, warm"}, {"stat-warm": "s"})
    rows = {row["row"]: row for row in document["rows"]}
    assert rows["stat-warm"]["ratios"]["overlay"] == 1.05
    assert rows["stat-warm"]["verdict"] == "missed"  # vs fuse-overlayfs: median(1.0, 2.2) = 1.6
    assert rows["lookup-growth"]["summary"]["unionfs"]["median"] == 1.4
    table = report.markdown(document)
    assert "| stat, warm |" in table
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nold\n\n## Other\nkeep\n")
    assert report.update_readme(document, readme)
    text = readme.read_text()
    assert report.START_MARKER in text and "## Other\nkeep\n" in text
    assert report.update_readme(document, readme) is False  # idempotent


def test_a_partial_run_leaves_latest_and_the_readme_alone(tmp_path: Path) -> None:
    results = Results(
        samples={"null-requests": {"fuse-overlayfs": [1.0, 1.0], "unionfs": [1.5, 2.5]}},
        daemon_cpu={"null-requests": {"fuse-overlayfs": [0.2, 0.2], "unionfs": [0.3, 0.5]}},
        requests={
            "null-requests": {
                "fuse-overlayfs": {"GETXATTR": 20000, "GETATTR": 1},
                "unionfs": {"GETXATTR": 20000},
            }
        },
        meta={"scale": "small", "rounds": 2, "started": "2026-12-02T00:00:00Z"},
    )
    document = report.build(results, {"null-requests": "null"}, {"null-requests": "s"})
    entry = document["requests"]["null-requests"]
    assert entry["total"] == {"fuse-overlayfs": 20001, "unionfs": 20000}
    assert entry["cpu_per_request_us"]["unionfs"] == 20.0  # median 0.4 s / 20,000
    table = report.markdown(document)
    assert "| null-requests | 20001 | 20000 | 1.00x |" in table
    readme_before = report.README.read_bytes()
    written = report.write_all(document, tmp_path, readme=True, partial=True)
    assert report.README.read_bytes() == readme_before
    assert {path.name for path in written} >= {"partial.json", "partial.md"}
    assert not (tmp_path / "latest.json").exists() and not (tmp_path / "latest.md").exists()
