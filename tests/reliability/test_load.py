"""Load: many readers and writers at once, parallel tar extraction, stress-ng stressors, 20 mounts
sharing the same lower layers, and a one-minute soak with flat RSS and fd counts (the full soak
is ``scripts/soak``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from tests.reliability.soaklib import ExerciserResult, FileModel, check_models, exercise, soak
from tests.support import TmpLayers
from tests.support.mounts import pid_from_log, unionfs_mounted

FIGURES: dict[str, object] = {}


@pytest.mark.root
@pytest.mark.timeout(120)
def test_random_read_write_truncate_against_models(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    threads = 4
    initial = {
        f"lower{i}": os.urandom(size) for i, size in enumerate([0, 10_000, 300_000, 2 << 20])
    }
    (lower,) = tmp_layers(initial)
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    result = ExerciserResult()
    lock = threading.Lock()
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        per_thread: list[list[FileModel]] = []
        for index in range(threads):
            models = [FileModel(mountpoint / f"lower{index}", initial[f"lower{index}"])]
            for extra in range(2):
                path = mountpoint / f"new{index}.{extra}"
                path.write_bytes(b"")
                models.append(FileModel(path, b""))
            per_thread.append(models)
        workers = [
            threading.Thread(target=exercise, args=(models, 10.0, seed, result, lock))
            for seed, models in enumerate(per_thread)
        ]
        for worker in workers:
            worker.start()
        # Meanwhile, readers that only list and stat.
        for _ in range(200):
            for entry in os.scandir(mountpoint):
                entry.stat()
        for worker in workers:
            worker.join()
        assert not result.errors, result.errors
        assert not result.mismatches, result.mismatches[:10]
        all_models = [model for models in per_thread for model in models]
        assert not check_models(all_models)
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        assert not check_models(all_models), "data differs after a remount"
    for name, data in initial.items():
        assert (lower / name).read_bytes() == data
    FIGURES["exerciser operations"] = result.operations
    print(f"exerciser: {result.operations} operations checked against models, 0 mismatches")
    assert result.operations > 1000


def _make_tree(root: Path, files: int) -> None:
    for index in range(files):
        directory = root / f"dir{index % 40}" / f"sub{index % 7}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"file{index}").write_bytes(os.urandom(index % 5000))
        if index % 100 == 0:
            os.symlink(f"file{index}", directory / f"link{index}")


@pytest.mark.root
@pytest.mark.timeout(180)
def test_parallel_tar_extraction(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    _make_tree(source, 800)
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname=".")
    # A lower layer that already holds part of the tree (extraction overwrites it: copy-ups).
    lower_tree: dict[str, str | bytes] = {}
    for path in list(source.rglob("file1*"))[:200]:
        lower_tree["x0/" + str(path.relative_to(source))] = "old lower content\n"
    (lower,) = tmp_layers(lower_tree)
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        targets = [mountpoint / f"x{i}" for i in range(4)]
        for target in targets:
            target.mkdir(exist_ok=True)
        processes = [
            subprocess.Popen(["tar", "-xf", str(archive), "-C", str(target)]) for target in targets
        ]
        codes = [process.wait(timeout=150) for process in processes]
        assert codes == [0, 0, 0, 0]
        for target in targets:
            diff = subprocess.run(
                ["diff", "-r", "--no-dereference", str(source), str(target)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert diff.returncode == 0, diff.stdout[:2000]
    FIGURES["tar files extracted"] = 4 * 800


@pytest.mark.root
@pytest.mark.timeout(120)
def test_stress_ng_file_stressors(tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path) -> None:
    stress = shutil.which("stress-ng")
    if stress is None:
        pytest.skip("stress-ng is not installed (apt-get install stress-ng)")
    (lower,) = tmp_layers({"base/file": "lower\n"})
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        pid = pid_from_log(log)
        result = subprocess.run(
            [
                stress,
                "--temp-path",
                str(mountpoint),
                "--hdd",
                "2",
                "--hdd-bytes",
                "8M",
                "--dir",
                "1",
                "--dir-dirs",
                "256",
                "--rename",
                "1",
                "--timeout",
                "10s",
                "--metrics-brief",
                "--verify",
            ],
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert pid is not None and Path(f"/proc/{pid}").exists()
        assert (mountpoint / "base" / "file").read_text() == "lower\n"
        FIGURES["stress-ng"] = result.stderr.strip().splitlines()[-6:]
        print(result.stderr)


@pytest.mark.root
@pytest.mark.timeout(180)
def test_twenty_mounts_share_lower_layers(tmp_layers: TmpLayers, tmp_path: Path) -> None:
    base, top = tmp_layers(
        {"shared": "base\n", "dir/f": "f\n", "big": os.urandom(1 << 20)},
        {"top": "top\n", "dir/g": "g\n"},
    )
    big = (base / "big").read_bytes()
    count = 20
    with contextlib.ExitStack() as stack:
        mounts = []
        for index in range(count):
            mnt = tmp_path / f"mnt{index}"
            mnt.mkdir()
            stack.enter_context(
                unionfs_mounted(
                    [base, top],
                    mnt,
                    upper=tmp_path / f"upper{index}",
                    workdir=tmp_path / f"work{index}",
                    log=tmp_path / f"daemon{index}.log",
                )
            )
            mounts.append(mnt)
        errors: list[str] = []

        def work(index: int, mnt: Path) -> None:
            try:
                for round_ in range(10):
                    (mnt / "shared").write_text(f"mount {index} round {round_}\n")
                    (mnt / f"own{round_ % 3}").write_text(f"{index}\n")
                    with open(mnt / "big", "r+b") as file:
                        file.seek(index)
                        file.write(b"!")
                    assert sorted(os.listdir(mnt / "dir")) == ["f", "g"]
                    assert (mnt / "top").read_text() == "top\n"
            except Exception as error:
                errors.append(f"mount {index}: {error!r}")

        workers = [
            threading.Thread(target=work, args=(index, mnt)) for index, mnt in enumerate(mounts)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not errors, errors
        for index, mnt in enumerate(mounts):
            assert (mnt / "shared").read_text() == f"mount {index} round 9\n"
            data = (mnt / "big").read_bytes()
            assert data[index : index + 1] == b"!" and data.count(b"!") <= big.count(b"!") + 1
    assert (base / "shared").read_text() == "base\n"
    assert (base / "big").read_bytes() == big


@pytest.mark.root
@pytest.mark.timeout(150)
def test_one_minute_soak_flat_rss_and_fds(tmp_path: Path) -> None:
    duration = float(os.environ.get("UNIONFS_SOAK_SECONDS", "60"))
    samples, baseline, final, problems = soak(tmp_path, duration, threads=3, sample_every=5)
    assert not problems, problems
    for sample in samples:
        print(sample)
    # Cached directory fds of the workers' directories may stay (the cache is bounded).
    assert final <= baseline + 3 + 4, f"fds: {baseline} at start, {final} after all closed"
    settled = samples[len(samples) // 4]
    last = samples[-1]
    growth = last.rss_kib - settled.rss_kib
    assert growth < 30 * 1024, f"RSS grew {growth} KiB from t={settled.seconds:.0f}s"
    assert max(sample.fds for sample in samples) < baseline + 64
    FIGURES["soak"] = (last.operations, settled.rss_kib, last.rss_kib, baseline, final)


def _snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Names, types, modes and contents of a tree (never following symlinks)."""
    view: dict[str, tuple[str, int, bytes]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            st = os.lstat(path)
            kind = "d" if path.is_dir() and not path.is_symlink() else "f"
            data = path.read_bytes() if kind == "f" and not path.is_symlink() else b""
            view[str(path.relative_to(root))] = (kind, st.st_mode, data)
    return view


def _storm(
    root: Path, seconds: float, seed: int, errors: dict[str, int], lock: threading.Lock
) -> int:
    import errno as errnos
    import random
    import time

    rng = random.Random(seed)
    names = [f"{d}/{n}" for d in ("a", "b", "a/c", "lowerdir") for n in ("x", "y", "z", "w")]
    names += ["a", "b", "lowerdir", "lowerfile", "a/c"]
    allowed = {
        errnos.ENOENT,
        errnos.EEXIST,
        errnos.ENOTEMPTY,
        errnos.EISDIR,
        errnos.ENOTDIR,
        errnos.EINVAL,
    }
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        first, second = root / rng.choice(names), root / rng.choice(names)
        roll = rng.random()
        try:
            if roll < 0.2:
                fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, rng.randbytes(rng.choice([0, 10, 5000])))
                except OSError:
                    os.close(fd)
                    raise
                roll = 2.0  # an error of close() (the write-back flush) is never expected
                os.close(fd)
            elif roll < 0.35:
                os.rename(first, second)
            elif roll < 0.45:
                os.unlink(first)
            elif roll < 0.55:
                os.mkdir(first)
            elif roll < 0.62:
                os.rmdir(first)
            elif roll < 0.7:
                roll = 1.0  # EPERM: link(2) of a directory (maybe just renamed there)
                os.link(first, second)
            elif roll < 0.78:
                os.chmod(first, rng.choice([0o600, 0o644, 0o755]))
            elif roll < 0.9:
                if first.is_dir():
                    os.listdir(first)
                else:
                    first.read_bytes()
            else:
                os.stat(first)
        except OSError as error:
            expected = error.errno in allowed and roll != 2.0
            if not expected and not (roll == 1.0 and error.errno == errnos.EPERM):
                key = f"{errnos.errorcode.get(error.errno or 0, error.errno)} at roll {roll:.2f}"
                with lock:
                    errors[key] = errors.get(key, 0) + 1
        count += 1
    return count


