"""Rotated uppers: three generations, each side's upper becoming a lower of its next mount, the
same operations on kernel overlayfs and on the system under test, compared at every
generation (errno per operation, trees), and both implementations read-only over each
side's rotated stack (the SUT reading the kernel's uppers, and the reverse).

* `test_rotation`: the scripted `scenarios.ROTATIONS` (renames, chmods, xattr changes, hard
  links and deletes in each generation);
* `test_random_rotations`: the random-operation state machine of
  `test_write_differential`, with a rule that rotates the uppers (up to three times).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule, run_state_machine_as_test

from tests.differential.backends import Backend
from tests.differential.compare import compare_views
from tests.differential.conftest import Workspace, examples
from tests.differential.layers import (
    MTIMES,
    Stack,
    all_prefixes,
    build_stack,
    describe_stack,
    paths,
    stack_paths,
    stacks,
)
from tests.differential.ops import Op
from tests.differential.pair import Pair
from tests.differential.rotation import GENERATIONS, Generations, Rotation
from tests.differential.scenarios import ROTATIONS
from tests.differential.test_write_differential import (
    WRITE_NAMES,
    WRITE_STACKS,
    DifferentialMachine,
    _xfail_if_known,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_overlay")]


def _step_problems(number: int, rotation: Rotation, pair: Pair) -> list[str]:
    problems = [
        f"generation {number + 1}, op {index} ({op}): kernel {kernel}, {pair.sut.name} {got}"
        for index, (op, kernel, got) in enumerate(pair.history)
        if kernel != got
    ]
    for (generation, index), wanted in rotation.expect.items():
        if generation != number:
            continue
        op, kernel, got = pair.history[index]
        for who, outcome in (("kernel", kernel), (pair.sut.name, got)):
            if outcome.errno != wanted:
                problems.append(
                    f"generation {number + 1}, op {index} ({op}): expected errno {wanted} on"
                    f" {who}, got {outcome}"
                )
    return problems


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rotation", ROTATIONS, ids=[r.name for r in ROTATIONS])
def test_rotation(
    request: pytest.FixtureRequest, rotation: Rotation, sut: Backend, tmp_path: Path
) -> None:
    _xfail_if_known(request, sut, "rotation: " + rotation.name)
    layers = build_stack(rotation.lowers, tmp_path / "layers")
    generations = Generations.over(sut, layers, tmp_path)
    problems: list[str] = []
    for number, ops in enumerate(rotation.generations):
        with generations.live() as pair:
            for op in ops:
                pair.step(op)
            problems += _step_problems(number, rotation, pair)
            kernel_view, sut_view = pair.views()
            problems += [
                f"generation {number + 1}: {line}"
                for line in compare_views(kernel_view, sut_view, ("kernel", sut.name))
            ]
        if problems:
            break
        problems += generations.cross_check()
        if problems:
            break
    problems += generations.unchanged()
    assert not problems, (
        f"rotation {rotation.name!r}: {sut.name} differs from kernel overlayfs:\n  "
        + "\n  ".join(problems)
        + f"\nops:\n{generations.transcript()}\nlowers:\n{describe_stack(rotation.lowers)}"
    )


#: No lower hard links and no ``link`` operations in the random rotations: a hard link changed
#: through one of its names is copied up into the index, and only the names the change went
#: through are linked into the upper; rotated into the lowers (the index stays behind) the
#: other names show the old file, in kernel overlayfs and in unionfs alike. Which names those
#: are differs: the kernel links up the name a chmod/chown/utime/setxattr went through, and a
#: FUSE daemon is never told that name (SETATTR names an inode). README, known differences.
#: The scripted rotations link and rotate hard links whose changes go through known names.
ROTATING_STACKS = dataclasses.replace(
    WRITE_STACKS, kinds=tuple(kind for kind in WRITE_STACKS.kinds if kind != "hardlink")
)


class RotatingMachine(DifferentialMachine):
    """The random-operation machine, plus a rule rotating both uppers into the lowers."""

    check_round_trip = False  # each side's lowers differ; cross-checked at every rotation

    def __init__(self) -> None:
        super().__init__()
        self.generations: Generations | None = None
        self.live: contextlib.AbstractContextManager[Pair] | None = None
        self.steps_at_rotation = 0

    @initialize(stack=stacks(ROTATING_STACKS))
    def mount(self, stack: Stack) -> None:
        self.stack = stack
        self.base_context = self.workspace.example_dir()
        self.base = self.base_context.__enter__()
        self.layers = build_stack(stack, self.base / "layers")
        self.generations = Generations.over(self.sut, self.layers, self.base)
        self._enter()
        self.pool = all_prefixes(stack_paths(stack))
        self.healthy = True

    def operations(self) -> st.SearchStrategy[Op]:
        """Every operation, and as often again one that leaves a metadata-only copy or a
        redirect (the entries a rotated upper carries into the lowers), or reads one."""
        pool = sorted(self.pool)
        path = st.sampled_from(pool) if pool else paths(WRITE_NAMES, 3)
        metadata = st.one_of(
            st.builds(Op, st.just("rename"), path, other=path),
            st.builds(Op, st.just("chmod"), path, mode=st.sampled_from((0o600, 0o755))),
            st.builds(Op, st.just("setxattr"), path, name=st.just("user.test.r"),
                      data=st.just(b"r")),
            st.builds(Op, st.sampled_from(("read", "stat")), path),
        )  # fmt: skip
        every = super().operations().filter(lambda op: op.kind != "link")
        return st.one_of(every, metadata)

    @precondition(lambda self: self.pair is not None)
    @rule(data=st.data())
    def change_a_file(self, data: st.DataObject) -> None:
        """A metadata-only change (or a rename) of a regular file holding data: the entries a
        rotated upper carries into the lowers, which must still read their data."""
        assert self.pair is not None
        files = []
        for path in sorted(self.pool):
            try:
                st_ = os.lstat(self.pair.kernel_mount.joinpath(*path))
            except OSError:
                continue
            if stat.S_ISREG(st_.st_mode) and st_.st_size:
                files.append(path)
        if not files:
            return
        path = data.draw(st.sampled_from(files), label="file")
        others = paths(WRITE_NAMES, 3)
        target = st.just(path)
        changes = st.one_of(
            st.builds(Op, st.just("chmod"), target, mode=st.sampled_from((0o600, 0o640))),
            st.builds(Op, st.just("rename"), target, other=others),
            st.builds(Op, st.just("setxattr"), target, name=st.just("user.test.r"),
                      data=st.just(b"r")),
            st.builds(Op, st.just("utime"), target,
                      times_ns=st.just((MTIMES[0] - 1, MTIMES[0] + 1))),
        )  # fmt: skip
        op = data.draw(changes, label="op")
        self.apply(op)

    def _enter(self) -> None:
        assert self.generations is not None
        self.live = self.generations.live()
        self.pair = self.live.__enter__()

    def _leave(self) -> list[str]:
        """Unmount (rotating the uppers), then read each rotated stack with both."""
        assert self.generations is not None and self.live is not None
        live, self.live, self.pair = self.live, None, None
        live.__exit__(None, None, None)
        return self.generations.cross_check()

    def _fail(self, message: str) -> None:
        self.healthy = False
        transcript = self.generations.transcript() if self.generations is not None else ""
        if self.pair is not None:
            transcript += f"\ngeneration (current):\n{self.pair.transcript()}"
        raise AssertionError(
            f"{self.sut.name} differs from kernel overlayfs: {message}\n"
            f"ops:\n{transcript}\nlowers:\n{describe_stack(self.stack)}"
        )

    @precondition(
        lambda self: (
            self.generations is not None
            and self.generations.count < GENERATIONS
            and self.steps > self.steps_at_rotation
        )
    )
    @rule()
    def rotate(self) -> None:
        self._compare_trees()
        self.steps_at_rotation = self.steps
        problems = self._leave()
        if problems:
            self._fail("after rotating:\n  " + "\n  ".join(problems))
        self._enter()

    def teardown(self) -> None:
        try:
            if self.pair is None or self.generations is None:
                return
            problems: list[str] = []
            try:
                if self.healthy:
                    self._compare_trees()
            finally:
                problems += self._leave()
            problems += self.generations.unchanged()
            if problems:
                self._fail("at the end:\n  " + "\n  ".join(problems))
        finally:
            if self.live is not None:
                self.live.__exit__(None, None, None)
            if self.base_context is not None:
                self.base_context.__exit__(None, None, None)


@pytest.mark.timeout(300)
def test_random_rotations(
    request: pytest.FixtureRequest, sut: Backend, workspace: Workspace
) -> None:
    """Random stacks and operations, the uppers rotated into the lowers up to three times."""
    _xfail_if_known(request, sut, "random rotations")
    machine = type("Machine", (RotatingMachine,), {"sut": sut, "workspace": workspace})
    run_state_machine_as_test(
        machine,
        settings=settings(
            settings.get_profile("differential"),
            max_examples=examples(3),
            stateful_step_count=int(os.environ.get("UNIONFS_DIFF_STEPS", 24)),
        ),
    )
