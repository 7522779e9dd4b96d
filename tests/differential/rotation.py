"""Generations: each side's upper rotated into its own lowers, compared at every generation.

An upper is the lower of the next mount (an image layer, a build step): its metadata-only
copies, redirects, origins and whiteouts must read the same there. `Generations` keeps two
stacks that grow one layer per generation: the kernel's (the base layers + the uppers kernel
overlayfs wrote) and the SUT's (the base layers + the uppers the SUT wrote).

* `live()` mounts one generation: kernel overlayfs over the kernel's stack and the SUT over
  its own, each with a fresh upper (a `Pair`: the same operations, errno and trees
  compared); on exit both uppers are rotated into their stacks.
* `cross_check()` then mounts both implementations read-only over each stack (so a stack
  the SUT wrote is read by the kernel, and the reverse) and compares what they show.
* `unchanged()`: every rotated upper is a lower from then on and must never change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.differential.backends import ORACLE, Backend
from tests.differential.compare import compare_views, view_of
from tests.differential.layers import Stack
from tests.differential.ops import Op
from tests.differential.pair import Pair, lowers_unchanged, mounted_pair
from tests.support.tree import Fingerprint, lower_fingerprint

GENERATIONS = 3


@dataclass
class Generations:
    sut: Backend
    base: Path
    kernel_layers: list[Path]
    sut_layers: list[Path]
    count: int = 0
    transcripts: list[str] = field(default_factory=list)
    _fingerprints: list[tuple[list[Path], Fingerprint]] = field(default_factory=list)

    @classmethod
    def over(cls, sut: Backend, layers: Sequence[Path], base: Path) -> Generations:
        generations = cls(sut, base, list(layers), list(layers))
        generations._fingerprints.append((list(layers), lower_fingerprint(layers)))
        return generations

    @contextlib.contextmanager
    def live(self) -> Iterator[Pair]:
        """The next generation, mounted on both sides; rotated into the stacks on exit."""
        self.count += 1
        directory = self.base / f"gen{self.count}"
        with mounted_pair(
            self.sut, self.kernel_layers, directory, sut_layers=self.sut_layers
        ) as pair:
            try:
                yield pair
            finally:
                self.transcripts.append(f"generation {self.count}:\n{pair.transcript()}")
        uppers = [directory / "kernel.upper", directory / "sut.upper"]
        self.kernel_layers = [*self.kernel_layers, uppers[0]]
        self.sut_layers = [*self.sut_layers, uppers[1]]
        self._fingerprints.append((uppers, lower_fingerprint(uppers)))

    def cross_check(self) -> list[str]:
        """Kernel overlayfs and the SUT, read-only over each side's rotated stack, show the
        same tree (the SUT reads the kernel's uppers as the kernel does, and the reverse)."""
        problems = []
        for owner, layers in (("kernel", self.kernel_layers), (self.sut.name, self.sut_layers)):
            directory = self.base / f"gen{self.count}-read-{owner}"
            kernel_mount, sut_mount = directory / "kernel", directory / "sut"
            with ORACLE.mounted(layers, kernel_mount) as mnt:  # (follows metacopy, redirects)
                kernel_view = view_of(mnt)
            with self.sut.mounted(layers, sut_mount) as mnt:
                sut_view = view_of(mnt)
            problems += [
                f"generation {self.count}, stack written by {owner}, read-only: {line}"
                for line in compare_views(kernel_view, sut_view, ("kernel", self.sut.name))
            ]
        return problems

    def unchanged(self) -> list[str]:
        """Lower layers (the base and every rotated upper) never change."""
        problems = []
        for layers, before in self._fingerprints:
            problems += lowers_unchanged(before, layers)
        return problems

    def transcript(self) -> str:
        return "\n".join(self.transcripts)


@dataclass(frozen=True)
class Rotation:
    """Lower layers and the operations of each generation."""

    name: str
    lowers: Stack
    generations: list[list[Op]]
    expect: dict[tuple[int, int], int] = field(default_factory=dict)  # (gen, op) -> errno
