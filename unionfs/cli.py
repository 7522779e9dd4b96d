"""Command line: argparse, options -> MountConfig, and the only ``sys.exit``.

Exit codes: 0 ok; 1 unexpected failure; 2 usage error; 3 bad layer/upper/workdir;
4 bad mountpoint; 5 permission denied; 6 /dev/fuse or fusermount3 unusable; 7 image store
problem (``--store``: unknown image, ambiguous ID prefix, damaged metadata, missing layer, a link
leading out of the store).
Besides the subcommands, the fuse-overlayfs form ``unionfs -o lowerdir=TOP:...:BASE,...
MOUNTPOINT`` (how podman and buildah call a ``mount_program``) and the ``mount.fuse3`` form
``unionfs SOURCE MOUNTPOINT -o ...`` are accepted, and ``unionfs mount-helper SOURCE
MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]`` is how mount(8) calls ``/sbin/mount.fuse.unionfs-py``
(installed by ``scripts/containers-mount-helper``): ``mount -t fuse.unionfs-py`` and fstab.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

from unionfs import __version__, commands, exitcodes
from unionfs.config import MountConfig
from unionfs.exitcodes import EXIT_FAILURE, EXIT_USAGE
from unionfs.imagestore import StoreError, find_image
from unionfs.mount import (
    FSTYPE,
    SUBTYPE,
    MountError,
    mount,
    unmount,
)
from unionfs.options import OptionError, apply_options, split_options

SUBCOMMANDS = (
    "mount",
    "umount",
    "unmount",
    "status",
    "which",
    "refresh",
    "import",
    "diff",
    "run",
    "check",
)
MOUNT_EPILOG = """mount -t fuse.unionfs-py SOURCE MOUNTPOINT -o lowerdir=TOP:...:BASE,... and fstab
lines of type fuse.unionfs-py reach this program through /sbin/mount.fuse.unionfs-py
(scripts/containers-mount-helper installs it). As root, allow_other and suid are on unless
-o nosuid / allow_root say otherwise; every option's status is listed in README.md.

