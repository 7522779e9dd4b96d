"""A private, disposable podman/buildah store for end-to-end container tests.

The rig owns one short directory ``/tmp/pm-XXXX`` (long store paths made every ``podman run``
wait out a 20 s conmon timeout) holding:

- ``containers.conf``: runc + cgroupfs + file events logger + no network namespace + explicit
  ulimits (this VM has hybrid cgroup v1 and no CAP_SYS_RESOURCE: crun refuses the cgroup layout
  and runc cannot raise RLIMIT_NPROC, so both limits are set *below* the current hard limits);
- ``storage.conf``: overlay driver with ``mount_program`` = a wrapper script that logs every
  argv, exit code and stderr of the mount program to ``mount-program.log`` and then runs the
  real program (``fuse-overlayfs`` as the reference, or ``python -m unionfs``);
- ``base.tar``: a busybox-static rootfs made here (no registry), imported as ``localhost/base``.

Everything podman does goes through :meth:`PodmanRig.podman` with ``CONTAINERS_CONF`` and
``CONTAINERS_STORAGE_CONF`` pointing at the private files. :meth:`PodmanRig.close` removes every
container and image, resets the store, lazily unmounts anything left under the rig directory and
deletes it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "rm", "mv", "echo", "mkdir", "test", "touch", "ln", "find", "stat", "sort",
    "readlink", "rmdir", "grep", "cp", "true", "false", "id", "chmod", "wc",
)  # fmt: skip


def unionfs_python() -> str:
    """The interpreter that has unionfs and its dependencies importable."""
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        probe = subprocess.run(
            [str(venv), "-c", "import pyfuse3, trio"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return str(venv)
    return sys.executable


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def run_setup_script() -> None:
    """Install podman & co. with scripts/containers-setup when root and something is missing."""
    if os.geteuid() != 0:
        return
    if not missing_tools("podman", "buildah", "runc", "bwrap", "busybox", "newuidmap"):
        return
    subprocess.run(
        [str(REPO / "scripts" / "containers-setup")],
        check=False,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )


def make_busybox_rootfs(root: Path, *, extra: dict[str, str] | None = None) -> None:
    """A minimal static rootfs: /bin/busybox plus applet symlinks, a few data files."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not installed")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "etc", "data/dir", "proc", "dev", "sys"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    files = {
        "etc/motd": "welcome\n",
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "etc/group": "root:x:0:\n",
        "data/keep": "keep\n",
        "data/gone": "to be deleted\n",
        "data/dir/inner": "inner\n",
    }
    files.update(extra or {})
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def write_wrapper(path: Path, log: Path, command: Sequence[str], env: dict[str, str]) -> None:
    """A mount_program wrapper: log argv, run the real program, log its rc and stderr."""
    exports = "".join(f"export {k}={_sh_quote(v)}\n" for k, v in env.items())
    cmd = " ".join(_sh_quote(c) for c in command)
    path.write_text(
        "#!/bin/bash\n"
        f"log={_sh_quote(str(log))}\n"
        f"{exports}"
        "err=$(mktemp /tmp/mp-err.XXXXXX)\n"
        "start=$(date +%s%N)\n"
        'echo "$(date +%T.%N) uid=$(id -u) argv: $0 $*" >> "$log"\n'
        f'{cmd} "$@" 2>"$err" </dev/null\n'
        "rc=$?\n"
        'cat "$err" >&2\n'
        '{ echo "  rc=$rc after $(( ($(date +%s%N) - start) / 1000000 )) ms";'
        ' sed "s/^/  stderr: /" "$err"; } >> "$log"\n'
        'rm -f "$err"\n'
        "exit $rc\n"
    )
    path.chmod(0o755)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


