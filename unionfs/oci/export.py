"""``diff_upper``: an upper layer (plus, when needed, its lowers) as an OCI layer tarball."""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import IO, BinaryIO

from unionfs import safeio, whiteout
from unionfs.layer import Layer
from unionfs.oci.common import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    DiffResult,
    ImageError,
    Progress,
    exported_xattr_name,
    human,
    log,
)
from unionfs.oci.compression import HashingWriter
from unionfs.stack import Stack


def _read_xattrs(fd: int, name: str | None) -> dict[str, bytes]:
    """Every xattr of ``name`` in directory ``fd`` (``fd`` itself when None), as stored."""
    entry = None if name is None else os.fsencode(name)
    try:
        names = safeio.list_xattrs(fd, entry)
    except PermissionError:
        return {}
    values = {}
    for attribute in names:
        value = safeio.get_xattr(fd, entry, attribute)
        if value is not None:
            values[attribute] = value
    return values


def _is_opaque(xattrs: dict[str, bytes]) -> bool:
    return any(whiteout.opaque_value_means_opaque(xattrs.get(a)) for a in whiteout.OPAQUE_XATTRS)


def _redirect_of(xattrs: dict[str, bytes]) -> tuple[bool, tuple[str, ...]] | None:
    for attribute in whiteout.REDIRECT_XATTRS:
        value = xattrs.get(attribute)
        if not value:
            continue
        parsed = whiteout.parse_redirect(value)
        if parsed is None:
            raise ImageError(f"invalid {attribute} value {value!r}")
        absolute, parts = parsed
        return absolute, tuple(os.fsdecode(part) for part in parts)
    return None


def _names(fd: int) -> list[str]:
    return sorted(os.fsdecode(name) for name, _kind in safeio.list_dir(fd))


def _lstat(fd: int, name: str) -> os.stat_result:
    return safeio.lstat(fd, os.fsencode(name))


def _open_dir(fd: int, name: str) -> int:
    return safeio.open_dir(fd, os.fsencode(name))


def _has(fd: int, name: str) -> bool:
    return safeio.try_lstat(fd, os.fsencode(name)) is not None


class _LowerView:
    """Read-only merged view of the lower layers (top first), by unionfs's own lookup rules
    (``unionfs.stack``, those of kernel overlayfs): redirected directories and chains of
    metadata-only files in the lower layers (rotated uppers) are followed."""

    def __init__(self, lowers_top_first: list[Path]) -> None:
        self.layers: list[Layer] = []
        try:
            for index, path in enumerate(lowers_top_first):
                self.layers.append(Layer(str(path), index, writable=False))
        except BaseException:
            self.close()
            raise
        self.stack = Stack(self.layers)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        self.layers = []

    def data_file(
        self,
        parent: tuple[str, ...],
        name: str,
        redirect: tuple[bool, tuple[str, ...]] | None,
    ) -> int | None:
        """The data of metadata-only file ``name`` (carrying ``redirect``) whose directory's
        lower content is at ``parent``, opened read-only: the end of its metacopy chain."""
        sources = self.stack.walk(tuple(os.fsencode(part) for part in parent))
        target = None
        if redirect is not None:
            target = (redirect[0], tuple(os.fsencode(part) for part in redirect[1]))
        data = self.stack.data_below(sources or [], os.fsencode(name), target)
        if data is None:
            return None
        return safeio.open_lower_file(*data.layer.parent_and_name(data.path))

    def merged_dirs(self, parts: tuple[str, ...]) -> list[int]:
        """Directory fds (the caller closes them) making up the merged lower directory at
        ``parts`` in the lower layers' merged namespace, top first."""
        sources = self.stack.walk(tuple(os.fsencode(part) for part in parts)) or []
        fds = []
        for source in sources:
            try:
                fds.append(os.dup(source.layer.dir_fd(source.path)))
            except OSError:
                continue
        return fds


