"""Offline checker of an upper layer (and its work directory): find and repair what a crash
or a foreign tool can leave behind.

``check_upper(upper, workdir, lowers, repair=...)`` walks the upper layer without following
any symlink (every directory is opened relative to its parent with ``O_NOFOLLOW``) and
reports:

- ``orphan``: anything in ``WORKDIR/work`` (temporary copy-ups, half-made directories and
  whiteouts named ``#unionfs.*``); the work area is private scratch, so repair removes it.
- ``orphan-index``: an entry of the hard-link index ``WORKDIR/index`` that no name uses any
  more (only the index links it and its recorded merged link count is 0: a crash after the
  last name went); repair removes it, as the next mount would.
- ``malformed-whiteout``: a ``.wh.NAME`` that is not an empty regular file, or whose target
  is no name at all (``.wh.``, ``.wh..``, ``.wh...``, ...); reported, not repaired (it may be
  user data from a foreign tool).
- ``malformed-opaque``: a ``.wh..wh..opq`` that is not an empty regular file, or an opaque
  xattr whose value is neither ``y`` nor ``x``; reported.
- ``opaque-both-forms``: a directory marked opaque by an xattr and by ``.wh..wh..opq``;
  repair removes the redundant marker file (the xattr is the overlay format's own form).
- ``half-opaque``: a directory ``NAME`` next to an OCI whiteout ``.wh.NAME`` in the same
  upper directory, the state ``mkdir`` over an OCI whiteout is in between its two steps (the
  merged view already hides the lower ``NAME``); repair marks the directory opaque (in the
  form the layer uses) and removes ``.wh.NAME``, which gives the same view.
- ``stale-whiteout``: a regular file/symlink/device ``NAME`` next to ``.wh.NAME`` (create over
  an OCI whiteout interrupted before the whiteout was removed); repair removes ``.wh.NAME``.
- ``invalid-redirect``: an ``overlay.redirect`` that is empty, climbs (``..``), is relative
  with a ``/``, or sits on a non-directory that is no regular file (a regular file keeps its
  redirect when its data is copied up, as kernel overlayfs leaves it); reported.
- ``dangling-metacopy``: (when ``lowers`` are given) a metadata-only copy-up
  (``overlay.metacopy``) whose data cannot be found in the lower layers the way kernel
  overlayfs finds it: at its redirect, else at its name, following the chain of older
  metadata-only copies in rotated lower layers down to a file holding data; its content is
  lost; reported.
- ``dangling-redirect``: (when ``lowers`` are given) a valid redirect naming a path that is no
  directory in the lower layers' merged view; reported.
- ``dangling-whiteout`` (a note, not a problem): (when ``lowers`` are given) a whiteout hiding
  a name the lower layers do not show at that merged position. Harmless and normal: kernel
  overlayfs and unionfs both leave one where a merged directory was renamed away.

Run it only while no mount uses the upper: the work area of a live mount is in use.
Paths in the report start with ``/`` (relative to the upper) or ``work/``; bytes that are
not printable ASCII are escaped as in a Python ``bytes`` repr, so a report line is one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unionfs import quota, safeio, whiteout
from unionfs.layer import Layer
from unionfs.safeio import RelPath
from unionfs.stack import Stack

WORK_NAME = b"work"
INDEX_NAME = b"index"


@dataclass(frozen=True)
class Problem:
    """One finding. ``path`` is relative to the upper (or to the workdir for orphans)."""

    kind: str
    path: str
    detail: str
    repairable: bool


@dataclass
class CheckReport:
    upper: Path
    workdir: Path | None
    found: list[Problem] = field(default_factory=list)
    repaired: list[Problem] = field(default_factory=list)
    left: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # harmless oddities, never repaired
    entries_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem remains (none found, or every one repaired)."""
        return not self.left

    @property
    def only_repairable(self) -> bool:
        """True when every problem found was (or could be) repaired."""
        return all(problem.repairable for problem in self.found)


def _show(path: RelPath) -> str:
    """A printable path: bytes that are not printable ASCII are escaped as in ``repr``."""
    return "/" + "/".join(repr(part)[2:-1] for part in path)