@pytest.mark.root
@pytest.mark.timeout(120)
def test_concurrent_namespace_storm(
    tmp_layers: TmpLayers, mountpoint: Path, tmp_path: Path
) -> None:
    """Threads renaming, linking, creating and deleting the same few names (files and lower
    directories) at once: only the errors the syscalls document, and the view survives a
    remount unchanged with a clean upper."""
    from unionfs.check import check_upper, format_report

    (lower,) = tmp_layers(
        {"lowerdir/x": "lx\n", "lowerdir/y": "ly\n", "lowerfile": "lf\n", "a/c/x": "acx\n"}
    )
    upper, workdir, log = tmp_path / "upper", tmp_path / "work", tmp_path / "daemon.log"
    errors: dict[str, int] = {}
    lock = threading.Lock()
    counts: list[int] = []
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        workers = [
            threading.Thread(
                target=lambda seed=seed: counts.append(_storm(mountpoint, 8.0, seed, errors, lock))
            )
            for seed in range(6)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        view = _snapshot(mountpoint)
    report = check_upper(upper, workdir, [lower], repair=False)
    assert report.ok, format_report(report)
    with unionfs_mounted([lower], mountpoint, upper=upper, workdir=workdir, log=log):
        again = _snapshot(mountpoint)
    differences = {
        name: (view.get(name), again.get(name))
        for name in sorted(set(view) | set(again))
        if view.get(name) != again.get(name)
    }
    # Once: stale kernel sizes (FUSE atomic O_TRUNC race, fixed by turning it off: see
    # test_regressions.py::test_concurrent_o_trunc_opens_keep_the_size_right), and ENOENT from
    # close() (the times SETATTR of a file renamed over while open).
    # Still, about one run in 15: one ESTALE, not from the daemon (in a run traced with --debug,
    # which logs every answer, the daemon never answered ESTALE): most likely the kernel's
    # dentry splicing under racing directory renames. Reported (README), not failed on.
    estale = {key: count for key, count in errors.items() if key.startswith("ESTALE")}
    unexpected = {key: count for key, count in errors.items() if key not in estale}
    assert not unexpected, f"errno the syscalls do not document here: {unexpected}"
    if estale:
        print(f"namespace storm: ESTALE from the kernel: {estale}")
    assert not differences, f"view before and after a remount differ: {differences}"
    FIGURES["namespace storm operations"] = sum(counts)
    print(f"namespace storm: {sum(counts)} operations by 6 threads")
