"""Crash-safety harness: a journaled workload through a unionfs mount, SIGKILL of the daemon at a
random moment, remount of the same upper + workdir, and a check of the result.

Used by ``tests/reliability/test_crash.py`` (a bounded run) and ``scripts/crash-loop`` (hundreds of
kills). Run as a module it is either the workload child or the loop:

    python -m tests.reliability.crashlib loop --kills 300 [--seed N] [--dir DIR]
    python -m tests.reliability.crashlib workload MODEL.json JOURNAL MOUNTPOINT SEED

The model: every path in the merged view maps to ``{"t": "d"}`` or a file
``{"t": "f", "tag": TAG, "mode": MODE}``; a file's content is ``content(TAG)``, whose size is part
of the tag, so a file read back is either exactly some known content or it is corrupt (mixed or
truncated). The workload only uses single-syscall changes (plus create-then-rename for new
content), journals ``begin``/``done`` for each, and exits at the first error (the daemon died).
After the kill every ``done`` operation must be visible (the daemon writes through to the upper's
page cache before replying, so even what was not fsync'd survives a daemon crash), and the one
operation in flight must be either not done or completely done.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.mounts import is_mounted, pid_from_log, unionfs_command, unmount_fuse
from unionfs.check import check_upper, format_report

Model = dict[str, dict[str, Any]]

LOWER_SIZES = [0, 100, 4096, 70_000, 300_000, 1_200_000, 2_500_000, 6_000_000]
NEW_SIZES = [0, 17, 5000, 200_000, 1_500_000]
LOWER_DIRS = 4
EMPTY_LOWER_DIRS = 3
# Lower hard links (name -> the name it is a link of): copying one up goes through the
# hard-link index, and every name must keep showing the one file across kills.
LOWER_HARD_LINKS = {"f8": "f1", "d1/h": "f1", "d2/h": "f5"}
LOWER_NAMES = (
    [f"f{index}" for index in range(len(LOWER_SIZES))]
    + [f"d{d}/g{index}" for d in range(LOWER_DIRS) for index in range(3)]
    + list(LOWER_HARD_LINKS)
)
DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV}


def content(tag: str) -> bytes:
    """The full content of a file with this tag (its size is the tag's last field)."""
    size = int(tag.rsplit(":", 1)[1])
    # 8 hex digits of the tag's hash first: even a file shorter than its tag is unique.
    unit = (hashlib.sha256(tag.encode()).hexdigest()[:8] + tag + "|").encode()
    return (unit * (size // len(unit) + 1))[:size]


def read_tag(data: bytes) -> str:
    """The tag whose content ``data`` is, or ``CORRUPT:...`` when it is no known content."""
    if not data:
        return "EMPTY"  # the content of any size-0 tag; normalized by the caller
    head = data[:200].split(b"|", 1)[0].decode(errors="replace")[8:]
    try:
        size = int(head.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return f"CORRUPT:unparsable:{len(data)}"
    if size != len(data) or content(head) != data:
        return f"CORRUPT:{head}:len={len(data)}"
    return head


# ---------------------------------------------------------------------------- layers


def make_lower(lower: Path) -> Model:
    """Build the lower layer; returns its model."""
    model: Model = {}
    lower.mkdir(parents=True)
    for index, size in enumerate(LOWER_SIZES):
        tag = f"L{index}:{size}"
        (lower / f"f{index}").write_bytes(content(tag))
        model[f"f{index}"] = {"t": "f", "tag": tag, "mode": 0o644, "ino": f"f{index}"}
    for d in range(LOWER_DIRS):
        (lower / f"d{d}" / "sub").mkdir(parents=True)
        model[f"d{d}"] = {"t": "d"}
        model[f"d{d}/sub"] = {"t": "d"}
        for index, size in enumerate([10, 3000, 1_100_000 if d == 0 else 50_000]):
            tag = f"L{d}.{index}:{size}"
            (lower / f"d{d}" / f"g{index}").write_bytes(content(tag))
            model[f"d{d}/g{index}"] = {
                "t": "f",
                "tag": tag,
                "mode": 0o644,
                "ino": f"d{d}/g{index}",
            }
        tag = f"L{d}.s:1000"
        (lower / f"d{d}" / "sub" / "s").write_bytes(content(tag))
        model[f"d{d}/sub/s"] = {"t": "f", "tag": tag, "mode": 0o644, "ino": f"d{d}/sub/s"}
    for e in range(EMPTY_LOWER_DIRS):
        (lower / f"e{e}").mkdir()
        model[f"e{e}"] = {"t": "d"}
    for path in lower.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for name, existing in LOWER_HARD_LINKS.items():
        os.link(lower / existing, lower / name)
        model[name] = dict(model[existing])
    return model


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan(mountpoint: Path, known: Iterable[str] = ()) -> tuple[Model, list[str]]:
    """The merged view as a model, plus problems (temp names, unknown types). ``known`` tags
    are recognized by digest too (a file shorter than its tag cannot name it)."""
    by_digest = {
        _digest(content(tag)): tag
        for tag in known
        if ":" in tag and tag[-2:] != ":0" and not tag.startswith("CORRUPT")
    }
    found: Model = {}
    problems: list[str] = []
    for directory, dirnames, filenames in os.walk(mountpoint):
        for name in dirnames + filenames:
            full = Path(directory) / name
            relative = str(full.relative_to(mountpoint))
            if name.startswith("#unionfs.") or name.startswith(".wh."):
                problems.append(f"internal name visible in the merged view: {relative}")
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                found[relative] = {"t": "d"}
            elif stat.S_ISREG(st.st_mode):
                data = full.read_bytes()
                found[relative] = {
                    "t": "f",
                    "tag": by_digest.get(_digest(data)) or read_tag(data),
                    "mode": stat.S_IMODE(st.st_mode),
                }
            else:
                problems.append(f"unexpected file type {oct(st.st_mode)}: {relative}")
    return found, problems


def _tags(model: Model) -> set[str]:
    return {entry["tag"] for entry in model.values() if entry["t"] == "f"}


def normalized(model: Model) -> Model:
    """The model as a scan sees it: empty files read back as EMPTY; no inode identities."""
    out: Model = {}
    for path, entry in model.items():
        entry = {key: value for key, value in entry.items() if key != "ino"}
        if entry["t"] == "f" and entry["tag"].endswith(":0"):
            entry = {**entry, "tag": "EMPTY"}
        out[path] = entry
    return out


# ---------------------------------------------------------------------------- operations


def apply(model: Model, op: dict[str, Any]) -> Model:
    """The model after ``op`` (pure)."""
    new = dict(model)
    kind = op["op"]
    if kind == "chmod":
        ino = new[op["path"]].get("ino", op["path"])
        for path, entry in new.items():  # every hard link of the file
            if path == op["path"] or (entry["t"] == "f" and entry.get("ino") == ino):
                new[path] = {**entry, "mode": op["mode"]}
    elif kind == "write_tmp":
        new[op["path"]] = {"t": "f", "tag": op["tag"], "mode": 0o644, "ino": op["tag"]}
    elif kind == "link":
        new[op["dst"]] = dict(new[op["src"]])
    elif kind == "rename":
        src, dst = op["src"], op["dst"]
        moved = {p: e for p, e in new.items() if p == src or p.startswith(src + "/")}
        for path in moved:
            del new[path]
        for path, entry in moved.items():
            new[dst + path[len(src) :]] = entry
    elif kind == "unlink" or kind == "rmdir":
        del new[op["path"]]
    elif kind == "mkdir":
        new[op["path"]] = {"t": "d"}
    elif kind in ("fsync", "fsyncdir", "open_rw", "rewrite_byte"):
        pass
    else:
        raise ValueError(f"unknown op {kind}")
    return new


def _children(model: Model, directory: str) -> list[str]:
    prefix = directory + "/" if directory else ""
    return [p for p in model if p.startswith(prefix) and "/" not in p[len(prefix) :]]


def choose(model: Model, rng: random.Random, counter: Iterator[int], seed: int) -> dict[str, Any]:
    files = [p for p, e in model.items() if e["t"] == "f" and not p.split("/")[-1].startswith("t")]
    dirs = [p for p, e in model.items() if e["t"] == "d"]
    parents = ["", *dirs]
    roll = rng.random()
    number = next(counter)
    if files and roll < 0.15:
        return {"op": "chmod", "path": rng.choice(files), "mode": rng.choice([0o600, 0o640, 0o755])}
    if files and roll < 0.22:
        return {"op": "open_rw", "path": rng.choice(files)}
    if files and roll < 0.30:
        # Forces a full data copy-up of a lower file (big ones are copied in a thread)
        # without changing the content: rewrite one byte with itself.
        return {"op": "rewrite_byte", "path": rng.choice(files)}
    gone = [
        path
        for path in LOWER_NAMES
        if path not in model and (path.rpartition("/")[0] in model or "/" not in path)
    ]
    if gone and roll < 0.05:
        # Create where a lower file was deleted or renamed away: replaces a whiteout.
        tag = f"N{seed}_{number}:{rng.choice(NEW_SIZES)}"
        return {"op": "write_tmp", "path": rng.choice(gone), "tag": tag, "sync": True}
    if roll < 0.45:
        parent = rng.choice(parents)
        tmp = (parent + "/" if parent else "") + f"t{seed}_{number}"
        tag = f"N{seed}_{number}:{rng.choice(NEW_SIZES)}"
        # Half fsync before close; the others rely on close() flushing the kernel's write-back
        # cache to the daemon: both must survive a kill once done.
        return {"op": "write_tmp", "path": tmp, "tag": tag, "sync": rng.random() < 0.5}
    tmps = [p for p, e in model.items() if e["t"] == "f" and p.split("/")[-1].startswith("t")]
    if tmps and roll < 0.55:
        src = rng.choice(tmps)
        targets = files if files and rng.random() < 0.5 else None
        if targets:
            dst = rng.choice(targets)  # replace an existing (maybe lower) file atomically
        else:
            parent = rng.choice(parents)
            dst = (parent + "/" if parent else "") + f"n{seed}_{number}"
        return {"op": "rename", "src": src, "dst": dst}
    if files and roll < 0.65:
        src = rng.choice(files)
        parent = rng.choice(parents)
        return {
            "op": "rename",
            "src": src,
            "dst": (parent + "/" if parent else "") + f"m{seed}_{number}",
        }
    if files and roll < 0.72:
        return {"op": "unlink", "path": rng.choice(files)}
    if files and roll < 0.75:
        parent = rng.choice(parents)
        dst = (parent + "/" if parent else "") + f"h{seed}_{number}"
        return {"op": "link", "src": rng.choice(files), "dst": dst}
    if dirs and roll < 0.82:
        src = rng.choice(dirs)
        candidates = [p for p in parents if p != src and not p.startswith(src + "/")]
        parent = rng.choice(candidates)
        return {
            "op": "rename",
            "src": src,
            "dst": (parent + "/" if parent else "") + f"D{seed}_{number}",
        }
    empty = [d for d in dirs if not _children(model, d)]
    if empty and roll < 0.88:
        return {"op": "rmdir", "path": rng.choice(empty)}
    if roll < 0.93:
        parent = rng.choice(parents)
        name = rng.choice([f"e{rng.randrange(EMPTY_LOWER_DIRS)}", f"M{seed}_{number}"])
        path = (parent + "/" if parent else "") + name
        if path not in model:
            return {"op": "mkdir", "path": path}
    if files and roll < 0.97:
        return {"op": "fsync", "path": rng.choice(files)}
    return {"op": "fsyncdir", "path": rng.choice(parents)}


def perform(mountpoint: Path, op: dict[str, Any]) -> None:
    kind = op["op"]
    if kind == "chmod":
        os.chmod(mountpoint / op["path"], op["mode"])
    elif kind == "open_rw":
        os.close(os.open(mountpoint / op["path"], os.O_RDWR))
    elif kind == "rewrite_byte":
        fd = os.open(mountpoint / op["path"], os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            offset = size // 2
            os.pwrite(fd, os.pread(fd, 1, offset), offset)
        finally:
            os.close(fd)
    elif kind == "write_tmp":
        data = content(op["tag"])
        fd = os.open(mountpoint / op["path"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[: 1 << 20]) :]
            if op.get("sync", True):
                os.fsync(fd)
        finally:
            os.close(fd)
    elif kind == "rename":
        os.rename(mountpoint / op["src"], mountpoint / op["dst"])
    elif kind == "unlink":
        os.unlink(mountpoint / op["path"])
    elif kind == "link":
        os.link(mountpoint / op["src"], mountpoint / op["dst"])
    elif kind == "rmdir":
        os.rmdir(mountpoint / op["path"])
    elif kind == "mkdir":
        os.mkdir(mountpoint / op["path"], 0o755)
    elif kind == "fsync":
        fd = os.open(mountpoint / op["path"], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif kind == "fsyncdir":
        fd = os.open(mountpoint / op["path"] if op["path"] else mountpoint, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def workload(
    model_file: Path, journal: Path, mountpoint: Path, seed: int, max_ops: int = 100_000
) -> int:
    """The child: run random operations until one fails; journal every step."""
    os.umask(0)
    model: Model = json.loads(model_file.read_text())
    rng = random.Random(seed)
    counter = iter(range(10**9))
    with open(journal, "w", encoding="utf-8") as log:
        log.write("start\n")
        log.flush()
        for _ in range(max_ops):
            op = choose(model, rng, counter, seed)
            log.write("begin " + json.dumps(op) + "\n")
            log.flush()
            try:
                perform(mountpoint, op)
            except OSError as error:
                log.write(f"error {error.errno} {time.monotonic()} {error.strerror}\n")
                log.flush()
                return 0
            log.write("done\n")
            log.flush()
            model = apply(model, op)
    return 0


def read_journal(
    journal: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, int | None, float]:
    """(completed ops, the op in flight or None, errno of the failure or None, its time)."""
    done: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    failure: int | None = None
    failed_at = 0.0
    for line in journal.read_text().splitlines():
        if line.startswith("begin "):
            pending = json.loads(line[6:])
        elif line == "done" and pending is not None:
            done.append(pending)
            pending = None
        elif line.startswith("error "):
            failure = int(line.split()[1])
            failed_at = float(line.split()[2])
    return done, pending, failure, failed_at


# ---------------------------------------------------------------------------- the loop


@dataclass
class Figures:
    kills: int = 0
    operations: int = 0
    in_flight_applied: int = 0
    in_flight_not_applied: int = 0
    orphans_found: int = 0
    check_problems: int = 0
    data_lost: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.kills} SIGKILLs, {self.operations} operations completed, in flight at the kill:"
            f" {self.in_flight_applied} done + {self.in_flight_not_applied} not done,"
            f" {self.orphans_found} orphaned temp files repaired, {self.check_problems} other"
            f" check problems, {self.data_lost} operations lost, {len(self.failures)} failures"
        )


def _with_identities(actual: Model, *models: Model) -> Model:
    """A scan (which cannot see hard links) as the new model after a mismatch: each file keeps
    the inode identity a model gave it while its content is the one that model expected.
    Without them every later chmod of a hard-linked file would be counted as a failure too."""
    out: Model = {}
    for path, entry in actual.items():
        for model in models:
            known = model.get(path)
            if (
                known is not None
                and "ino" in known
                and normalized({path: known})[path].get("tag") == entry.get("tag")
            ):
                entry = {**entry, "ino": known["ino"]}
                break
        out[path] = entry
    return out


def _describe_difference(expected: Model, actual: Model) -> str:
    lines = []
    for path in sorted(set(expected) | set(actual)):
        if expected.get(path) != actual.get(path):
            lines.append(f"  {path}: expected {expected.get(path)} got {actual.get(path)}")
    return "\n".join(lines[:20])


class CrashLoop:
    """One upper layer, killed and remounted again and again."""

    def __init__(
        self,
        base: Path,
        seed: int,
        log_dir: Path | None = None,
        extra_args: list[str] | None = None,
        keep_evidence: bool = False,
    ) -> None:
        self.extra_args = list(extra_args or [])
        # Copy the upper + workdir as the kill left them (before the offline check and the
        # remount touch them) to BASE/evidence-KILL, with the journal and the expected models
        # (the last two kills are kept: a loss may only show at the next kill's first mount).
        self.keep_evidence = keep_evidence
        self.base = base
        self.rng = random.Random(seed)
        self.seed = seed
        self.lower = base / "lower"
        self.lower_model = make_lower(self.lower)
        self.mountpoint = base / "mnt"
        self.mountpoint.mkdir()
        self.figures = Figures()
        self.episode = 0
        self.log_dir = log_dir or base
        self.new_upper()

    def new_upper(self) -> None:
        self.episode += 1
        self.upper = self.base / f"upper{self.episode}"
        self.workdir = self.base / f"work{self.episode}"
        self.upper.mkdir()
        self.workdir.mkdir()
        self.model = dict(self.lower_model)

    def mount(self, number: int) -> tuple[Path, int]:
        log = self.log_dir / f"daemon-{self.episode}-{number}.log"
        argv = unionfs_command(
            [self.lower],
            self.mountpoint,
            upper=self.upper,
            workdir=self.workdir,
            log=log,
            extra_args=self.extra_args,
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0 or not is_mounted(self.mountpoint):
            raise AssertionError(f"remount failed: {result.returncode} {result.stderr}")
        pid = pid_from_log(log)
        if pid is None:
            raise AssertionError(f"no pid=N first line in {log}")
        return log, pid

    def one_kill(self, number: int) -> None:
        figures = self.figures
        log, pid = self.mount(number)
        killed_at = float("inf")
        try:
            # A fresh mount found an empty work area and the model's state.
            leftovers = list((self.workdir / "work").iterdir())
            if leftovers:
                figures.failures.append(f"kill {number}: work area not cleaned: {leftovers}")
            actual, problems = scan(self.mountpoint, _tags(self.model))
            if actual != normalized(self.model):
                figures.failures.append(
                    f"kill {number}: view after remount differs from the model:\n"
                    + _describe_difference(normalized(self.model), actual)
                )
                self.model = _with_identities(actual, self.model)
            figures.failures.extend(f"kill {number}: {p}" for p in problems)
            model_file = self.base / "model.json"
            model_file.write_text(json.dumps(self.model))
            journal = self.base / "journal"
            journal.unlink(missing_ok=True)
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.reliability.crashlib",
                    "workload",
                    str(model_file),
                    str(journal),
                    str(self.mountpoint),
                    str(self.seed * 100_000 + number),
                ],
                cwd=Path(__file__).resolve().parents[2],
            )
            deadline = time.monotonic() + 20
            while not (journal.exists() and journal.read_text().startswith("start")):
                if time.monotonic() > deadline or child.poll() is not None:
                    raise AssertionError("workload did not start")
                time.sleep(0.01)
            time.sleep(self.rng.uniform(0.0, 0.8))
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            figures.kills += 1
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                figures.failures.append(f"kill {number}: the workload hung after the kill")
        finally:
            if is_mounted(self.mountpoint):
                subprocess.run(
                    ["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False
                )
            unmount_fuse(self.mountpoint, pids=[pid])
        if "Traceback" in log.read_text(errors="replace"):
            figures.failures.append(f"kill {number}: traceback in {log}")
        done, pending, failure, failed_at = read_journal(journal)
        figures.operations += len(done)
        # After the kill, a read through the page cache fails with EIO, others with
        # ENOTCONN/ECONNABORTED; any error before the kill is a bug.
        if failure is not None and (
            failure not in DEAD_ERRNOS | {errno.EIO} or failed_at < killed_at
        ):
            figures.failures.append(
                f"kill {number}: the workload got {errno.errorcode.get(failure, failure)}"
                f" on {pending} ({killed_at - failed_at:.3f} s before the kill)"
            )
        for op in done:
            self.model = apply(self.model, op)
        if self.keep_evidence:
            self.save_evidence(number, journal, pending)
        # Offline check before the remount cleans the work area.
        report = check_upper(self.upper, self.workdir, [self.lower], repair=False)
        orphans = [p for p in report.found if p.kind == "orphan"]
        others = [p for p in report.found if p.kind != "orphan"]
        figures.orphans_found += len(orphans)
        figures.check_problems += len(others)
        if not report.only_repairable:
            figures.failures.append(f"kill {number}: check_upper:\n{format_report(report)}")
        # Compare through a remount: old or new state, never anything else.
        self.verify(number, pending)

    def save_evidence(self, number: int, journal: Path, pending: dict[str, Any] | None) -> None:
        shutil.rmtree(self.base / f"evidence-{number - 2}", ignore_errors=True)
        evidence = self.base / f"evidence-{number}"
        evidence.mkdir()
        # cp -a keeps modes, owners, xattrs (trusted.* as root), hard links and device nodes.
        for name, source in (("upper", self.upper), ("work", self.workdir)):
            subprocess.run(["cp", "-a", str(source), str(evidence / name)], check=True)
        shutil.copy(journal, evidence / "journal")
        full_after = apply(self.model, pending) if pending is not None else self.model
        (evidence / "kill").write_text(
            f"kill {number}, episode {self.episode}, upper {self.upper}\n"
            f"in flight: {json.dumps(pending)}\n"
        )
        (evidence / "model-before.json").write_text(json.dumps(self.model, indent=1))
        (evidence / "model-after.json").write_text(json.dumps(full_after, indent=1))

    def verify(self, number: int, pending: dict[str, Any] | None) -> None:
        figures = self.figures
        log, pid = self.mount(number * 1000 + 999)
        try:
            known = _tags(self.model) | (
                {pending["tag"]} if pending and "tag" in pending else set()
            )
            actual, problems = scan(self.mountpoint, known)
            figures.failures.extend(f"kill {number}: {p}" for p in problems)
            full_after = apply(self.model, pending) if pending is not None else self.model
            before = normalized(self.model)
            after = normalized(full_after)
            if pending is not None and pending["op"] == "write_tmp" and pending["path"] in actual:
                # The one multi-syscall step: a partly written new file is legitimate;
                # it must hold a prefix of its content. Remove it (as an application would).
                path = pending["path"]
                data = (self.mountpoint / path).read_bytes()
                if not content(pending["tag"]).startswith(data):
                    figures.failures.append(f"kill {number}: {path} is no prefix of its content")
                else:
                    actual[path] = after[path]
            if actual == after:
                self.model = full_after
                if pending is not None:
                    figures.in_flight_applied += 1
            elif actual == before:
                pass
                if pending is not None:
                    figures.in_flight_not_applied += 1
            else:
                lost = [p for p in before if p not in actual and p in after]
                figures.data_lost += 1
                figures.failures.append(
                    f"kill {number}: state is neither before nor after {pending}"
                    f" (lost {lost[:5]}):\n" + _describe_difference(after, actual)
                )
                self.model = _with_identities(actual, full_after, self.model)
            # Remove partly written new files so every file holds known content again.
            if pending is not None and pending["op"] == "write_tmp":
                path = pending["path"]
                if path in self.model:
                    os.unlink(self.mountpoint / path)
                    del self.model[path]
        finally:
            unmount_fuse(self.mountpoint, pids=[pid])
        if "Traceback" in log.read_text(errors="replace"):
            figures.failures.append(f"kill {number}: traceback in {log}")
        report = check_upper(self.upper, self.workdir, [self.lower], repair=False)
        if not report.ok:
            figures.failures.append(
                f"kill {number}: check_upper after a clean unmount:\n{format_report(report)}"
            )

    def run(
        self,
        kills: int,
        per_upper: int = 10,
        progress: bool = False,
        stop_on_failure: bool = False,
    ) -> Figures:
        """Kill ``kills`` times; with ``stop_on_failure`` return after the first kill that
        failed, leaving its upper, workdir, journal and logs in place."""
        reported = 0
        for number in range(1, kills + 1):
            if number > 1 and (number - 1) % per_upper == 0:
                shutil.rmtree(self.upper)
                shutil.rmtree(self.workdir)
                self.new_upper()
            self.one_kill(number)
            if progress:
                print(f"[{number}/{kills}] {self.figures.summary()}", flush=True)
                for failure in self.figures.failures[reported:]:
                    print("  ", "\n    ".join(failure.splitlines()[:25]), flush=True)
                reported = len(self.figures.failures)
            if stop_on_failure and self.figures.failures:
                break
        return self.figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crashlib")
    commands = parser.add_subparsers(dest="command", required=True)
    child = commands.add_parser("workload")
    child.add_argument("model", type=Path)
    child.add_argument("journal", type=Path)
    child.add_argument("mountpoint", type=Path)
    child.add_argument("seed", type=int)
    loop = commands.add_parser("loop")
    loop.add_argument("--kills", type=int, default=300)
    loop.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    loop.add_argument("--per-upper", type=int, default=10)
    loop.add_argument("--dir", type=Path, default=None)
    loop.add_argument(
        "--whiteout-format", choices=("overlay", "oci"), default="overlay", help="of the upper"
    )
    loop.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="daemon mount options (e.g. writeback=0, metacopy=off)",
    )
    loop.add_argument(
        "--stop-on-failure",
        action="store_true",
        help="stop at the first failing kill and keep the evidence: DIR/runSEED/evidence-KILL holds"
        " the upper and workdir as each of the last two kills left them, the journal and the models"
        " (DIR is then kept even when not given)",
    )
    args = parser.parse_args(argv)
    if args.command == "workload":
        return workload(args.model, args.journal, args.mountpoint, args.seed)
    with contextlib.ExitStack() as stack:
        if args.dir is not None:
            base = args.dir
        elif args.stop_on_failure:
            base = Path(tempfile.mkdtemp(prefix="crash-"))
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crash-")))
        base.mkdir(parents=True, exist_ok=True)
        print(f"crash-loop: seed {args.seed}, {args.kills} kills, in {base}", flush=True)
        crash = CrashLoop(
            base / f"run{args.seed}",
            args.seed,
            extra_args=["--whiteout-format", args.whiteout_format]
            + [arg for option in args.options for arg in ("-o", option)],
            keep_evidence=args.stop_on_failure,
        )
        figures = crash.run(
            args.kills, args.per_upper, progress=True, stop_on_failure=args.stop_on_failure
        )
        if args.stop_on_failure and figures.failures:
            print(f"crash-loop: stopped at the first failure; evidence in {crash.base}")
        print("crash-loop:", figures.summary())
        for failure in figures.failures:
            print("FAILURE:", failure)
        return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
