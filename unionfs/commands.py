"""The non-mount subcommands: status, which, refresh, import, diff, run.

Each returns an exit status or raises ``CommandError`` (one line for the user, an exit code);
``cli`` does the parsing and the printing of errors.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from unionfs import introspection
from unionfs.exitcodes import EXIT_FAILURE, EXIT_LAYER, EXIT_MOUNTPOINT
from unionfs.mount import FSTYPE
from unionfs.mountinfo import mount_table, mounted_paths


class CommandError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unionfs_mounts() -> list[str]:
    """Mount points of the unionfs mounts this process can see."""
    return [entry.mountpoint for entry in mount_table() if entry.fstype == FSTYPE]


def mount_status(mountpoint: str) -> dict[str, Any]:
    try:
        raw = os.getxattr(mountpoint, introspection.STATUS)
    except OSError as error:
        raise CommandError(
            EXIT_MOUNTPOINT, f"{mountpoint} is not a live unionfs mount ({error.strerror})"
        ) from None
    document: dict[str, Any] = json.loads(raw)
    return document


def _tree_size(path: str) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                continue
    return total


def status(mountpoint: str | None) -> int:
    targets = [mountpoint] if mountpoint else unionfs_mounts()
    if mountpoint and os.path.realpath(mountpoint) not in mounted_paths():
        raise CommandError(EXIT_MOUNTPOINT, f"{mountpoint} is not mounted")
    if not targets:
        print("no unionfs mounts")
        return 0
    for target in targets:
        try:
            document = mount_status(target)
        except CommandError:
            if mountpoint:
                raise
            print(f"{target}  (not answering: its daemon is gone; unmount it)")
            continue
        upper = document.get("upper")
        print(f"{document['mountpoint']}  (pid {document['pid']})")
        lowers = document["lowers"]  # base first, numbered as `unionfs mount` takes them
        for index, layer in enumerate(lowers):
            role = "  (base)" if index == 0 else "  (top)" if index == len(lowers) - 1 else ""
            print(f"  lower {index}: {layer}{role}")
        for index, layer in enumerate(document.get("data_layers", [])):
            print(f"  data-only {index}: {layer}")
        if upper:
            print(f"  upper:   {upper}  ({_tree_size(upper) // 1024} KiB)")
        else:
            print("  upper:   none (read-only)")
        quota = document.get("quota")
        if quota:
            print(f"  quota:   {_quota_line(quota)}")
        if document.get("watched") is not None:
            limited = " (inotify limit reached: the rest needs refresh)"
            print(
                f"  watch:   {document['watched']} lower directories"
                f"{limited if document.get('watch_limited') else ''}"
            )
        if document.get("refreshes"):
            print(
                f"  refreshes {document['refreshes']}, "
                f"kernel invalidations {document['invalidations']}"
            )
        print(
            f"  copy-ups {document['copy_ups']}, bytes copied {document['bytes_copied']}, "
            f"whiteouts {document['whiteouts']}, open files {document['open_files']}"
        )
        print(f"  build:   {document.get('build', 'pure')} (unionfs/compiled.py)")
    return 0


def _quota_line(quota: dict[str, Any]) -> str:
    parts = []
    if quota.get("limit_bytes") is not None:
        used, limit = quota["used_bytes"], quota["limit_bytes"]
        parts.append(f"{used} of {limit} bytes ({100 * used // max(limit, 1)}%)")
    else:
        parts.append(f"{quota['used_bytes']} bytes (no limit)")
    if quota.get("limit_inodes") is not None:
        parts.append(f"{quota['used_inodes']} of {quota['limit_inodes']} inodes")
    else:
        parts.append(f"{quota['used_inodes']} inodes (no limit)")
    if quota.get("refused"):
        parts.append(f"{quota['refused']} refused")
    return ", ".join(parts)


def refresh(mountpoint: str, path: str) -> int:
    """Ask the daemon of ``mountpoint`` to drop every cached view of ``path`` (relative to
    the mount point; default: everything). A path that does not show (yet) refreshes its
    deepest ancestor that does: a name new in a lower layer appears (a symlink, device or
    fifo: its directory)."""
    real = os.path.realpath(mountpoint)
    if real not in mounted_paths():
        raise CommandError(EXIT_MOUNTPOINT, f"{mountpoint} is not mounted")
    parts = [part for part in path.split("/") if part and part != "."]
    if ".." in parts:
        raise CommandError(EXIT_FAILURE, f"{path}: '..' is not allowed (a path in the mount)")
    target = real
    for part in parts:
        candidate = os.path.join(target, part)
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            break
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            break  # the kernel answers user.* xattrs of symlinks and devices itself: the parent
        target = candidate
    try:
        answer = os.getxattr(target, introspection.REFRESH, follow_symlinks=False)
    except OSError as error:
        raise CommandError(
            EXIT_MOUNTPOINT, f"cannot refresh {target}: {error.strerror} (a live unionfs mount?)"
        ) from None
    shown = os.path.relpath(target, real)
    print(f"refreshed /{'' if shown == '.' else shown}: {answer.decode(errors='replace')}")
    return 0


def which(path: str) -> int:
    try:
        raw = os.getxattr(path, introspection.ORIGIN, follow_symlinks=False)
    except FileNotFoundError:
        raise CommandError(EXIT_FAILURE, f"{path} does not exist") from None
    except OSError as error:
        raise CommandError(
            EXIT_FAILURE, f"{path} is not inside a unionfs mount ({error.strerror})"
        ) from None
    document = json.loads(raw)
    kind = "upper" if document["upper"] else "lower"
    print(f"{document['layer']}{document['path'] if document['path'] != '/' else ''}  ({kind})")
    merged = document.get("layers") or []
    for layer in merged if document["upper"] else merged[1:]:
        print(f"  also merged from {layer}")
    return 0


def import_image(image: str, dest: str) -> int:
    from unionfs import oci

    try:
        result = oci.import_image(
            Path(image),
            Path(dest),
            progress=sys.stderr.isatty(),
            warn=lambda message: print(f"unionfs: warning: {message}", file=sys.stderr),
        )
    except oci.ImageError as error:
        raise CommandError(EXIT_LAYER, str(error)) from None
    except OSError as error:  # ENOSPC, EACCES, ...: what was unpacked is removed already
        where = f" ({error.filename})" if error.filename else ""
        raise CommandError(EXIT_FAILURE, f"import failed: {error.strerror}{where}") from None
    for layer in result.new_layers:
        print(f"{layer.directory}  {layer.digest}")
    if not result.new_layers:
        print(f"{dest} already holds {image}: nothing imported")
    print(f"manifest {result.manifest} ({len(result.layers)} layers)")
    return 0


def diff(source: str, output: str, lowers: list[str]) -> int:
    """Export an upper layer (or a live mount's upper) as an OCI layer tarball."""
    from unionfs import oci

    upper = source
    lower_paths = [Path(layer) for layer in lowers]
    if os.path.realpath(source) in mounted_paths():
        document = mount_status(source)
        if not document.get("upper"):
            raise CommandError(EXIT_MOUNTPOINT, f"{source} is read-only: nothing to export")
        upper = document["upper"]
        lower_paths = lower_paths or [Path(layer) for layer in document["lowers"]]
    if not os.path.isdir(upper):
        raise CommandError(EXIT_LAYER, f"upper {upper} is not a directory")
    for lower in lower_paths:
        if not lower.exists():
            raise CommandError(EXIT_LAYER, f"lower {lower} does not exist")
        if not lower.is_dir():
            raise CommandError(EXIT_LAYER, f"lower {lower} is not a directory")
    try:
        result = oci.diff_upper(
            Path(upper), Path(output), progress=sys.stderr.isatty(), lowers=lower_paths or None
        )
    except oci.ImageError as error:
        raise CommandError(EXIT_LAYER, str(error)) from None
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise CommandError(
            EXIT_FAILURE, f"cannot export {upper}: {error.strerror}{where}"
        ) from None
    for warning in result.warnings:
        print(f"unionfs: warning: {warning}", file=sys.stderr)
    print(result.summary())
    return 0


def image_layers(dest: str) -> list[str]:
    from unionfs import oci

    try:
        return [str(path) for path in oci.image_layers(Path(dest))]
    except oci.ImageError as error:
        raise CommandError(EXIT_LAYER, str(error)) from None


def run(
    layers: list[str],
    command: list[str],
    upper: str | None,
    image: str | None,
    *,
    workdir: str | None = None,
) -> int:
    from unionfs import oci
    from unionfs import run as runner

    environment = None
    if image is not None:
        layers = image_layers(image) + layers
        config = oci.image_config(Path(image))
        command = runner.image_command(config, command)
        environment = runner.image_env(config)
    if not layers:
        raise CommandError(EXIT_LAYER, "no layers to run in")
    try:
        return runner.run_in_union(
            [Path(layer) for layer in layers],
            command,
            upper=Path(upper) if upper else None,
            workdir=Path(workdir) if workdir else None,
            env=environment,
            warn=lambda message: print(f"unionfs: warning: {message}", file=sys.stderr),
        )
    except runner.RunError as error:
        raise CommandError(error.exit_code, str(error)) from None


def check(
    upper: str,
    workdir: str | None,
    lowers: list[str],
    repair: bool,
    data_layers: list[str] | None = None,
) -> int:
    """Verify (and with ``repair`` fix) an upper layer offline; 0 when it is clean."""
    from unionfs import check as checker

    if not os.path.isdir(upper):
        raise CommandError(EXIT_LAYER, f"upper {upper} is not a directory")
    if os.path.realpath(upper) in {
        mount_status(m).get("upper") for m in unionfs_mounts() if _answers(m)
    }:
        raise CommandError(EXIT_MOUNTPOINT, f"{upper} is in use by a live mount: unmount first")
    try:
        report = checker.check_upper(
            Path(upper),
            Path(workdir) if workdir else None,
            [Path(layer) for layer in lowers] or None,
            repair=repair,
            data_layers=[Path(layer) for layer in data_layers or []],
        )
    except OSError as error:
        raise CommandError(EXIT_LAYER, f"cannot check {upper}: {error.strerror}") from None
    print(checker.format_report(report))
    return 0 if report.ok else EXIT_FAILURE


def _answers(mountpoint: str) -> bool:
    try:
        os.getxattr(mountpoint, introspection.STATUS)
    except OSError:
        return False
    return True
