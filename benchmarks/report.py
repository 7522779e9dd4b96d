"""Results on disk: latest.json (+ a timestamped copy), latest.md, latest.png, README section.

The JSON holds the raw per-round samples, the per-row summaries (median, min, max), unionfs's
paired ratios against kernel overlayfs, rootless overlayfs and fuse-overlayfs, and the verdict
against issue 4's targets. The markdown and the chart are made from the JSON alone, so
``python -m benchmarks --report-only`` can redo them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import Results
from benchmarks.stats import paired_ratio, paired_ratios, summarize
from benchmarks.systems import DEFAULT_SYSTEMS
from benchmarks.targets import TARGETS, judge

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
OURS = "unionfs"
REFERENCES = ("overlay", "fuse-overlayfs", "overlay-rootless")
SYSTEM_ORDER = DEFAULT_SYSTEMS  # the table's column order


def _add_lookup_growth(samples: dict[str, dict[str, list[float | None]]]) -> None:
    """Derived row: per system and round, cold lookup cost with 100 layers / with 2 layers."""
    if "lookup-100" not in samples or "lookup-2" not in samples:
        return
    growth: dict[str, list[float | None]] = {}
    for system, many in samples["lookup-100"].items():
        few = samples["lookup-2"].get(system, [])
        growth[system] = [
            (m / f) if (m is not None and f is not None and f > 0) else None
            for m, f in zip(many, few, strict=False)
        ]
    samples["lookup-growth"] = growth


def build(results: Results, titles: dict[str, str], units: dict[str, str]) -> dict[str, Any]:
    """The JSON document of one run."""
    samples = {row: dict(per_system) for row, per_system in results.samples.items()}
    _add_lookup_growth(samples)
    if "lookup-growth" in samples:
        units["lookup-growth"] = "x"
    seen = {system for per_system in samples.values() for system in per_system}
    systems = [system for system in SYSTEM_ORDER if system in seen]
    systems += sorted(seen - set(systems))
    rows = []
    for row, per_system in samples.items():
        summaries = {}
        for system, values in per_system.items():
            summary = summarize(values)
            summaries[system] = None if summary is None else summary.as_dict()
        ratios: dict[str, float | None] = {}
        ratio_rounds: dict[str, list[float]] = {}
        ours = per_system.get(OURS)
        if ours is not None and row != "lookup-growth":
            for reference in REFERENCES:
                theirs = per_system.get(reference)
                if theirs is not None:
                    ratios[reference] = paired_ratio(ours, theirs)
                    ratio_rounds[reference] = paired_ratios(ours, theirs)
        own_summary = summaries.get(OURS)
        own = None if own_summary is None else float(own_summary["median"])
        verdict, detail = judge(row, ratios, own)
        if verdict and own is None:
            verdict, detail = "n/a", "no unionfs data"
        target = TARGETS.get(row)
        rows.append(
            {
                "row": row,
                "title": titles.get(row, row),
                "unit": units.get(row, "s"),
                "samples": per_system,
                "summary": summaries,
                "ratios": ratios,
                "ratio_rounds": ratio_rounds,
                "target": "" if target is None else target.text,
                "verdict": verdict,
                "verdict_detail": detail,
            }
        )
    daemon_cpu: dict[str, dict[str, Any]] = {}
    for workload, per_system in results.daemon_cpu.items():
        present = {
            system: values
            for system, values in per_system.items()
            if any(value is not None for value in values)
        }
        if not present:
            continue
        medians = {system: summarize(values) for system, values in present.items()}
        daemon_cpu[workload] = {
            "samples": present,
            "median": {
                system: (None if found is None else found.median)
                for system, found in medians.items()
            },
            "unionfs/fuse-overlayfs": (
                paired_ratio(present[OURS], present["fuse-overlayfs"])
                if OURS in present and "fuse-overlayfs" in present
                else None
            ),
        }
    requests: dict[str, Any] = {}
    for workload, counted in results.requests.items():
        entry: dict[str, Any] = {"by_opcode": counted, "total": {}, "cpu_per_request_us": {}}
        for system, counts in counted.items():
            total = sum(counts.values())
            entry["total"][system] = total
            medians_of: dict[str, Any] = daemon_cpu.get(workload, {}).get("median", {})
            cpu = medians_of.get(system)
            entry["cpu_per_request_us"][system] = (
                None if cpu is None or total == 0 else round(cpu / total * 1e6, 2)
            )
        requests[workload] = entry
    return {
        "meta": results.meta,
        "systems": systems,
        "daemon_cpu": daemon_cpu,
        "requests": requests,
        "unavailable": results.unavailable,
        "errors": results.errors,
        "rows": rows,
    }


def _ordered(systems: list[str]) -> list[str]:
    known = [system for system in SYSTEM_ORDER if system in systems]
    return known + sorted(set(systems) - set(known))


def _format_value(value: float, unit: str) -> str:
    if unit == "s":
        if value >= 1:
            return f"{value:.2f} s"
        if value >= 0.001:
            return f"{value * 1000:.3g} ms"
        return f"{value * 1e6:.3g} us"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "fds":
        return f"{value:.0f}"
    return f"{value:.3g} {unit}"


def _format_cell(summary: dict[str, float] | None, unit: str) -> str:
    if summary is None:
        return "n/a"
    median = _format_value(summary["median"], unit)
    if summary["n"] < 2:
        return median
    low = _format_value(summary["min"], unit)
    high = _format_value(summary["max"], unit)
    return f"{median} [{low}..{high}]"


def _format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown(document: dict[str, Any], heading_level: int = 2) -> str:
    """The results table (and how it was made) as markdown."""
    meta = document["meta"]
    systems = _ordered(document["systems"])
    hashes = "#" * heading_level
    lines = [
        f"{hashes} Benchmark results ({meta.get('scale', '?')} data set, "
        f"{meta.get('rounds', '?')} rounds, {meta.get('started', '?')})",
        "",
        "Cells: median [min..max] over rounds; each sample on a fresh mount with a fresh upper "
        "(tmpfs unless the row says ext4). Ratios: median of the per-round paired ratios "
        "unionfs / reference (below 1 = unionfs faster). n/a = system unavailable or the "
        "workload failed on it (see errors below).",
        "",
    ]
    header = ["workload", *systems, "unionfs/overlay", "unionfs/fuse-overlayfs"]
    if "overlay-rootless" in systems:
        header.append("unionfs/rootless")
    header += ["target (issue 4)", "verdict"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in document["rows"]:
        cells = [row["title"]]
        for system in systems:
            if system not in row["summary"]:
                cells.append("")
            else:
                cells.append(_format_cell(row["summary"][system], row["unit"]))
        ratios = row["ratios"]
        cells.append(_format_ratio(ratios.get("overlay")))
        cells.append(_format_ratio(ratios.get("fuse-overlayfs")))
        if "overlay-rootless" in systems:
            cells.append(_format_ratio(ratios.get("overlay-rootless")))
        cells.append(row["target"])
        verdict = row["verdict"]
        if row["verdict_detail"] and verdict == "missed":
            verdict = f"missed ({row['verdict_detail']})"
        cells.append(verdict)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    counts = {"met": 0, "missed": 0, "n/a": 0}
    for row in document["rows"]:
        if row["verdict"] in counts:
            counts[row["verdict"]] += 1
    lines += [
        "",
        f"Targets: {counts['met']} met, {counts['missed']} missed, {counts['n/a']} without data.",
        "",
    ]
    lines += daemon_cpu_table(document)
    versions = meta.get("versions", {})
    if versions:
        lines.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()) + ".")
    machine = meta.get("machine", {})
    lines.append(
        f"Machine: {machine.get('cpus', '?')} CPUs, {machine.get('memory', '?')}; load average "
        f"{meta.get('loadavg_before', '?')} before, {meta.get('loadavg_after', '?')} after; "
        f"run took {meta.get('duration_s', '?')} s. Upper filesystems: "
        f"{meta.get('upper_filesystems', {})}."
    )
    if document["unavailable"]:
        lines.append("")
        for system, reason in document["unavailable"].items():
            lines.append(f"- {system}: n/a ({reason})")
    if document["errors"]:
        lines += ["", "Failed samples (first error per workload and system):", ""]
        for workload, per_system in document["errors"].items():
            for system, error in per_system.items():
                lines.append(f"- {workload} / {system}: {error.splitlines()[0][:200]}")
    return "\n".join(lines) + "\n"


def daemon_cpu_table(document: dict[str, Any]) -> list[str]:
    """CPU seconds the FUSE daemons used during each timed step (load-independent cost)."""
    daemon_cpu = document.get("daemon_cpu") or {}
    if not daemon_cpu:
        return []
    daemons = [s for s in ("fuse-overlayfs", "unionfs-fuse", OURS) if s in document["systems"]]
    lines = [
        "Daemon CPU time during the timed step (median; user + system of the FUSE daemon, all "
        "threads): what a request costs, nearly independent of the machine's load.",
        "",
        "| workload | " + " | ".join(daemons) + " | unionfs/fuse-overlayfs |",
        "|" + "---|" * (len(daemons) + 2),
    ]
    for workload, entry in daemon_cpu.items():
        cells = [workload]
        for daemon in daemons:
            value = entry["median"].get(daemon)
            cells.append("" if value is None else _format_value(value, "s"))
        cells.append(_format_ratio(entry.get("unionfs/fuse-overlayfs")))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *requests_table(document)]


def _ratio_of(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def requests_table(document: dict[str, Any]) -> list[str]:
    """Requests of each timed step by opcode (counted from libfuse's debug output in one extra
    sample) and the daemon CPU per request (timed rounds' median CPU / that count)."""
    requests = document.get("requests") or {}
    if not requests:
        return []
    pair = ("fuse-overlayfs", OURS)
    lines = [
        "Requests the timed step sent each daemon (one extra sample mounted with libfuse's debug "
        "output, not timed) and daemon CPU per request (median daemon CPU above / requests).",
        "",
        "| workload | requests fuse-overlayfs | requests unionfs | ratio | CPU/request "
        "fuse-overlayfs | CPU/request unionfs | ratio | unionfs's top opcodes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload, entry in requests.items():
        totals = [entry["total"].get(system) for system in pair]
        per_request = [entry["cpu_per_request_us"].get(system) for system in pair]
        ours = entry["by_opcode"].get(OURS) or {}
        top = ", ".join(f"{op} {n}" for op, n in list(ours.items())[:3])
        cells = [
            workload,
            *("" if value is None else str(value) for value in totals),
            _format_ratio(_ratio_of(totals[1], totals[0])),
            *("" if value is None else f"{value:.1f} us" for value in per_request),
            _format_ratio(_ratio_of(per_request[1], per_request[0])),
            top,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


COLORS = {
    "native": "#7f7f7f",
    "overlay": "#1f77b4",
    "overlay-rootless": "#aec7e8",
    "fuse-overlayfs": "#2ca02c",
    "unionfs-fuse": "#9467bd",
    "unionfs": "#d62728",
}


def chart(document: dict[str, Any], path: Path) -> bool:
    """Median of each time row relative to kernel overlayfs, one bar per system, log scale."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    rows = [row for row in document["rows"] if row["unit"] == "s"]
    systems = [system for system in _ordered(document["systems"]) if system != "overlay"]
    if not rows:
        return False
    height = max(4.0, 0.42 * len(rows) * max(1, len(systems)) / 3 + 1.5)
    figure, axes = plt.subplots(figsize=(10, height))
    bar = 0.8 / max(1, len(systems))
    labels = []
    for index, row in enumerate(rows):
        labels.append(row["title"])
        base = row["summary"].get("overlay") or row["summary"].get("native")
        for position, system in enumerate(systems):
            summary = row["summary"].get(system)
            if summary is None or base is None or base["median"] <= 0:
                continue
            value = summary["median"] / base["median"]
            axes.barh(
                index + position * bar - 0.4 + bar / 2,
                value,
                height=bar,
                color=COLORS.get(system, "#333333"),
                label=system
                if index == 0 or system not in axes.get_legend_handles_labels()[1]
                else None,
            )
    axes.axvline(1.0, color="#1f77b4", linewidth=1)
    axes.set_xscale("log")
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels(labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("median time relative to kernel overlayfs (log scale; < 1 is faster)")
    meta = document["meta"]
    axes.set_title(
        f"unionfs benchmarks ({meta.get('scale', '?')} data set, {meta.get('rounds', '?')} rounds)"
    )
    handles, names = axes.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=False))
    axes.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    axes.grid(axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_all(
    document: dict[str, Any],
    results_dir: Path = RESULTS_DIR,
    readme: bool = True,
    partial: bool = False,
) -> list[Path]:
    """latest.json, a timestamped copy, latest.md, latest.png and the README section. A
    ``partial`` run (``--only``) writes partial.json/.md/.png and a timestamped copy instead and
    never the README: the full run's table and chart stay as they were."""
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    name = "partial" if partial else "latest"
    latest = results_dir / f"{name}.json"
    temporary = latest.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    os.replace(temporary, latest)
    written.append(latest)
    stamp = document["meta"].get("started") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kind = "partial-run" if partial else "run"
    stamped = (
        results_dir / f"{kind}-{stamp.replace(':', '')}-{document['meta'].get('scale', 'x')}.json"
    )
    shutil.copyfile(latest, stamped)
    written.append(stamped)
    table = markdown(document)
    (results_dir / f"{name}.md").write_text(table)
    written.append(results_dir / f"{name}.md")
    if chart(document, results_dir / f"{name}.png"):
        written.append(results_dir / f"{name}.png")
    if readme and not partial and update_readme(document):
        written.append(README)
    return written


def update_readme(document: dict[str, Any], path: Path = README) -> bool:
    """Replace the text between the bench markers; add markers under '## Benchmarks' if missing."""
    if not path.exists():
        return False
    text = path.read_text()
    section = (
        f"{START_MARKER}\n"
        "Generated by `scripts/bench` (see `benchmarks/`); do not edit between these markers.\n"
        "Chart: [benchmarks/results/latest.png](benchmarks/results/latest.png), full data: "
        "`benchmarks/results/latest.json`. Where the time goes and why targets are missed "
        "(request counts, per-request CPU, profiles): "
        "[benchmarks/README.md](benchmarks/README.md).\n\n"
        + markdown(document, heading_level=3)
        + "\n![benchmark chart](benchmarks/results/latest.png)\n"
        f"{END_MARKER}"
    )
    if START_MARKER in text and END_MARKER in text:
        pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER), re.DOTALL)
        new = pattern.sub(lambda _match: section, text, count=1)
    else:
        heading = re.search(r"^## Benchmarks[^\n]*\n", text, re.MULTILINE)
        if heading:
            following = re.search(r"^## ", text[heading.end() :], re.MULTILINE)
            end = heading.end() + (following.start() if following else len(text))
            body = text[heading.end() : end]
            if len(body.strip()) < 200:
                # A placeholder ("Not measured yet.") gives way to the generated section.
                new = text[: heading.end()] + "\n" + section + "\n\n" + text[end:]
            else:
                new = text[: heading.end()] + "\n" + section + "\n" + text[heading.end() :]
        else:
            new = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + section + "\n"
    if new == text:
        return False
    path.write_text(new)
    return True


def ratio_summary(document: dict[str, Any]) -> str:
    """A short plain-text table of unionfs's ratios, for the terminal."""
    lines = [f"{'row':<18} {'vs overlay':>10} {'vs fuse-ovl':>11} {'vs rootless':>11}  verdict"]
    for row in document["rows"]:
        ratios = row["ratios"]

        def show(name: str, ratios: dict[str, float | None] = ratios) -> str:
            value = ratios.get(name)
            return "—" if value is None or math.isnan(value) else f"{value:.2f}x"

        lines.append(
            f"{row['row']:<18} {show('overlay'):>10} {show('fuse-overlayfs'):>11} "
            f"{show('overlay-rootless'):>11}  {row['verdict']} {row['verdict_detail']}"
        )
    return "\n".join(lines)
