"""``python -m benchmarks``: run the suite, write the results, print unionfs's ratios."""

from __future__ import annotations

import argparse
import fnmatch
import json
import signal
import sys
from pathlib import Path
from types import FrameType

from benchmarks import dataset, report
from benchmarks.runner import RunConfig, execute
from benchmarks.systems import ALL_SYSTEMS, DEFAULT_SYSTEMS
from benchmarks.workloads import ROW_TITLES_EXTRA, all_workloads


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark unionfs against native, kernel overlayfs, fuse-overlayfs and "
        "unionfs-fuse on one deterministic data set (issue 4).",
    )
    parser.add_argument("--small", action="store_true", help="small data set (a few minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument(
        "--only", help="comma-separated workloads to run (names or shell patterns, e.g. 'find-*')"
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated systems (default {','.join(DEFAULT_SYSTEMS)})",
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per command")
    parser.add_argument("--seed", type=int, default=dataset.SEED, help="data set seed")
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="leave README.md alone (always so with --only: a partial run writes partial.*)",
    )
    parser.add_argument(
        "--no-requests",
        action="store_true",
        help="skip counting requests by opcode (one debug-mounted sample per workload)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=report.RESULTS_DIR, help="where results go"
    )
    parser.add_argument(
        "--ext4",
        action="store_true",
        help="include the ext4-upper rows in a full run (--small always has them)",
    )
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="remake latest.md, latest.png and the README section from latest.json",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-sample progress lines")
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C so every finally unmounts.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    scale = dataset.SMALL if arguments.small else dataset.FULL
    workloads = all_workloads(scale)
    if arguments.list:
        for workload in workloads:
            print(f"{workload.name:<18} {workload.title}")
        return 0
    if arguments.report_only:
        document = json.loads((arguments.results_dir / "latest.json").read_text())
        (arguments.results_dir / "latest.md").write_text(report.markdown(document))
        report.chart(document, arguments.results_dir / "latest.png")
        if not arguments.no_readme:
            report.update_readme(document)
        print(report.ratio_summary(document))
        return 0
    if not arguments.small and not arguments.ext4 and not arguments.only:
        # The ext4 rows repeat the tmpfs rows on a disk upper; they would add ~15% to a full run.
        workloads = [workload for workload in workloads if workload.upperfs != "ext4"]
    if arguments.only:
        patterns = [pattern.strip() for pattern in arguments.only.split(",") if pattern.strip()]
        workloads = [
            workload
            for workload in workloads
            if any(
                fnmatch.fnmatch(workload.name, pattern) or fnmatch.fnmatch(row, pattern)
                for pattern in patterns
                for row in workload.rows
            )
        ]
        if not workloads:
            print(f"bench: no workload matches {arguments.only!r} (see --list)", file=sys.stderr)
            return 2
    names = [name.strip() for name in arguments.systems.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_SYSTEMS]
    if unknown:
        print(f"bench: unknown systems {unknown}; known: {list(ALL_SYSTEMS)}", file=sys.stderr)
        return 2
    rounds = arguments.rounds or 3
    if rounds < 1:
        print("bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    config = RunConfig(
        scale=scale,
        rounds=rounds,
        workloads=workloads,
        systems=[ALL_SYSTEMS[name] for name in names],
        timeout=arguments.timeout,
        seed=arguments.seed,
        verbose=not arguments.quiet,
        count_requests=not arguments.no_requests,
    )
    results = execute(config)
    titles = {**ROW_TITLES_EXTRA}
    units: dict[str, str] = {}
    for workload in workloads:
        for index, row in enumerate(workload.rows):
            titles.setdefault(row, workload.title if len(workload.rows) == 1 else row)
            units[row] = workload.units[index]
    document = report.build(results, titles, units)
    written = report.write_all(
        document,
        arguments.results_dir,
        readme=not arguments.no_readme,
        partial=bool(arguments.only),
    )
    print(report.ratio_summary(document))
    print("bench: wrote " + ", ".join(str(path) for path in written))
    return 0
