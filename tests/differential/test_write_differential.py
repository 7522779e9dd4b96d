"""Writable differential: the same operations on kernel overlayfs (redirect_dir=on,index=on) and on
the system under test give the same errno per operation and the same tree.

* `test_scenario`: the named scripts of `scenarios.py` (copy-up, whiteouts, opaque dirs, renames of
  lower dirs, hard links across copy-up, RENAME_NOREPLACE/EXCHANGE, ...);
* `test_scenario_with_oci_whiteouts_in_the_upper`: the same scripts on unionfs writing `.wh.`
  whiteouts (`--whiteout-format=oci`): the live view must not change;
* `test_scenario_round_trip`: after unmounting, kernel overlayfs over the upper the system under
  test wrote shows the same tree, and the system under test over the kernel's upper shows the
  kernel's tree;
* `test_random_operation_sequences`: a hypothesis state machine, random stacks and random
  operation sequences, errno compared per step, trees every few steps and at the end, plus the
  round trip at the end.

Lower layers are fingerprinted before and must be unchanged after every test.
What is not compared is listed, with reasons, in `compare.ALLOWED_DIFFERENCES`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from tests.differential.backends import BACKENDS, Backend
from tests.differential.compare import compare_views
from tests.differential.conftest import Workspace, examples
from tests.differential.layers import (
    GENERATED_MTIME_LIMIT_NS,
    MTIMES,
    OWNERS,
    RelPath,
    Stack,
    StackOptions,
    all_prefixes,
    build_stack,
    describe_stack,
    paths,
    remove_tree,
    stack_paths,
    stacks,
)
from tests.differential.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, Op, as_user
from tests.differential.pair import Pair, lowers_unchanged, mounted_pair, round_trip
from tests.differential.scenarios import SCENARIOS, Scenario
from tests.support.tree import Entry, Fingerprint, Snapshot, lower_fingerprint

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_overlay")]

#: Scenarios the system under test is known to get wrong: name -> reason (xfail strict, so a fix
#: shows up as XPASS and the entry must then be removed). Nothing here is a deliberate difference:
#: those are in compare.ALLOWED_DIFFERENCES.
_UNIONFS_KNOWN: dict[str, str] = {}
KNOWN_FAILURES: dict[str, dict[str, str]] = {
    "unionfs": _UNIONFS_KNOWN,
    "kernel": {},
    "fuse-overlayfs": {},
    "unionfs-oci": {},
}


def _xfail_if_known(request: pytest.FixtureRequest, sut: Backend, name: str) -> None:
    reason = KNOWN_FAILURES.get(sut.name, {}).get(name)
    if reason is not None:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))


@dataclass
class LiveRun:
    """What a scenario left behind (uppers, workdirs, both views), for the round trip."""

    base: Path
    layers: list[Path]
    before: Fingerprint
    kernel_view: tuple[Snapshot, Entry]
    sut_view: tuple[Snapshot, Entry]
    problems: list[str]
    transcript: str


def run_live(sut: Backend, scenario: Scenario, base: Path) -> LiveRun:
    layers = build_stack(scenario.lowers, base / "layers")
    before = lower_fingerprint(layers)
    with mounted_pair(sut, layers, base) as pair:
        for op in scenario.ops:
            pair.step(op)
        problems = [
            f"op {index} ({op}): kernel {kernel}, {sut.name} {got}"
            for index, (op, kernel, got) in enumerate(pair.history)
            if kernel != got
        ]
        for index, wanted in scenario.expect.items():
            op, kernel, got = pair.history[index]
            for who, outcome in (("kernel", kernel), (sut.name, got)):
                if outcome.errno != wanted:
                    problems.append(
                        f"op {index} ({op}): expected errno {wanted} on {who}, got {outcome}"
                    )
        kernel_view, sut_view = pair.views()
        problems += compare_views(kernel_view, sut_view, ("kernel", sut.name))
        transcript = pair.transcript()
    problems += lowers_unchanged(before, layers)
    return LiveRun(base, layers, before, kernel_view, sut_view, problems, transcript)


def _report(sut: Backend, scenario: Scenario, run: LiveRun, problems: list[str]) -> None:
    assert not problems, (
        f"scenario {scenario.name!r}: {sut.name} differs from kernel overlayfs:\n  "
        + "\n  ".join(problems)
        + f"\nops:\n{run.transcript}\nlowers:\n{describe_stack(scenario.lowers)}"
    )


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveRun]]:
    """Live runs kept for the round-trip tests (which then need no second live run)."""
    runs: dict[str, LiveRun] = {}
    yield runs
    for run in runs.values():
        remove_tree(run.base)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(
    request: pytest.FixtureRequest,
    scenario: Scenario,
    sut: Backend,
    tmp_path: Path,
    live_runs: dict[str, LiveRun],
) -> None:
    _xfail_if_known(request, sut, scenario.name)
    live_runs.pop(scenario.name, None)
    run = run_live(sut, scenario, tmp_path)
    live_runs[scenario.name] = run
    _report(sut, scenario, run, run.problems)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_with_oci_whiteouts_in_the_upper(
    request: pytest.FixtureRequest, scenario: Scenario, sut: Backend, tmp_path: Path
) -> None:
    """unionfs --whiteout-format=oci must show exactly the same (live) view."""
    if sut.name != "unionfs":
        pytest.skip("only for unionfs (the SUT with an OCI-format upper)")
    oci = BACKENDS["unionfs-oci"]
    _xfail_if_known(request, oci, scenario.name)
    run = run_live(oci, scenario, tmp_path)
    try:
        _report(oci, scenario, run, run.problems)
    finally:
        remove_tree(run.base)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_round_trip(
    request: pytest.FixtureRequest,
    scenario: Scenario,
    sut: Backend,
    tmp_path: Path,
    live_runs: dict[str, LiveRun],
) -> None:
    """Each upper, written live by one implementation, read by the other after unmounting."""
    _xfail_if_known(request, sut, "round trip: " + scenario.name)
    run = live_runs.pop(scenario.name, None)
    if run is None:  # the live test did not run in this session (e.g. -k round_trip)
        run = run_live(sut, scenario, tmp_path)
    try:
        problems = list(run.problems)
        if not problems:
            problems += round_trip(sut, run.layers, run.base, run.kernel_view, run.sut_view)
            problems += lowers_unchanged(run.before, run.layers)
        _report(sut, scenario, run, problems)
    finally:
        remove_tree(run.base)


# ----------------------------------------------------------------------------- state machine

WRITE_NAMES = ("a", "b", "c", "d")
WRITE_STACKS = StackOptions(
    min_layers=1,
    max_layers=3,
    max_nodes_per_layer=6,
    names=WRITE_NAMES,
    max_depth=3,
    kinds=("file", "file", "file", "dir", "dir", "dir", "symlink", "hardlink", "fifo",
           "whiteout", "whiteout"),
    xattr_names=("user.test.a", "user.test.b", "trusted.test.c"),
)  # fmt: skip
COMPARE_TREES_EVERY = 5
# trusted.overlay.* names are covered by a scenario; random sequences leave them out so that one
# known difference does not hide every other one.
XATTR_NAMES = ("user.test.a", "user.test.new", "trusted.test.c", "trusted.test.new")
PAST_TIMES = tuple((mtime - 5, mtime + 3) for mtime in MTIMES)


def operations(pool: list[RelPath]) -> st.SearchStrategy[Op]:
    """Random operations, one in four run by an ordinary user (uid = gid = 1000)."""
    return st.tuples(_root_operations(pool), st.sampled_from((0, 0, 0, 1000))).map(
        lambda pair: as_user(pair[1], pair[0])
    )


def _root_operations(pool: list[RelPath]) -> st.SearchStrategy[Op]:
    fresh = paths(WRITE_NAMES, 3)
    path = st.one_of(st.sampled_from(pool), fresh) if pool else fresh
    data = st.sampled_from((b"W", b"hello\n", b"z" * 5000, b""))
    # No empty write into an existing file: kernel overlayfs then copies a metadata-only
    # file's data up in place and leaves the mtime at "now" (README, known differences).
    written = st.sampled_from((b"W", b"hello\n", b"z" * 5000))
    return st.one_of(
        st.builds(Op, st.just("write"), path, data=written,
                  offset=st.sampled_from((0, 1, 4096, 70_000))),
        st.builds(Op, st.just("append"), path, data=written),
        st.builds(Op, st.sampled_from(("truncate", "truncate_path")), path,
                  offset=st.sampled_from((0, 1, 3, 10_000))),
        st.builds(Op, st.just("open_trunc"), path),
        st.builds(Op, st.just("create"), path, data=data,
                  mode=st.sampled_from((0o644, 0o600, 0o4755))),
        st.builds(Op, st.just("mkdir"), path, mode=st.sampled_from((0o755, 0o700, 0o2775))),
        st.builds(Op, st.just("rmdir"), path),
        st.builds(Op, st.just("unlink"), path),
        st.builds(Op, st.just("rename"), path, other=path,
                  flags=st.sampled_from((0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))),
        st.builds(Op, st.just("link"), path, other=path),
        st.builds(Op, st.just("symlink"), path,
                  name=st.sampled_from(("a", "/etc/passwd", "../../x", "b/c"))),
        st.builds(Op, st.just("chmod"), path, mode=st.sampled_from((0o600, 0o755, 0o4711, 0o1777))),
        st.builds(Op, st.just("chown"), path, uid=st.sampled_from((0, 1000, 65534)),
                  gid=st.sampled_from((0, 1000))),
        st.builds(Op, st.just("utime"), path, times_ns=st.sampled_from(PAST_TIMES)),
        st.builds(Op, st.just("setxattr"), path, name=st.sampled_from(XATTR_NAMES),
                  data=st.sampled_from((b"", b"v", b"y"))),
        st.builds(Op, st.just("removexattr"), path, name=st.sampled_from(XATTR_NAMES)),
        st.builds(Op, st.just("mkfifo"), path, mode=st.just(0o644)),
        st.builds(Op, st.sampled_from(("read", "listdir", "stat")), path),
    )  # fmt: skip


class DifferentialMachine(RuleBasedStateMachine):
    """Random stack, then random operations applied to kernel overlayfs and to the SUT."""

    sut: Backend
    workspace: Workspace
    check_round_trip = True  # also remount each upper with the other implementation at the end

    def __init__(self) -> None:
        super().__init__()
        self.pair: Pair | None = None
        self.pool: set[RelPath] = set()
        self.stack: Stack = []
        self.steps = 0
        self.healthy = False
        self.base_context: contextlib.AbstractContextManager[Path] | None = None

    @initialize(stack=stacks(WRITE_STACKS))
    def mount(self, stack: Stack) -> None:
        self.stack = stack
        self.base_context = self.workspace.example_dir()
        self.base = self.base_context.__enter__()
        self.layers = build_stack(stack, self.base / "layers")
        self.before = lower_fingerprint(self.layers)
        self.pair_context = mounted_pair(self.sut, self.layers, self.base)
        self.pair = self.pair_context.__enter__()
        self.pool = all_prefixes(stack_paths(stack))
        self.healthy = True

    def _fail(self, message: str) -> None:
        self.healthy = False
        assert self.pair is not None
        raise AssertionError(
            f"{self.sut.name} differs from kernel overlayfs: {message}\n"
            f"ops:\n{self.pair.transcript()}\nlowers:\n{describe_stack(self.stack)}"
        )

    def _compare_trees(self) -> None:
        assert self.pair is not None
        problems = self.pair.differences()
        if problems:
            self._fail(f"after step {self.steps}:\n  " + "\n  ".join(problems))

    def operations(self) -> st.SearchStrategy[Op]:
        return operations(sorted(self.pool))

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        self.apply(data.draw(self.operations(), label="op"))

    def apply(self, op: Op) -> None:
        """Apply ``op`` to both sides: errno compared, trees every few steps."""
        assert self.pair is not None
        kernel, got = self.pair.step(op)
        self.steps += 1
        if kernel.errno == 0:
            self.pool.update(all_prefixes([op.path] + ([op.other] if op.other else [])))
        if kernel != got:
            self._fail(f"step {self.steps - 1}: {op}: kernel {kernel}, {self.sut.name} {got}")
        if self.steps % COMPARE_TREES_EVERY == 0:
            self._compare_trees()

    def teardown(self) -> None:
        try:
            if self.pair is None:
                return
            views = None
            try:
                if self.healthy:
                    self._compare_trees()
                    views = self.pair.views()
            finally:
                self.pair_context.__exit__(None, None, None)
            if views is not None:
                problems = []
                if self.check_round_trip:
                    problems += round_trip(self.sut, self.layers, self.base, *views)
                problems += lowers_unchanged(self.before, self.layers)
                if problems:
                    raise AssertionError(
                        f"{self.sut.name}: after the sequence:\n  "
                        + "\n  ".join(problems)
                        + f"\nops:\n{self.pair.transcript()}\nlowers:\n{describe_stack(self.stack)}"
                    )
        finally:
            if self.base_context is not None:
                self.base_context.__exit__(None, None, None)


@pytest.mark.timeout(170)
@pytest.mark.parametrize("check_round_trip", [False, True], ids=["live", "round-trip"])
def test_random_operation_sequences(
    request: pytest.FixtureRequest, check_round_trip: bool, sut: Backend, workspace: Workspace
) -> None:
    """Live: errno per step and trees every few steps and at the end. Round trip (fewer
    examples): also each upper remounted by the other implementation at the end."""
    name = "random operation sequences" + (", round trip" if check_round_trip else "")
    _xfail_if_known(request, sut, name)
    machine = type(
        "Machine",
        (DifferentialMachine,),
        {"sut": sut, "workspace": workspace, "check_round_trip": check_round_trip},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            settings.get_profile("differential"),
            max_examples=examples(4 if check_round_trip else 12),
            stateful_step_count=int(os.environ.get("UNIONFS_DIFF_STEPS", 20)),
        ),
    )


def test_generated_mtimes_are_before_the_comparison_limit() -> None:
    assert max(MTIMES) + 10 < GENERATED_MTIME_LIMIT_NS
    assert all(uid >= 0 for uid, _ in OWNERS)
