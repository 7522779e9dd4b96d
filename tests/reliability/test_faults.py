"""Faults: a full upper, a read-only upper, too few fds, layers vanishing under the mount, and
handlers that raise anything at all. The failing call gets a clean errno, nothing half-made is
left in the upper, and the daemon never dies or hangs: after every fault the mount answers ``ls``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import DIR, TmpLayers
from tests.support.mounts import (
    fuse_mounted,
    pid_from_log,
    unionfs_command,
    unionfs_mounted,
)
from unionfs.check import check_upper, format_report

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only); always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def answers(mountpoint: Path, pid: int | None) -> list[str]:
    """The daemon is alive and the mount answers ``ls`` (the check after every fault)."""
    assert alive(pid), "the daemon died"
    return sorted(os.listdir(mountpoint))


def errno_of(action: Callable[[], object]) -> int | None:
    try:
        action()
    except OSError as error:
        return error.errno
    return None


def free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


@pytest.mark.root
@pytest.mark.parametrize("cache", ["writeback", "writeback=0"])
def test_upper_full_enospc_and_recovery(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path, cache: str
) -> None:
    """With the kernel write-back cache (the default) ENOSPC reaches the write, the fsync or
    the close that fails; with ``-o writeback=0`` it reaches the failing write() itself."""
    big = os.urandom(3 * MIB)
    (lower,) = tmp_layers({"big": big, "small": "small\n", "dir": DIR, "dir/f": "f\n"})
    options = ["writeback=0"] if cache == "writeback=0" else []
    with tmpfs(tmp_path / "small-fs", "2m") as fs:
        upper, workdir = fs / "upper", fs / "work"
        log = tmp_path / "daemon.log"
        with unionfs_mounted(
            [lower], mountpoint, upper=upper, workdir=workdir, log=log, options=options
        ):
            pid = pid_from_log(log)
            baseline = free_bytes(fs)
            # 1. Copy-up of a lower file bigger than the free space: ENOSPC, nothing left.
            code = errno_of(lambda: open(mountpoint / "big", "r+b").close())
            assert code == errno.ENOSPC
            assert not (upper / "big").exists() or (upper / "big").stat().st_blocks == 0
            assert list((workdir / "work").iterdir()) == []
            assert free_bytes(fs) >= baseline - 64 * 1024
            assert (mountpoint / "big").read_bytes() == big  # still the lower file
            assert answers(mountpoint, pid) == ["big", "dir", "small"]
            # 2. Write a new file until the upper is full: the failing call gets ENOSPC.
            written = 0
            with pytest.raises(OSError) as raised:
                fd = os.open(mountpoint / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
                try:
                    while written < 4 * MIB:
                        written += os.write(fd, b"x" * 65536)
                        if cache == "writeback" and written % (256 * 1024) == 0:
                            os.fsync(fd)
                finally:
                    os.close(fd)
            assert raised.value.errno == errno.ENOSPC
            assert written <= (2 * MIB if cache == "writeback=0" else 4 * MIB)
            assert written > MIB
            assert answers(mountpoint, pid) == ["big", "dir", "filler", "small"]
            # Full: a copy-up of even a small file fails cleanly, a mkdir too.
            # (open without O_TRUNC: the copy-up itself needs a data block)
            code = errno_of(lambda: open(mountpoint / "small", "r+b").close())
            assert code == errno.ENOSPC
            assert (mountpoint / "small").read_text() == "small\n"
            assert not (upper / "small").exists()
            # 3. Free the space: everything works again.
            (mountpoint / "filler").unlink()
            (mountpoint / "small").write_text("changed\n")
            (mountpoint / "dir" / "f").write_text("f2\n")
            os.mkdir(mountpoint / "newdir")
            assert (mountpoint / "small").read_text() == "changed\n"
            assert answers(mountpoint, pid) == ["big", "dir", "newdir", "small"]
        report = check_upper(upper, workdir, [lower], repair=False)
        assert report.ok, format_report(report)


@pytest.mark.root
def test_upper_remounted_read_only_gives_erofs(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    (lower,) = tmp_layers({"file": "lower\n", "dir": DIR, "dir/f": "f\n"})
    with tmpfs(tmp_path / "fs", "16m") as fs:
        upper, workdir = fs / "upper", fs / "work"
        log = tmp_path / "daemon.log"
        with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
            pid = pid_from_log(log)
            (mountpoint / "before").write_text("before\n")
            # Releases are asynchronous: the daemon may hold "before" open for a moment.
            for _ in range(50):
                remount = subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=False)
                if remount.returncode == 0:
                    break
                time.sleep(0.1)
            assert remount.returncode == 0, "cannot remount the upper's filesystem ro"
            try:
                assert errno_of(lambda: (mountpoint / "new").write_text("x")) == errno.EROFS
                assert errno_of(lambda: (mountpoint / "file").write_text("x")) == errno.EROFS
                assert errno_of(lambda: os.mkdir(mountpoint / "d")) == errno.EROFS
                assert errno_of(lambda: os.unlink(mountpoint / "file")) == errno.EROFS
                assert errno_of(lambda: os.rename(mountpoint / "dir", mountpoint / "x")) in (
                    errno.EROFS,
                )
                assert (mountpoint / "file").read_text() == "lower\n"
                assert (mountpoint / "before").read_text() == "before\n"
                assert answers(mountpoint, pid) == ["before", "dir", "file"]
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
            (mountpoint / "file").write_text("upper\n")
            os.rename(mountpoint / "dir", mountpoint / "x")
            assert answers(mountpoint, pid) == ["before", "file", "x"]
            assert (mountpoint / "x" / "f").read_text() == "f\n"
        report = check_upper(upper, workdir, [lower], repair=False)
        assert report.ok, format_report(report)


@pytest.mark.root
def test_too_few_fds_gives_emfile_and_recovers(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    files = {f"d{i // 50}/f{i}": f"{i}\n" for i in range(300)}
    (lower,) = tmp_layers(files)
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    log = tmp_path / "daemon.log"
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    argv = [
        "prlimit",
        "--nofile=64:64",
        *unionfs_command([lower], mountpoint, upper=upper, workdir=workdir, log=log),
    ]
    with fuse_mounted(argv, mountpoint, marker="unionfs", log=log):
        pid = pid_from_log(log)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and " 64 " in line for line in limits.split("\n")
        )
        opened: list[int] = []
        failures: dict[int, int] = {}
        try:
            for i in range(300):
                name = f"d{i // 50}/f{i}"
                mode = os.O_RDONLY if i % 2 else os.O_RDWR  # reads and copy-ups
                try:
                    opened.append(os.open(mountpoint / name, mode))
                except OSError as error:
                    number = error.errno or 0
                    failures[number] = failures.get(number, 0) + 1
            assert failures, "64 fds in the daemon should not hold 300 open files"
            assert set(failures) <= {errno.EMFILE, errno.ENFILE}, failures
            # While out of fds even ls may fail (EMFILE), but the daemon lives on.
            assert alive(pid)
            assert errno_of(lambda: os.listdir(mountpoint)) in (None, errno.EMFILE)
        finally:
            for fd in opened:
                os.close(fd)
        # Every file closed: the daemon recovers fully.
        for i in range(300):
            assert (mountpoint / f"d{i // 50}/f{i}").read_text() == f"{i}\n"
        (mountpoint / "d0" / "f0").write_text("changed\n")
        assert answers(mountpoint, pid) == [f"d{i}" for i in range(6)]
        fd_count = len(os.listdir(f"/proc/{pid}/fd"))
        assert fd_count < 64


@pytest.mark.root
def test_layer_directories_removed_while_mounted(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    base, top = tmp_layers(
        {"a/b/c/f": "base f\n", "a/g": "g\n", "keep": "keep\n"},
        {"a/b/c/h": "top h\n", "t/u": "u\n"},
    )
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    log = tmp_path / "daemon.log"
    with unionfs_mounted([base, top], mountpoint, upper=upper, workdir=workdir, log=log):
        pid = pid_from_log(log)
        c = mountpoint / "a" / "b" / "c"
        assert sorted(os.listdir(c)) == ["f", "h"]
        held = os.open(c / "f", os.O_RDONLY)  # an open file whose directory vanishes
        try:
            (mountpoint / "a" / "newfile").write_text("upper\n")
            shutil.rmtree(base / "a" / "b")  # behind the mount's back
            shutil.rmtree(top / "t")
            (upper / "a" / "newfile").unlink()
            # Errors (or stale cached answers), never a crash or a hang.
            for action in (
                lambda: os.listdir(c),
                lambda: (c / "f").read_text(),
                lambda: (c / "h").read_text(),
                lambda: os.listdir(mountpoint / "t"),
                lambda: (mountpoint / "t" / "u").read_text(),
                lambda: (mountpoint / "a" / "newfile").read_text(),
                lambda: (c / "new").write_text("x"),
                lambda: os.rename(c / "h", mountpoint / "moved"),
                lambda: os.pread(held, 100, 0),
            ):
                code = errno_of(action)
                assert code in (None, errno.ENOENT, errno.ESTALE, errno.EIO, errno.ENOTDIR), code
                assert "keep" in answers(mountpoint, pid)
        finally:
            os.close(held)
        assert (mountpoint / "keep").read_text() == "keep\n"
        assert (mountpoint / "a" / "g").read_text() == "g\n"
        # A whole lower layer directory replaced by a file: still no crash.
        shutil.rmtree(base / "a")
        (base / "a").write_text("now a file\n")
        code = errno_of(lambda: os.listdir(mountpoint / "a"))
        assert code in (None, errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.EIO)
        assert "keep" in answers(mountpoint, pid)


FAULT_INJECTOR = """
import errno, os, random