@dataclass
class PodmanRig:
    root: Path
    program: str  # "fuse-overlayfs" or "unionfs"
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run podman as this user (rootless) via runuser
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.root / "mount-program.log"

    @classmethod
    def create(cls, program: str, *, user: str | None = None) -> PodmanRig:
        root = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
        rig = cls(root=root, program=program, user=user)
        rig._write_configs()
        return rig

    def _write_configs(self) -> None:
        r = self.root
        _soft_nproc, hard_nproc = resource.getrlimit(resource.RLIMIT_NPROC)
        nproc = min(4096, hard_nproc if hard_nproc != resource.RLIM_INFINITY else 4096)
        (r / "containers.conf").write_text(
            "[containers]\n"
            'netns = "none"\n'
            f'default_ulimits = ["nofile=1024:1024", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            # Rootful podman's default is the machine-wide /run/libpod: two rigs (two test runs)
            # would share its "alive" file and lock, and one's cleanup breaks the other's.
            f'tmp_dir = "{r}/libpod-tmp"\n'
        )
        wrapper = r / "mount-program"
        if self.program == "fuse-overlayfs":
            real = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
            write_wrapper(wrapper, self.log, [real], {})
        else:
            write_wrapper(
                wrapper,
                self.log,
                [unionfs_python(), "-m", "unionfs"],
                {"PYTHONPATH": str(REPO)},
            )
        (r / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{r}/g"\n'
            f'runroot = "{r}/r"\n'
            f'rootless_storage_path = "{r}/g"\n'
            "[storage.options.overlay]\n"
            f'mount_program = "{wrapper}"\n'
        )
        self.log.touch()
        self.env = {
            "CONTAINERS_CONF": str(r / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(r / "storage.conf"),
        }
        if self.user is not None:
            (r / "xdg").mkdir(mode=0o700)
            (r / "tmp").mkdir(mode=0o700)
            shutil.chown(r, self.user, self.user)
            for p in r.iterdir():
                shutil.chown(p, self.user, self.user)

    def command(self, tool: str, *args: str) -> list[str]:
        if self.user is None:
            return [tool, *args]
        env = [f"{k}={v}" for k, v in self.env.items()]
        xdg = f"XDG_RUNTIME_DIR={self.root}/xdg"
        # The caller's TMPDIR may be private to it: podman needs one the user can write.
        tmp = f"TMPDIR={self.root}/tmp"
        return ["runuser", "-u", self.user, "--", "env", *env, xdg, tmp, f"HOME={self.root}",
                tool, *args]  # fmt: skip

    def run(
        self, tool: str, *args: str, check: bool = True, timeout: float = 120,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        env = {**os.environ, **self.env}
        start = time.monotonic()
        proc = subprocess.run(
            self.command(tool, *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
            input=None if input is None else input.decode(),
        )
        elapsed = time.monotonic() - start
        key = f"{tool} {args[0] if args else ''}"
        self.timings[key] = self.timings.get(key, 0.0) + elapsed
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} -> rc {proc.returncode} in {elapsed:.1f}s\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}\n"
                f"mount program log:\n{self.log_tail()}"
            )
        return proc

    def podman(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("podman", *args, **kw)  # type: ignore[arg-type]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def import_base(self, tag: str = "localhost/base:1") -> str:
        rootfs = self.root / "rootfs"
        make_busybox_rootfs(rootfs)
        tarball = self.root / "base.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True
        )
        if self.user is not None:
            shutil.chown(tarball, self.user, self.user)
        self.podman("import", "-q", str(tarball), tag)
        return tag

    def close(self) -> None:
        for args in (("rm", "-af", "-t", "0"), ("rmi", "-af"), ("system", "reset", "-f")):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.podman(*args, check=False, timeout=60)
        unmount_all_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def mounts_under(root: Path) -> list[str]:
    out = []
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(prefix):
                out.append(mnt)
    return out


def unmount_all_under(root: Path) -> None:
    """fusermount3 -u, then -uz, then umount -l every mount below root (deepest first)."""
    for mnt in sorted(mounts_under(root), key=len, reverse=True):
        for cmd in (["fusermount3", "-u", mnt], ["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
            if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                break


TEST_USER = "unionfs-ct"
SUBID_START = 300000


def ensure_test_user(name: str = TEST_USER) -> tuple[int, int]:
    """An ordinary user (no capabilities) with subuid/subgid ranges, created once (root only)."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", name],
            check=True, capture_output=True,
        )  # fmt: skip
        entry = pwd.getpwnam(name)
    for table in ("/etc/subuid", "/etc/subgid"):
        text = Path(table).read_text() if Path(table).exists() else ""
        if not any(line.split(":")[0] == name for line in text.splitlines()):
            with open(table, "a") as f:
                f.write(f"{name}:{SUBID_START}:65536\n")
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)
    return entry.pw_uid, entry.pw_gid


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