"""
RUN_USAGE = (
    "unionfs run [-h] [--upper DIR] [--workdir DIR] [--image DEST | --store DIR IMAGE] "
    "[LAYER...] -- COMMAND [ARG...]"
)
RUN_HINT = "put -- before the command: " + RUN_USAGE.replace("unionfs run [-h] ", "unionfs run ")
EXIT_CODES = exitcodes.help_text()


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"unionfs: {message}\n")


@functools.cache  # built once per process (the mount server builds it for all its children)
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unionfs",
        description="A userspace union filesystem for container image layers.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"unionfs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    mount_parser = commands.add_parser(
        "mount",
        help="mount layers (base first) as one merged tree",
        description="Mount LAYERs (base layer first, as in an OCI manifest) at MOUNTPOINT. "
        "Without --upper the mount is read-only.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount_parser.add_argument("--upper", metavar="DIR", help="writable layer (created if missing)")
    mount_parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="scratch dir on the upper's filesystem "
        "(default: .UPPER.unionfs-work beside the upper)",
    )
    mount_parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground; SIGINT/SIGTERM unmount",
    )
    mount_parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options (allow_other, ro, "
        "timeout=SECONDS, fsync=0, ...; fuse-overlayfs names accepted)",
    )
    mount_parser.add_argument(
        "--whiteout-format",
        choices=("overlay", "oci"),
        default="overlay",
        help="how deletions are written to the upper (default: overlay)",
    )
    mount_parser.add_argument("--debug", action="store_true", help="log every request")
    mount_parser.add_argument("--log", metavar="FILE", help="write the daemon's log to FILE")
    mount_parser.add_argument(
        "--image",
        metavar="DEST",
        help="mount the layers of an image made by 'unionfs import' (below any LAYERs given)",
    )
    mount_parser.add_argument(
        "--store",
        metavar="DIR",
        help="a Docker overlay2 (/var/lib/docker) or containers-storage "
        "(/var/lib/containers/storage) store: the first argument is then an IMAGE in it "
        "(name, tag, ID or unique ID prefix) whose layers are mounted (below any LAYERs given)",
    )
    mount_parser.add_argument(
        "--data-layer",
        dest="data_layers",
        action="append",
        default=[],
        metavar="DIR",
        help="a data-only lower layer (repeat; searched in the order given): never listed, "
        "only read through metacopy files whose absolute redirect points into it "
        "(the kernel's lowerdir=...::DIR)",
    )
    mount_parser.add_argument("paths", nargs="+", metavar="LAYER... MOUNTPOINT")
    mount_parser.epilog = MOUNT_EPILOG + EXIT_CODES

    umount_parser = commands.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount a unionfs mount",
        description="Unmount MOUNTPOINT (through fusermount3, so no root is needed).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    umount_parser.add_argument("mountpoint", metavar="MOUNTPOINT")

    status_parser = commands.add_parser("status", help="list live unionfs mounts and counters")
    status_parser.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
    which_parser = commands.add_parser("which", help="say which layer a path comes from")
    which_parser.add_argument("path", metavar="MOUNTPOINT/PATH")
    refresh_parser = commands.add_parser(
        "refresh",
        help="make a live mount see what changed in its lower layers at PATH (default: all)",
    )
    refresh_parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a live unionfs mount")
    refresh_parser.add_argument(
        "path",
        nargs="?",
        default="",
        metavar="PATH",
        help="relative to MOUNTPOINT: a file, or a directory and everything below it "
        "(default: the whole mount); one not shown yet refreshes its deepest shown ancestor",
    )
    import_parser = commands.add_parser(
        "import", help="unpack an OCI layout or docker/podman save tarball into layer dirs"
    )
    import_parser.add_argument("image", metavar="IMAGE")
    import_parser.add_argument("dest", metavar="DEST")
    diff_parser = commands.add_parser(
        "diff", help="export an upper layer (or a live mount's) as an OCI layer tarball"
    )
    diff_parser.add_argument("source", metavar="UPPER|MOUNTPOINT")
    diff_parser.add_argument("-o", "--output", required=True, metavar="LAYER.tar[.gz]")
    diff_parser.add_argument(
        "--lower",
        action="append",
        default=[],
        metavar="DIR",
        help="lower layers, base first (needed to export renamed dirs)",
    )
    run_parser = commands.add_parser(
        "run",
        help="run COMMAND in the merged tree as a rootless container",
        usage=RUN_USAGE,
        description="Mount LAYERs (base first), run COMMAND inside them with bubblewrap (or "
        "unshare), unmount, and exit with COMMAND's status. Everything after -- is the "
        "command and its arguments; with --image and no command, the image's own runs.",
        epilog="exit status: COMMAND's; 127 when it is not found in the tree, 126 when it "
        "cannot be executed, 128+N when signal N killed it; 2-6 as for mount.",
    )
    run_parser.add_argument(
        "--upper", metavar="DIR", help="keep changes here (default: a temporary upper, discarded)"
    )
    run_parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="scratch dir on the upper's filesystem (default: .UPPER.unionfs-work beside it)",
    )
    run_parser.add_argument("--image", metavar="DEST", help="an image made by 'unionfs import'")
    run_parser.add_argument(
        "--store",
        metavar="DIR",
        help="a Docker overlay2 or containers-storage store: the first argument is an IMAGE in it",
    )
    run_parser.add_argument("layers", nargs="*", metavar="LAYER")
    check_parser = commands.add_parser(
        "check",
        help="verify an upper layer offline and repair what is safe",
        description="Verify UPPER (not in use by a mount): orphaned temporary files, malformed "
        "whiteouts and opaque markers, half-made opaque directories, invalid or dangling "
        "redirects. Exit 0 when clean, 1 when problems remain.",
    )
    check_parser.add_argument("--repair", action="store_true", help="fix what is safe to fix")
    check_parser.add_argument("--workdir", metavar="DIR", help="the mount's workdir")
    check_parser.add_argument(
        "--lower",
        action="append",
        default=[],
        metavar="DIR",
        help="a lower layer (repeat, base first): enables dangling checks",
    )
    check_parser.add_argument(
        "--data-layer",
        dest="data_layers",
        action="append",
        default=[],
        metavar="DIR",
        help="a data-only lower layer of the mount (repeat, in search order)",
    )
    check_parser.add_argument("upper", metavar="UPPER")
    return parser


@functools.cache
def build_overlay_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unionfs",
        description="fuse-overlayfs compatible form: "
        "unionfs -o lowerdir=TOP:...:BASE[,upperdir=U,workdir=W] MOUNTPOINT",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-f", dest="foreground", action="store_true")
    parser.add_argument("-d", "--debug", action="store_true")
    parser.add_argument("--log", metavar="FILE")
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return parser


def _config_from_options(option_args: Sequence[str], config: MountConfig) -> None:
    options: list[str] = []
    for argument in option_args:
        options.extend(split_options(argument))
    apply_options(config, options)


def _parse_run(argv: Sequence[str]) -> tuple[str, Any]:
    """``run [OPTIONS] [LAYER...] -- COMMAND [ARG...]``: the command follows ``--``."""
    arguments = list(argv)
    if "--" in arguments:
        split = arguments.index("--")
        args = build_parser().parse_args(arguments[:split])
        args.command_line = arguments[split + 1 :]
        return "run", args
    if any(arg in ("-h", "--help") for arg in arguments):
        build_parser().parse_args(arguments)  # prints the help and exits
    args, unknown = build_parser().parse_known_args(arguments)
    given = args.layers[1:] if args.store is not None else args.layers
    not_layers = [layer for layer in given if not os.path.isdir(layer)]
    if unknown or not_layers or (not args.layers and args.image is None):
        stray = (unknown or not_layers or [""])[0]
        named = f" ({stray!r} is no layer directory)" if stray else ""
        raise OptionError(f"run: {RUN_HINT}{named}")
    args.command_line = []
    return "run", args


def _parse_mount_helper(argv: Sequence[str]) -> MountConfig:
    """``mount-helper SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTS] [-t TYPE]``: mount(8)'s
    call of ``/sbin/mount.fuse.unionfs-py``. ``-f`` is mount's "fake": check, do not mount."""
    parser = Parser(prog="mount.fuse.unionfs-py", add_help=False)
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-t", dest="type")
    parser.add_argument("-N", dest="namespace")
    for flag in ("-s", "-f", "-n", "-v"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    args = parser.parse_args(list(argv))
    if args.namespace is not None:
        raise OptionError("mount -N (another mount namespace) is not supported")
    if args.type not in (None, FSTYPE, SUBTYPE):
        raise OptionError(f"mount.fuse.unionfs-py cannot mount type {args.type}")
    config = MountConfig(lowers=[], mountpoint=args.mountpoint, debug=False)
    _config_from_options(args.options, config)
    if not config.lowers:
        raise OptionError("missing -o lowerdir=TOP:...:BASE")
    config.fake = args.f
    return config


def parse(argv: Sequence[str]) -> tuple[str, Any]:
    """Returns ("mount", MountConfig), ("umount", mountpoint) or (command, namespace)."""
    if argv and argv[0] == "run":
        return _parse_run(argv)
    if argv and argv[0] == "mount-helper":
        return "mount", _parse_mount_helper(argv[1:])
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    wants_help = any(arg in ("-h", "--help", "--version") for arg in argv)
    if first not in SUBCOMMANDS and not (wants_help and first is None) and argv:
        if not any(arg == "-o" or arg.startswith("-o") for arg in argv):
            raise OptionError(
                f"unknown command {first!r} (commands: {', '.join(SUBCOMMANDS)}; see --help)"
            )
        return "mount", _parse_overlay_form(argv)
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_usage(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    if args.command in ("umount", "unmount"):
        return "umount", args.mountpoint
    if args.command != "mount":
        if args.command == "run":
            args.command_line = []
        return args.command, args
    lowers = list(args.paths[:-1])
    if args.store is not None:
        if args.image is not None:
            raise OptionError("--store and --image cannot be combined")
        if not lowers:
            raise OptionError("mount --store DIR needs an IMAGE and a MOUNTPOINT")
        lowers = store_layers(args.store, lowers[0]) + lowers[1:]
    if args.image is not None:
        lowers = commands.image_layers(args.image) + lowers
    if not lowers:
        raise OptionError("mount needs at least one LAYER (or --image) and a MOUNTPOINT")
    config = MountConfig(
        lowers=lowers,
        mountpoint=args.paths[-1],
        upper=args.upper,
        workdir=args.workdir,
        foreground=args.foreground,
        debug=args.debug,
        log_file=args.log,
        whiteout_format=args.whiteout_format,
    )
    _config_from_options(args.options, config)
    config.data_layers.extend(args.data_layers)
    return "mount", config


def store_layers(store: str, image: str) -> list[str]:
    """The layer directories (base first) of IMAGE in the Docker or containers-storage
    store at ``store``; StoreError (exit 7) when the store cannot give them."""
    return find_image(store, image).layers


def _parse_overlay_form(argv: Sequence[str]) -> MountConfig:
    args = build_overlay_parser().parse_args(argv)
    config = MountConfig(
        lowers=[],
        mountpoint=args.paths[-1],
        foreground=args.foreground,
        debug=args.debug,
        log_file=args.log,
    )
    if len(args.paths) > 2:
        raise OptionError("expected [SOURCE] MOUNTPOINT")
    _config_from_options(args.options, config)
    if not config.lowers:
        raise OptionError("missing -o lowerdir=TOP:...:BASE")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        action, value = parse(arguments)
        if action == "umount":
            return unmount(value)
        if action != "mount":
            return dispatch(action, value)
        assert isinstance(value, MountConfig)
        for warning in value.warnings:
            print(f"unionfs: warning: {warning}", file=sys.stderr)
        return mount(value)
    except OptionError as error:
        print(f"unionfs: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (MountError, commands.CommandError, StoreError) as error:
        print(f"unionfs: {error.message}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the last line of defence: one line, no traceback
        print(f"unionfs: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE


def dispatch(action: str, args: argparse.Namespace) -> int:
    if action == "status":
        return commands.status(args.mountpoint)
    if action == "which":
        return commands.which(args.path)
    if action == "refresh":
        return commands.refresh(args.mountpoint, args.path)
    if action == "import":
        return commands.import_image(args.image, args.dest)
    if action == "diff":
        return commands.diff(args.source, args.output, args.lower)
    if action == "run":
        if not args.command_line and (args.image is None or args.store is not None):
            raise OptionError(f"run: no command: {RUN_HINT}")
        layers = args.layers
        if args.store is not None:
            if args.image is not None:
                raise OptionError("--store and --image cannot be combined")
            if not layers:
                raise OptionError(f"run --store DIR needs an IMAGE: {RUN_HINT}")
            layers = store_layers(args.store, layers[0]) + layers[1:]
        return commands.run(layers, args.command_line, args.upper, args.image, workdir=args.workdir)
    if action == "check":
        return commands.check(args.upper, args.workdir, args.lower, args.repair, args.data_layers)
    raise OptionError(f"unknown command {action}")
