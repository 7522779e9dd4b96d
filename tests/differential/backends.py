"""The filesystems a differential test can mount, behind one interface.

`ORACLE` is kernel overlayfs (`redirect_dir=on,index=on` when writable). The system under test
(SUT) is chosen by the environment variable `UNIONFS_DIFF_SUT`:

* `unionfs` (default): `python -m unionfs mount [--upper U --workdir W] LAYER... MNT`
* `fuse-overlayfs`: the reference FUSE implementation (used to prove the harness before unionfs
  could mount; it has known differences from the kernel, e.g. hard links on copy-up)
* `kernel`: kernel overlayfs against itself (a sanity check of the harness: must always pass)
* `unionfs-oci`: unionfs with `--whiteout-format oci` (live comparisons only)

Every `mounted()` is a context manager that unmounts on exit, even when the body fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.mounts import fuse_overlayfs_mounted, overlay_mounted, unionfs_mounted

SUT_ENVIRONMENT_VARIABLE = "UNIONFS_DIFF_SUT"
#: Kernel overlayfs serves every user; a FUSE mount only its owner unless allow_other. Operations
#: run as an ordinary user (ops.Op.user) must reach both.
FUSE_OPTIONS = ("allow_other",)
#: Options of the writable kernel oracle; UNIONFS_DIFF_KERNEL_OPTIONS overrides them (comma list),
#: e.g. "redirect_dir=on,index=on,metacopy=on" to see what another configuration makes of an upper.
KERNEL_WRITABLE_OPTIONS = tuple(
    # metacopy=on: unionfs copies metadata-only (like the kernel with metacopy=on); a kernel
    # without it refuses such uppers (documented in the README's known differences).
    os.environ.get("UNIONFS_DIFF_KERNEL_OPTIONS", "redirect_dir=on,index=on,metacopy=on").split(",")
)


#: Options of a read-only kernel mount: follow metadata-only copies and redirects (module
#: defaults may say no), as over uppers rotated into the lowers (rotation.py). Generated stacks
#: carry no overlay xattrs, so the read-only tests see no difference.
KERNEL_READ_ONLY_OPTIONS = ("metacopy=on", "redirect_dir=follow")


#: Extra `-o` options of every unionfs mount; UNIONFS_DIFF_UNIONFS_OPTIONS (comma list), e.g.
#: "metacopy=off" with UNIONFS_DIFF_KERNEL_OPTIONS="redirect_dir=on,index=on": full copy-ups on
#: both sides, so the round trips show the upper is portable to a kernel without metacopy.
UNIONFS_OPTIONS = tuple(
    option for option in os.environ.get("UNIONFS_DIFF_UNIONFS_OPTIONS", "").split(",") if option
)


@dataclass(frozen=True)
class Backend:
    name: str
    reads_oci_whiteouts: bool  # understands `.wh.NAME` / `.wh..wh..opq` in lower layers

    @contextlib.contextmanager
    def mounted(
        self,
        lowers_base_first: Sequence[Path],
        mountpoint: Path,
        *,
        upper: Path | None = None,
        workdir: Path | None = None,
    ) -> Iterator[Path]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        if upper is not None:
            upper.mkdir(parents=True, exist_ok=True)
            assert workdir is not None
            workdir.mkdir(parents=True, exist_ok=True)
        if self.name == "kernel":
            options = KERNEL_WRITABLE_OPTIONS if upper is not None else KERNEL_READ_ONLY_OPTIONS
            with contextlib.ExitStack() as stack:
                # An upper dir stays "in use" (EBUSY) after umount(8) returns while any other
                # mount namespace created meanwhile (podman, bwrap, unshare run by other tests or
                # processes) still holds a copy of the old mount; wait for it to go away.
                for attempt in range(100):
                    try:
                        path = stack.enter_context(
                            overlay_mounted(
                                lowers_base_first,
                                mountpoint,
                                upper=upper,
                                workdir=workdir,
                                options=options,
                            )
                        )
                        break
                    except AssertionError as error:
                        if "busy" not in str(error) or attempt == 99:
                            raise
                        time.sleep(0.1)
                yield path
        elif self.name == "fuse-overlayfs":
            with fuse_overlayfs_mounted(
                lowers_base_first, mountpoint, upper=upper, workdir=workdir, options=FUSE_OPTIONS
            ) as path:
                yield path
        elif self.name in ("unionfs", "unionfs-oci"):
            log = mountpoint.with_name(mountpoint.name + ".unionfs.log")
            extra = ["--whiteout-format", "oci"] if self.name == "unionfs-oci" else []
            extra += [arg for option in UNIONFS_OPTIONS for arg in ("-o", option)]
            with unionfs_mounted(
                lowers_base_first,
                mountpoint,
                upper=upper,
                workdir=workdir,
                options=FUSE_OPTIONS,
                extra_args=extra,
                log=log,
            ) as path:
                yield path
        else:
            raise ValueError(self.name)

    def unavailable_reason(self) -> str | None:
        if self.name == "kernel":
            return None if os.geteuid() == 0 else "kernel overlayfs needs root"
        if self.name == "fuse-overlayfs":
            return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs is not installed"
        return None


ORACLE = Backend("kernel", reads_oci_whiteouts=False)
BACKENDS = {
    "kernel": ORACLE,
    "fuse-overlayfs": Backend("fuse-overlayfs", reads_oci_whiteouts=True),
    "unionfs": Backend("unionfs", reads_oci_whiteouts=True),
    # unionfs writing `.wh.` whiteouts in its upper: the live view must not change (kernel
    # overlayfs cannot read such an upper, so round trips do not apply)
    "unionfs-oci": Backend("unionfs-oci", reads_oci_whiteouts=True),
}


def system_under_test() -> Backend:
    name = os.environ.get(SUT_ENVIRONMENT_VARIABLE, "unionfs")
    if name not in BACKENDS:
        raise ValueError(f"{SUT_ENVIRONMENT_VARIABLE}={name!r}: expected one of {sorted(BACKENDS)}")
    return BACKENDS[name]