TRIGGER = os.environ.get("UNIONFS_FAULTS")
if TRIGGER:
    from unionfs import safeio

    rng = random.Random(1)
    KINDS = [
        lambda: RuntimeError("injected"),
        lambda: KeyError("injected"),
        lambda: AssertionError("injected"),
        lambda: ZeroDivisionError("injected"),
        lambda: OSError(errno.EIO, "injected"),
        lambda: OSError(errno.ENOMEM, "injected"),
        lambda: ValueError("injected"),
    ]

    def wrap(function):
        def faulty(*args, **kwargs):
            if os.path.exists(TRIGGER) and rng.random() < 0.2:
                with open(TRIGGER + ".count", "a") as count:
                    count.write("x")
                raise rng.choice(KINDS)()
            return function(*args, **kwargs)
        return faulty

    for name in ("open_dir", "open_file", "lstat", "list_dir", "get_xattr", "list_xattrs",
                 "renameat2", "copy_data", "readlink", "set_xattr", "open_lower_file"):
        if hasattr(safeio, name):
            setattr(safeio, name, wrap(getattr(safeio, name)))
"""


def _fault_round(d: Path, r: int, top: Path) -> list[Callable[[], object]]:
    return [
        lambda: os.listdir(d),
        lambda: (d / f"f{r}").read_text(),
        lambda: (d / f"f{r}").write_text("w\n"),
        lambda: (d / f"n{r}").write_text("n\n"),
        lambda: os.rename(d / "f9", d / "g"),
        lambda: os.unlink(d / f"f{r + 1}"),
        lambda: os.mkdir(d / f"m{r}"),
        lambda: os.chmod(d / "f8", 0o600),
        lambda: os.rename(d, d.with_name(f"D{d.name}.{r}")),
        lambda: os.stat(top),
    ]


@pytest.mark.root
@pytest.mark.timeout(180)
def test_handlers_raising_anything_never_kill_the_daemon(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Every safeio call fails 20% of the time with a random exception (injected through a
    sitecustomize module): requests fail with an errno, the daemon stays up and answers."""
    (lower,) = tmp_layers(
        {f"d{i}/f{j}": f"{i}.{j}\n" for i in range(5) for j in range(10)} | {"top": "top\n"}
    )
    upper, workdir = tmp_path / "upper", tmp_path / "work"
    log = tmp_path / "daemon.log"
    injector = tmp_path / "inject"
    injector.mkdir()
    (injector / "sitecustomize.py").write_text(textwrap.dedent(FAULT_INJECTOR))
    trigger = tmp_path / "faults-on"
    env = os.environ.copy()
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(injector), root, *filter(None, [env.get("PYTHONPATH")])]
    )
    env["UNIONFS_FAULTS"] = str(trigger)
    # The injector replaces safeio's functions in the module; the mypyc-compiled modules call
    # each other directly, past the module's attributes: faults are injected into pure Python.
    env["UNIONFS_COMPILE"] = "0"
    argv = unionfs_command([lower], mountpoint, upper=upper, workdir=workdir, log=log)
    keep = ("PYTHONPATH", "UNIONFS_FAULTS", "UNIONFS_COMPILE")
    argv = ["env", *(f"{k}={env[k]}" for k in keep), *argv]
    errors: dict[int, int] = {}
    with fuse_mounted(argv, mountpoint, marker="unionfs", log=log, check_log=False):
        pid = pid_from_log(log)
        trigger.write_text("")
        operations = 0
        for round_ in range(6):
            for i in range(5):
                for action in _fault_round(mountpoint / f"d{i}", round_, mountpoint / "top"):
                    operations += 1
                    code = errno_of(action)
                    if code is not None:
                        errors[code] = errors.get(code, 0) + 1
            assert alive(pid), "the daemon died under injected faults"
        injected = len(Path(str(trigger) + ".count").read_text())
        trigger.unlink()
        # Faults off: the mount works normally again.
        assert alive(pid)
        names = os.listdir(mountpoint)
        assert "top" in names
        (mountpoint / "after").write_text("after\n")
        assert (mountpoint / "after").read_text() == "after\n"
        assert (mountpoint / "top").read_text() == "top\n"
    print(f"{operations} operations, {injected} injected faults, errors {errors}")
    assert injected > 20
    assert errors, "injected faults must surface as errors"
    unexpected = set(errors) - {
        errno.EIO,
        errno.ENOMEM,
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENOTDIR,
    }
    assert not unexpected, errors
    assert "internal error" in log.read_text()  # non-OSErrors were logged, answered EIO