class _Checker:
    def __init__(self, report: CheckReport, repair: bool, lowers: Stack | None) -> None:
        self.report = report
        self.repair = repair
        self.lowers = lowers
        self.privileged = os.geteuid() == 0

    def lower_shows(self, directory: RelPath | None, name: bytes) -> bool:
        """Do the lower layers show ``name`` in their merged directory ``directory``?"""
        assert self.lowers is not None
        sources = self.lowers.walk(directory) if directory is not None else None
        return sources is not None and self.lowers.resolve(sources, name) is not None

    def problem(
        self, kind: str, path: str, detail: str, fix: Callable[[], None] | None = None
    ) -> None:
        """Record a problem; ``fix`` (a callable) repairs it when repairing."""
        found = Problem(kind, path, detail, repairable=fix is not None)
        self.report.found.append(found)
        if self.repair and fix is not None:
            try:
                fix()
            except OSError as error:
                self.report.left.append(
                    Problem(kind, path, f"{detail}; repair failed: {error.strerror}", False)
                )
                return
            self.report.repaired.append(found)
        else:
            self.report.left.append(found)

    # quota record ------------------------------------------------------------------
    def check_quota(self, workdir: Path, root_fd: int) -> None:
        """The usage in the quota record (``unionfs.quota``) must be what the upper holds:
        a mount that ended without writing it (killed) leaves a stale one."""
        try:
            base_fd = safeio.open_root(str(workdir))
        except OSError:
            return
        try:
            record = quota.read_record(base_fd)
            if record is None:
                return
            usage = quota.walk_usage(root_fd)
            if record == {} or record.get("used_bytes") is None:
                detail = "the quota record is damaged (its limits are lost)"

                def drop() -> None:
                    quota.remove_record(base_fd)

                self.problem("quota-record", "unionfs-quota", detail, drop)
                return
            if (record.get("used_bytes"), record.get("used_inodes")) == (
                usage.bytes,
                usage.inodes,
            ):
                return
            detail = (
                f"quota record says {record.get('used_bytes')} bytes and "
                f"{record.get('used_inodes')} inodes used; the upper holds {usage.bytes} "
                f"bytes and {usage.inodes} inodes"
            )
            fixed = {**record, "used_bytes": usage.bytes, "used_inodes": usage.inodes}

            def rewrite() -> None:
                quota.write_record(base_fd, fixed)

            self.problem("quota-record", "unionfs-quota", detail, rewrite)
        finally:
            os.close(base_fd)

    # work area and index -------------------------------------------------------------
    def check_work(self, workdir: Path) -> None:
        with _workdir_part(workdir, WORK_NAME) as work_fd:
            if work_fd is None:
                return
            for name, kind in sorted(safeio.list_dir(work_fd)):
                what = "directory" if kind == stat.S_IFDIR else "entry"
                prefix = "temporary" if name.startswith(b"#unionfs.") else "foreign"

                def fix(name: bytes = name, work_fd: int = work_fd) -> None:
                    safeio.remove_tree(work_fd, name)

                self.problem(
                    "orphan",
                    "work/" + repr(name)[2:-1],
                    f"{prefix} {what} left in the work area",
                    fix,
                )

    def check_index(self, workdir: Path) -> None:
        with _workdir_part(workdir, INDEX_NAME) as index_fd:
            if index_fd is None:
                return
            for name, _kind in sorted(safeio.list_dir(index_fd)):
                st = safeio.try_lstat(index_fd, name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    continue
                if not any(
                    whiteout.index_entry_unused(
                        st.st_nlink,
                        whiteout.parse_nlink(safeio.get_xattr(index_fd, name, attribute)),
                    )
                    for attribute in whiteout.NLINK_XATTRS
                ):
                    continue

                def unlink(name: bytes = name, index_fd: int = index_fd) -> None:
                    safeio.unlink(index_fd, name)

                self.problem(
                    "orphan-index",
                    "index/" + repr(name)[2:-1],
                    "hard-link index entry no name uses any more",
                    unlink,
                )

    # upper tree ----------------------------------------------------------------------
    def walk(self, root_fd: int) -> None:
        # Iterative depth-first walk holding one fd per level (never one per sibling).
        # ``lower`` is a directory's path in the lower layers (None: nothing shows through).
        frames: list[tuple[int, RelPath, list[tuple[bytes, RelPath | None]]]] = []
        frames.append((root_fd, (), self.check_dir(root_fd, (), ())))
        try:
            while frames:
                fd, path, pending = frames[-1]
                if not pending:
                    frames.pop()
                    if frames:
                        os.close(fd)
                    continue
                name, child_lower = pending.pop()
                child_path = (*path, name)
                try:
                    child_fd = safeio.open_dir(fd, name)
                except OSError as error:
                    if error.errno == errno.EMFILE:
                        raise
                    self.problem("unreadable", _show(child_path), f"cannot open: {error.strerror}")
                    continue
                try:
                    children = self.check_dir(child_fd, child_path, child_lower)
                except BaseException:
                    os.close(child_fd)
                    raise
                frames.append((child_fd, child_path, children))
        finally:
            for fd, _path, _pending in frames[1:]:
                os.close(fd)

    def check_dir(
        self, fd: int, path: RelPath, lower: RelPath | None
    ) -> list[tuple[bytes, RelPath | None]]:
        """Check one directory's entries; return its subdirectories to descend into."""
        entries = safeio.list_dir(fd)
        names = {name: kind for name, kind in entries}
        self.report.entries_checked += len(entries)
        children: list[tuple[bytes, RelPath | None]] = []
        for name, _kind in sorted(entries, reverse=True):
            child_path = (*path, name)
            shown = _show(child_path)
            if name == whiteout.OCI_OPAQUE_MARKER:
                self.check_marker_file(fd, name, shown, "malformed-opaque")
                continue
            if name.startswith(whiteout.OCI_WHITEOUT_PREFIX):
                self.check_oci_whiteout(fd, path, name, names, lower)
                continue
            st = safeio.try_lstat(fd, name)
            if st is None:
                continue
            if safeio.is_whiteout_device(st):
                self.check_dangling_whiteout(fd, path, name, name, lower, shown)
                continue
            redirect_values = [
                (attribute, safeio.get_xattr(fd, name, attribute))
                for attribute in whiteout.REDIRECT_XATTRS
            ]
            redirects = [(a, v) for a, v in redirect_values if v is not None]
            if not stat.S_ISDIR(st.st_mode):
                self.check_non_directory(fd, name, st, shown, redirects, lower)
                continue
            children.append((name, self.check_subdir(fd, name, shown, redirects, lower)))
        return children

    def check_non_directory(
        self,
        fd: int,
        name: bytes,
        st: os.stat_result,
        shown: str,
        redirects: list[tuple[str, bytes]],
        lower: RelPath | None,
    ) -> None:
        metacopy = stat.S_ISREG(st.st_mode) and any(
            safeio.get_xattr(fd, name, attribute) is not None
            for attribute in whiteout.METACOPY_XATTRS
        )
        redirect = None
        for attribute, value in redirects:
            if not stat.S_ISREG(st.st_mode):
                self.problem("invalid-redirect", shown, f"{attribute} on a non-directory")
                return
            redirect = whiteout.parse_redirect(value)
            if redirect is None:
                self.problem("invalid-redirect", shown, f"{attribute}={value!r} is not valid")
                return
        if not metacopy or self.lowers is None:
            return
        # A metadata-only copy: its data lives in a lower regular file (found at the
        # redirect, else by name in the parent's lower directory, down a metacopy chain).
        sources = self.lowers.walk(lower) if lower is not None else None
        if redirect is not None and redirect[0]:
            sources = sources or []  # an absolute redirect does not need the parent
        data = None
        if sources is not None:
            data = self.lowers.data_below(sources, name, redirect)
            if data is not None and not self.lowers.holds_data(data):
                data = None  # an absolute redirect into the data-only layers, found in none
        if data is None:
            where = "" if redirect is None else f" ({whiteout.encode_redirect(redirect[1])!r})"
            self.problem(
                "dangling-metacopy",
                shown,
                f"metadata-only copy whose data{where} is in no lower layer",
            )

    def check_marker_file(self, fd: int, name: bytes, shown: str, kind: str) -> None:
        st = safeio.try_lstat(fd, name)
        if st is None:
            return
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            self.problem(kind, shown, "marker is not an empty regular file")

    def check_oci_whiteout(
        self,
        fd: int,
        path: RelPath,
        name: bytes,
        names: dict[bytes, int],
        lower: RelPath | None,
    ) -> None:
        shown = _show((*path, name))
        target = whiteout.oci_whiteout_target(name)
        if target is None:
            self.problem("malformed-whiteout", shown, "whiteout of no valid name")
            return
        st = safeio.try_lstat(fd, name)
        if st is None:
            return
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            self.problem("malformed-whiteout", shown, "whiteout is not an empty regular file")
            return
        if target in names:

            def remove_whiteout() -> None:
                safeio.unlink(fd, name)

            if names[target] == stat.S_IFDIR:

                def finish_opaque() -> None:
                    self.mark_opaque(fd, target, oci=True)
                    remove_whiteout()

                self.problem(
                    "half-opaque",
                    _show((*path, target)),
                    "directory next to its own whiteout (mkdir over a whiteout interrupted)",
                    finish_opaque,
                )
            else:
                self.problem(
                    "stale-whiteout",
                    shown,
                    "whiteout next to the entry it hides (create interrupted)",
                    remove_whiteout,
                )
            return
        self.check_dangling_whiteout(fd, path, name, target, lower, shown)

    def check_dangling_whiteout(
        self,
        fd: int,
        path: RelPath,
        name: bytes,
        target: bytes,
        lower: RelPath | None,
        shown: str,
    ) -> None:
        if self.lowers is None:
            return
        if self.lower_shows(lower, target):
            return
        # Harmless (kernel overlayfs leaves the same after renaming a merged directory):
        # a note, not a problem.
        self.report.notes.append(
            Problem("dangling-whiteout", shown, "hides nothing in any lower layer", False)
        )

    def mark_opaque(self, fd: int, name: bytes, *, oci: bool) -> None:
        if not oci:
            # Root in a user namespace has euid 0 but no trusted xattrs: fall back to user.*.
            prefixes = [whiteout.USER_PREFIX]
            if self.privileged:
                prefixes.insert(0, whiteout.TRUSTED_PREFIX)
            for prefix in prefixes:
                try:
                    safeio.set_xattr(fd, name, prefix + "opaque", b"y")
                    return
                except PermissionError:
                    continue
        safeio.add_oci_opaque_marker(fd, name, whiteout.OCI_OPAQUE_MARKER)

    def check_subdir(
        self,
        fd: int,
        name: bytes,
        shown: str,
        redirects: list[tuple[str, bytes]],
        lower: RelPath | None,
    ) -> RelPath | None:
        """Check a directory's markers; return its path in the lower layers (None when
        lower layers show nothing below it)."""
        opaque_values = {
            attribute: safeio.get_xattr(fd, name, attribute) for attribute in whiteout.OPAQUE_XATTRS
        }
        opaque_xattr = False
        for attribute, value in opaque_values.items():
            if value is None:
                continue
            if whiteout.opaque_value_means_opaque(value):
                opaque_xattr = True
            elif not whiteout.opaque_value_allows_xattr_whiteouts(value):
                self.problem(
                    "malformed-opaque", shown, f"{attribute}={value!r} is neither 'y' nor 'x'"
                )
        marker = None
        try:
            child_fd = safeio.open_dir(fd, name)
        except OSError:
            child_fd = -1
        if child_fd >= 0:
            try:
                marker = safeio.try_lstat(child_fd, whiteout.OCI_OPAQUE_MARKER)
            finally:
                os.close(child_fd)
        if opaque_xattr and marker is not None and stat.S_ISREG(marker.st_mode):

            def drop_marker() -> None:
                inner = safeio.open_dir(fd, name)
                try:
                    safeio.unlink(inner, whiteout.OCI_OPAQUE_MARKER)
                finally:
                    os.close(inner)

            self.problem(
                "opaque-both-forms",
                shown,
                "opaque by xattr and by .wh..wh..opq",
                drop_marker if marker.st_size == 0 else None,
            )
        if opaque_xattr or marker is not None:
            return None
        child_lower = None if lower is None else (*lower, name)
        for attribute, value in redirects:
            parsed = whiteout.parse_redirect(value)
            if parsed is None:
                self.problem("invalid-redirect", shown, f"{attribute}={value!r} is not valid")
                continue
            absolute, parts = parsed
            if absolute:
                child_lower = parts
            else:
                child_lower = None if lower is None else (*lower, parts[0])
            if self.lowers is not None and (
                child_lower is None or self.lowers.walk(child_lower) is None
            ):
                self.problem(
                    "dangling-redirect",
                    shown,
                    f"{attribute}={value!r} names no directory in any lower layer",
                )
        return child_lower


def check_upper(
    upper: Path,
    workdir: Path | None,
    lowers: list[Path] | None,
    *,
    repair: bool,
    data_layers: list[Path] | None = None,
) -> CheckReport:
    """Check (and with ``repair`` fix what is safe) an upper layer that no mount is using.

    ``lowers`` (base first, as a mount lists them) enables the checks against lower layers
    (dangling metacopy files, redirects and whiteouts); ``workdir`` enables the work area
    check; ``data_layers`` are the mount's data-only layers (in search order), where the data
    of metadata-only copies with absolute redirects may live. Raises ``OSError`` when the
    upper itself cannot be opened.
    """
    report = CheckReport(Path(upper), Path(workdir) if workdir is not None else None)
    lower_layers: list[Layer] = []
    root_fd = safeio.open_root(str(upper))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # The walk holds one fd per level: let very deep trees (depth > 1000) be walked.
        wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        for index, path in enumerate(reversed(lowers or [])):
            lower_layers.append(Layer(str(path), index, writable=False))
        data_objects = [
            Layer(str(path), len(lower_layers) + index, writable=False)
            for index, path in enumerate(data_layers or [])
        ]
        lower_layers.extend(data_objects)  # (closed with the lowers)
        stack = Stack(lower_layers[: len(lower_layers) - len(data_objects)], data_objects)
        checker = _Checker(report, repair, stack if lowers is not None else None)
        if workdir is not None:
            checker.check_work(Path(workdir))
            checker.check_index(Path(workdir))
        try:
            checker.walk(root_fd)
        except OSError as error:
            if error.errno != errno.EMFILE:
                raise
            report.left.append(Problem("incomplete", "/", "too deep to walk: out of fds", False))
        if workdir is not None:
            checker.check_quota(Path(workdir), root_fd)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(root_fd)
        for layer in lower_layers:
            layer.close()
    return report


@contextlib.contextmanager
def _workdir_part(workdir: Path, name: bytes) -> Iterator[int | None]:
    """An fd on WORKDIR/NAME (None when it is missing or unreadable), closed afterwards."""
    try:
        base_fd = safeio.open_root(str(workdir))
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            part_fd = safeio.open_dir(base_fd, name)
        except (FileNotFoundError, PermissionError):
            yield None
            return
        try:
            yield part_fd
        finally:
            os.close(part_fd)
    finally:
        os.close(base_fd)


def format_report(report: CheckReport) -> str:
    """A human-readable report: one line per problem, then a summary line."""
    lines = []
    repaired = {id(problem) for problem in report.repaired}
    for problem in report.found:
        if id(problem) in repaired:
            state = "repaired"
        elif problem.repairable:
            state = "repairable"
        else:
            state = "left"
        lines.append(f"{state:10} {problem.kind:18} {problem.path!s}: {problem.detail}")
    for problem in report.notes:
        lines.append(f"{'note':10} {problem.kind:18} {problem.path!s}: {problem.detail}")
    for problem in report.left:
        if problem not in report.found:
            lines.append(f"{'left':10} {problem.kind:18} {problem.path!s}: {problem.detail}")
    summary = (
        f"{report.upper}: {report.entries_checked} entries checked, "
        f"{len(report.found)} problems found, {len(report.repaired)} repaired, "
        f"{len(report.left)} left"
    )
    if report.notes:
        summary += f", {len(report.notes)} notes (harmless)"
    lines.append(summary + (" - clean" if report.ok else ""))
    return "\n".join(lines) + "\n"