class _TarExporter:
    def __init__(self, tar: tarfile.TarFile, result: DiffResult, bar: Progress) -> None:
        self.tar = tar
        self.result = result
        self.bar = bar
        self.links: dict[tuple[int, int], str] = {}
        self.lowers: _LowerView | None = None
        self.bytes = 0

    def _info(self, name: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        pax: dict[str, str] = {}
        if st.st_mtime_ns % 1_000_000_000:
            pax["mtime"] = f"{st.st_mtime_ns / 1e9:.9f}"
        for stored, value in sorted(xattrs.items()):
            attribute = exported_xattr_name(stored)
            if attribute is not None:
                pax["SCHILY.xattr." + attribute] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        return info

    def _marker(self, name: str, st: os.stat_result) -> None:
        info = tarfile.TarInfo(name)
        info.mode = 0o000
        info.mtime = st.st_mtime_ns // 1_000_000_000
        info.uname = info.gname = ""
        self.tar.addfile(info)
        self.result.members += 1

    def directory(self, fd: int, prefix: str, lower: tuple[str, ...]) -> None:
        """Export the children of directory ``fd`` (path ``prefix``, '' for the root).

        ``lower`` is where this directory's lower content lives (its own path unless it or a
        parent was renamed): metadata-only copies find their data below it.
        """
        for name in _names(fd):
            path = f"{prefix}{name}"
            st = _lstat(fd, name)
            if name == OPAQUE_MARKER:
                continue  # emitted with its directory
            if safeio.is_whiteout_device(st):
                if name.startswith(WHITEOUT_PREFIX):
                    continue  # fuse-overlayfs's ".wh..opq" device and similar bookkeeping
                self._marker(f"{prefix}{WHITEOUT_PREFIX}{name}", st)
                self.result.whiteouts += 1
                continue
            if name.startswith(WHITEOUT_PREFIX):
                if stat.S_ISREG(st.st_mode):
                    self._marker(path, st)
                    self.result.whiteouts += 1
                else:
                    self.result.warnings.append(f"skipped {path!r}: reserved .wh. name")
                continue
            self.entry(fd, name, path, st, lower)

    def entry(
        self,
        parent: int,
        name: str,
        path: str,
        st: os.stat_result,
        lower: tuple[str, ...],
        *,
        from_lower: bool = False,
    ) -> None:
        self.bar.update(f"{self.result.members} entries, {human(self.bytes)}")
        if stat.S_ISDIR(st.st_mode):
            fd = _open_dir(parent, name)
            try:
                xattrs = _read_xattrs(fd, None)
                redirect = _redirect_of(xattrs)
                info = self._info(path + "/", st, xattrs)
                info.type = tarfile.DIRTYPE
                self.tar.addfile(info)
                self.result.members += 1
                opaque = _is_opaque(xattrs) or _has(fd, OPAQUE_MARKER)
                if redirect is not None:
                    self._redirected(fd, path, redirect, st)
                    return
                if opaque:
                    self._marker(f"{path}/{OPAQUE_MARKER}", st)
                    self.result.opaque_dirs += 1
                self.directory(fd, path + "/", (*lower, name))
            finally:
                os.close(fd)
            return
        if stat.S_ISSOCK(st.st_mode):
            self.result.warnings.append(f"skipped socket {path!r}")
            return
        xattrs = _read_xattrs(parent, name)
        info = self._info(path, st, xattrs)
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in self.links:
            info.type = tarfile.LNKTYPE
            info.linkname = self.links[key]
            self.tar.addfile(info)
            self.result.members += 1
            self.result.hardlinks += 1
            return
        if st.st_nlink > 1:
            self.links[key] = path
        if stat.S_ISREG(st.st_mode):
            info.type = tarfile.REGTYPE
            if any(a in xattrs for a in whiteout.METACOPY_XATTRS):
                fd = self._metacopy_data(path, name, xattrs, lower, from_lower=from_lower)
                info.size = os.fstat(fd).st_size
            else:
                fd = safeio.open_file(parent, os.fsencode(name), os.O_RDONLY)
                info.size = os.fstat(fd).st_size
            with os.fdopen(fd, "rb") as f:
                try:
                    self.tar.addfile(info, f)
                except OSError as error:
                    raise ImageError(f"{path}: changed while exporting ({error})") from None
            self.bytes += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.fsdecode(safeio.readlink(parent, os.fsencode(name)))
            self.tar.addfile(info)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
            self.tar.addfile(info)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tar.addfile(info)
        else:
            self.result.warnings.append(f"skipped {path!r}: unsupported file type")
            return
        self.result.members += 1

    def _metacopy_data(
        self,
        path: str,
        name: str,
        xattrs: dict[str, bytes],
        lower: tuple[str, ...],
        *,
        from_lower: bool = False,
    ) -> int:
        """The fd of a metadata-only file's data, found in the lower layers as kernel
        overlayfs finds it: at its redirect, else at its name in its directory's lower
        content (``lower``), following the chain of older metadata-only copies down to a
        file holding data. ``from_lower``: the file itself is in a lower layer (a merged
        directory's content), where the search starts from it (its redirect applies below
        it only)."""
        if self.lowers is None:
            raise ImageError(
                f"{path}: metadata-only copy-up (overlay.metacopy); its data lives in the lower"
                " layers: pass the lower layers to export it"
            )
        redirect = None if from_lower else _redirect_of(xattrs)
        fd = self.lowers.data_file(lower, name, redirect)
        if fd is None:
            where = "/".join(redirect[1]) if redirect is not None else "/".join((*lower, name))
            raise ImageError(f"{path}: data of metadata-only copy ({where}) missing")
        self.result.metacopies += 1
        return fd

    def _redirected(
        self, fd: int, path: str, redirect: tuple[bool, tuple[str, ...]], st: os.stat_result
    ) -> None:
        """A renamed lower directory: emit its full merged content, opaque, old name whited out."""
        if self.lowers is None:
            raise ImageError(
                f"{path}: directory was renamed (overlay.redirect); its content lives in the lower"
                " layers: pass the lower layers to export it"
            )
        self.result.redirects += 1
        absolute, parts = redirect
        here = tuple(path.split("/"))
        origin = parts if absolute else (*here[:-1], *parts)
        self._marker(f"{path}/{OPAQUE_MARKER}", st)
        self.result.opaque_dirs += 1
        self._merged(fd, origin, path)
        if origin != here:
            old = "/".join((*origin[:-1], WHITEOUT_PREFIX + origin[-1]))
            upper_has_whiteout = False
            try:
                parent = self._upper_open(origin[:-1])
            except OSError:
                parent = None
            if parent is not None:
                try:
                    # Anything at the old name (usually the whiteout the rename left) hides it.
                    _lstat(parent, origin[-1])
                    upper_has_whiteout = True
                except FileNotFoundError:
                    upper_has_whiteout = _has(parent, WHITEOUT_PREFIX + origin[-1])
                finally:
                    os.close(parent)
            if not upper_has_whiteout:
                self._marker(old, st)
                self.result.whiteouts += 1

    upper_fd: int = -1

    def _upper_open(self, parts: tuple[str, ...]) -> int:
        return safeio.open_below(self.upper_fd, tuple(os.fsencode(part) for part in parts))

    def _merged(self, upper_fd: int | None, origin: tuple[str, ...], path: str) -> None:
        """Emit every child of the merged directory (upper_fd over lowers at ``origin``)."""
        assert self.lowers is not None
        layers = [] if upper_fd is None else [upper_fd]
        lower_fds = self.lowers.merged_dirs(origin)
        try:
            seen: set[str] = set()
            hidden: set[str] = set()
            children: list[tuple[str, int, int]] = []  # (name, layer index, kind)
            upper_opaque = False
            for index, dfd in enumerate([*layers, *lower_fds]):
                if index > 0 and upper_opaque:
                    break
                for name in _names(dfd):
                    if name == OPAQUE_MARKER:
                        continue
                    if name.startswith(WHITEOUT_PREFIX):
                        hidden.add(name[len(WHITEOUT_PREFIX) :])
                        continue
                    if name in seen or name in hidden:
                        continue
                    st = _lstat(dfd, name)
                    if safeio.is_whiteout_device(st):
                        hidden.add(name)
                        continue
                    seen.add(name)
                    children.append((name, index, st.st_mode))
                if index == 0 and upper_fd is not None:
                    upper_opaque = _is_opaque(_read_xattrs(dfd, None))
            all_fds = [*layers, *lower_fds]
            for name, index, mode in sorted(children):
                dfd = all_fds[index]
                child_path = f"{path}/{name}"
                st = _lstat(dfd, name)
                if stat.S_ISDIR(mode):
                    cfd = _open_dir(dfd, name)
                    try:
                        xattrs = _read_xattrs(cfd, None)
                        info = self._info(child_path + "/", st, xattrs)
                        info.type = tarfile.DIRTYPE
                        self.tar.addfile(info)
                        self.result.members += 1
                        sub_upper = cfd if (index == 0 and upper_fd is not None) else None
                        sub_origin = (*origin, name)
                        redirect = _redirect_of(xattrs) if sub_upper is not None else None
                        if redirect is not None:  # renamed again inside a renamed directory
                            absolute, parts = redirect
                            sub_origin = parts if absolute else (*origin, *parts)
                        self._merged(sub_upper, sub_origin, child_path)
                    finally:
                        os.close(cfd)
                else:
                    from_lower = index > 0 or upper_fd is None
                    self.entry(dfd, name, child_path, st, origin, from_lower=from_lower)
        finally:
            for lfd in lower_fds:
                os.close(lfd)


def diff_upper(
    upper: Path,
    out: Path | BinaryIO,
    *,
    progress: bool,
    lowers: list[Path] | None = None,
    gzip: bool | None = None,
) -> DiffResult:
    """Export ``upper`` as an OCI layer tarball (see the module docstring)."""
    try:
        upper_fd = safeio.open_dir_path(upper)
    except OSError as error:
        raise ImageError(f"{upper}: cannot open upper layer: {error.strerror}") from None
    if gzip is None:
        gzip = isinstance(out, Path) and out.name.endswith((".gz", ".tgz"))
    bar = Progress(progress, f"diff {upper.name}")
    result = DiffResult(digest="", diff_id="", size=0, compressed=gzip)
    view = _LowerView(list(reversed(lowers))) if lowers else None
    tmp_path: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(out, Path):
                tmp_path = out.with_name(f".{out.name}.tmp-{os.getpid()}")
                raw: IO[bytes] | BinaryIO = stack.enter_context(open(tmp_path, "wb"))
            else:
                raw = out
            blob = HashingWriter(raw)
            sink: io.RawIOBase | gzip_module.GzipFile = blob
            if gzip:
                sink = gzip_module.GzipFile(fileobj=blob, mode="wb", mtime=0, compresslevel=6)
                stack.callback(sink.close)
            tar_hash = HashingWriter(sink)
            with tarfile.open(
                fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT,
                encoding="utf-8", errors="surrogateescape",
            ) as tar:  # fmt: skip
                exporter = _TarExporter(tar, result, bar)
                exporter.upper_fd = upper_fd
                exporter.lowers = view
                exporter.directory(upper_fd, "", ())
        result.diff_id = tar_hash.digest()
        result.digest = blob.digest()
        result.size = blob.count
        if tmp_path is not None and isinstance(out, Path):
            os.rename(tmp_path, out)
            tmp_path = None
    except OSError as error:
        raise ImageError(f"{upper}: export failed: {error}") from None
    finally:
        bar.close()
        os.close(upper_fd)
        if view is not None:
            view.close()
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
    for message in result.warnings:
        log.warning("%s", message)
    return result
