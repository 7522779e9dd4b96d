"""The targets of issue 4 and how one results row is judged against them.

A target is a list of checks on unionfs's paired ratios: ``("fuse-overlayfs", "<=", 1.1)``
means median(unionfs / fuse-overlayfs per round) <= 1.1. "10x faster" is ``<= 0.1``.
``("self", "<=", 1.5)`` checks unionfs's own value on a row that already is a ratio
(the lookup growth). A row is met when every check passes, missed when one fails, and n/a
when a ratio it needs is missing (a system was not available or failed).
"""

from __future__ import annotations

from dataclasses import dataclass

Check = tuple[str, str, float]


@dataclass(frozen=True)
class Target:
    text: str
    checks: tuple[Check, ...]


_WARM = Target(
    "<= 1.1x fuse-overlayfs, <= 1.3x overlay",
    (("fuse-overlayfs", "<=", 1.1), ("overlay", "<=", 1.3)),
)
_COLD_START = Target("<= 1.2x fuse-overlayfs", (("fuse-overlayfs", "<=", 1.2),))
_COLD_META = Target("<= 1.3x fuse-overlayfs", (("fuse-overlayfs", "<=", 1.3),))
_WRITES = Target("<= 2x fuse-overlayfs", (("fuse-overlayfs", "<=", 2.0),))
_ALGORITHM = Target(
    ">= 10x faster than fuse-overlayfs, faster than rootless overlay",
    (("fuse-overlayfs", "<=", 0.1), ("overlay-rootless", "<", 1.0)),
)
_COPYUP = Target(
    "<= 1.0x fuse-overlayfs, <= 1.0x overlay",
    (("fuse-overlayfs", "<=", 1.0), ("overlay", "<=", 1.0)),
)

TARGETS: dict[str, Target] = {
    "stat-warm": _WARM,
    "find-warm": _WARM,
    "ls-l-warm": _WARM,
    "seqread-reread": _WARM,
    "container-warm": _WARM,
    "container-cold": _COLD_START,
    "podman-build": _COLD_START,  # issue 12: <= 1.2x fuse-overlayfs (wall)
    "seqread-fresh": _COLD_START,
    "seqwrite": _COLD_START,
    "seqwrite-ext4": _COLD_START,
    "stat-cold": _COLD_META,
    "find-cold": _COLD_META,
    "ls-f-cold": _COLD_META,
    "ls-l-cold": _COLD_META,
    "untar": _WRITES,
    "untar-ext4": _WRITES,
    "fio-randwrite": _WRITES,
    "chmod-R": _ALGORITHM,
    "chown-R": _ALGORITHM,
    "rm-rf": _ALGORITHM,
    "rename-dir": _ALGORITHM,
    "sparse-copyup": _ALGORITHM,
    "copyup-mid": _COPYUP,
    "copyup-mid-ext4": _COPYUP,
    "lookup-growth": Target("unionfs grows <= 1.5x", (("self", "<=", 1.5),)),
    "daemon-rss": Target("<= fuse-overlayfs", (("fuse-overlayfs", "<=", 1.0),)),
}


def _passes(value: float, operator: str, limit: float) -> bool:
    if operator == "<=":
        return value <= limit
    if operator == "<":
        return value < limit
    if operator == ">=":
        return value >= limit
    raise ValueError(operator)


def judge(row: str, ratios: dict[str, float | None], own: float | None) -> tuple[str, str]:
    """("met" | "missed" | "n/a" | "", detail) for ROW given unionfs's ratios and own median."""
    target = TARGETS.get(row)
    if target is None:
        return "", ""
    failures = []
    missing = []
    for reference, operator, limit in target.checks:
        value = own if reference == "self" else ratios.get(reference)
        if value is None:
            missing.append(reference)
            continue
        if not _passes(value, operator, limit):
            label = "own" if reference == "self" else f"vs {reference}"
            failures.append(f"{label} {value:.2f}x, want {operator} {limit:g}")
    if failures:
        return "missed", "; ".join(failures)
    if missing:
        return "n/a", "no data: " + ", ".join(missing)
    return "met", ""
