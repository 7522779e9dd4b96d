"""Kernel overlayfs and the system under test, writable, side by side over the same lowers.

`mounted_pair()` mounts both (each with its own upper and workdir on the same filesystem),
`Pair.step(op)` applies one operation to both and returns both outcomes, `Pair.differences()`
compares the two trees. `round_trip()` then swaps the uppers: kernel overlayfs over the upper the
system under test wrote must show what the system under test showed, and the reverse.
Every mount is unmounted on exit from its `with`, even on failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.differential.backends import ORACLE, Backend
from tests.differential.compare import compare_views, view_of
from tests.differential.ops import Op, Outcome, apply, root_fd_of
from tests.support.tree import Entry, Snapshot, diff_fingerprints, lower_fingerprint


@dataclass
class Pair:
    sut: Backend
    layers: list[Path]
    base: Path
    kernel_fd: int = -1
    sut_fd: int = -1
    history: list[tuple[Op, Outcome, Outcome]] = field(default_factory=list)

    @property
    def kernel_mount(self) -> Path:
        return self.base / "kernel"

    @property
    def sut_mount(self) -> Path:
        return self.base / "sut"

    def step(self, op: Op) -> tuple[Outcome, Outcome]:
        kernel = apply(self.kernel_fd, op)
        got = apply(self.sut_fd, op)
        self.history.append((op, kernel, got))
        return kernel, got

    def views(self) -> tuple[tuple[Snapshot, Entry], tuple[Snapshot, Entry]]:
        return view_of(self.kernel_mount), view_of(self.sut_mount)

    def differences(self) -> list[str]:
        kernel, got = self.views()
        return compare_views(kernel, got, ("kernel", self.sut.name))

    def transcript(self) -> str:
        lines = []
        for index, (op, kernel, got) in enumerate(self.history):
            mark = "   " if kernel == got else "!!!"
            lines.append(f"{mark} {index:2}: {op}  => kernel {kernel}, {self.sut.name} {got}")
        return "\n".join(lines)


@contextlib.contextmanager
def mounted_pair(
    sut: Backend, layers: Sequence[Path], base: Path, sut_layers: Sequence[Path] | None = None
) -> Iterator[Pair]:
    """Kernel overlayfs over ``layers`` and the SUT over ``sut_layers`` (default: the same),
    each with its own upper and workdir under ``base``. (Different lowers: each side's own
    uppers of earlier generations rotated into its lowers, see ``rotation``.)"""
    pair = Pair(sut, list(layers), base)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            ORACLE.mounted(
                layers, pair.kernel_mount, upper=base / "kernel.upper", workdir=base / "kernel.work"
            )
        )
        stack.enter_context(
            sut.mounted(
                layers if sut_layers is None else sut_layers,
                pair.sut_mount,
                upper=base / "sut.upper",
                workdir=base / "sut.work",
            )
        )
        pair.kernel_fd = stack.enter_context(root_fd_of(pair.kernel_mount))
        pair.sut_fd = stack.enter_context(root_fd_of(pair.sut_mount))
        yield pair


def round_trip(
    sut: Backend,
    layers: Sequence[Path],
    base: Path,
    kernel_view: tuple[Snapshot, Entry],
    sut_view: tuple[Snapshot, Entry],
    sut_layers: Sequence[Path] | None = None,
) -> list[str]:
    """Mount each upper with the other implementation (after `mounted_pair` has exited), each
    over the lowers it was written over (`layers` for the kernel's upper, `sut_layers`,
    default the same, for the SUT's).

    0. The SUT over its own upper and workdir again must show its live view (persistence).
    1. Kernel overlayfs over the upper and workdir the SUT wrote must show the SUT's view.
    2. The SUT over the upper and workdir the kernel wrote must show the kernel's live view. Kernel
       overlayfs is not always self-consistent here (remounted over its own upper+index it can
       show other hard-link counts or lose an index-only hard-link alias), so when the SUT
       differs from the live view but equals what the kernel itself shows when remounted, that
       counts as agreement: the SUT reads the kernel's format exactly as the kernel does.
    """
    own_layers = layers if sut_layers is None else sut_layers
    problems = []
    # 0. The SUT remounted over its own upper and workdir shows what it showed live (first: the
    #    kernel mount below writes its own records into that upper).
    with sut.mounted(
        own_layers, base / "sut-again", upper=base / "sut.upper", workdir=base / "sut.work"
    ) as mountpoint:
        seen = view_of(mountpoint)
    problems += [
        f"{sut.name} remounted over its own upper: {line}"
        for line in compare_views(sut_view, seen, (f"{sut.name} live", f"{sut.name} remounted"))
    ]
    with ORACLE.mounted(
        own_layers, base / "kernel-over-sut", upper=base / "sut.upper", workdir=base / "sut.work"
    ) as mountpoint:
        seen = view_of(mountpoint)
    problems += [
        f"kernel over the upper {sut.name} wrote: {line}"
        for line in compare_views(sut_view, seen, (sut.name, "kernel"))
    ]
    # The SUT first: a kernel mount with index=on cleans up its index dir when it mounts.
    with sut.mounted(
        layers, base / "sut-over-kernel", upper=base / "kernel.upper", workdir=base / "kernel.work"
    ) as mountpoint:
        seen = view_of(mountpoint)
    against_live = compare_views(kernel_view, seen, ("kernel", sut.name))
    if against_live:
        with ORACLE.mounted(
            layers, base / "kernel-again", upper=base / "kernel.upper", workdir=base / "kernel.work"
        ) as mountpoint:
            kernel_again = view_of(mountpoint)
        against_remount = compare_views(kernel_again, seen, ("kernel remounted", sut.name))
        if against_remount:
            problems += [
                f"{sut.name} over the upper the kernel wrote: {line}" for line in against_live
            ]
            problems += [
                f"{sut.name} over the upper the kernel wrote, vs the kernel remounted: {line}"
                for line in against_remount
            ]
    return problems


def lowers_unchanged(before: object, layers: Sequence[Path]) -> list[str]:
    return [
        f"lower layer changed: {line}"
        for line in diff_fingerprints(before, lower_fingerprint(layers))  # type: ignore[arg-type]
    ]
