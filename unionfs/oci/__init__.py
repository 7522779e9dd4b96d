"""OCI image layers in and out: ``import_image`` (image -> layer dirs) and ``diff_upper``
(upper layer -> OCI layer tarball).

Public interface (wired into the CLI by ``unionfs.cli``):

``import_image(image: Path, dest: Path, *, progress: bool) -> ImportResult``
    ``image`` is an OCI image layout directory (``oci-layout`` + ``index.json``), an OCI archive
    (the same in a tar: ``podman save --format oci-archive``), a ``docker save``/``podman save``
    tarball or extracted directory (``manifest.json``), or a bare layer tarball (one layer).
    Layers are unpacked base first into ``dest/layers/<n>-<shortdigest>/`` and listed in
    ``dest/manifest.json`` (see :func:`image_layers`). When ``dest`` already holds an image
    imported by us, a bare layer tarball is stacked *on top* of the existing ones (this is how a
    ``diff_upper`` tarball is added as a new layer; the same tarball again adds nothing); an
    image adds only the layers ``dest`` does not start with already (the same image again adds
    nothing) and is refused when ``dest``'s layers are not its first ones. ``dest`` must
    otherwise be missing or empty. A failed import removes every layer it unpacked (and
    ``dest`` when it made it): ``dest`` is as before.
    Conversion: ``.wh.NAME`` becomes an overlay whiteout (char device 0/0) when ``mknod`` of one
    works here, else it stays a ``.wh.NAME`` file (unionfs reads both); ``.wh..wh..opq`` becomes
    ``trusted.overlay.opaque=y`` as root, ``user.overlay.opaque=y`` otherwise, or stays a marker
    file when the filesystem refuses xattrs. Owners are kept when root, modes, mtimes, PAX
    ``SCHILY.xattr.*`` xattrs (except overlay bookkeeping ones), hard links within the layer, and
    device nodes when ``mknod`` is permitted.
    Hostile members are skipped with a one-line warning (on the ``unionfs.oci`` logger, and in
    ``ImportResult.warnings``): absolute paths, ``..`` components, names over 255 bytes, members
    whose parent is a symlink (that includes a symlink planted by an earlier member), hard links
    to outside the layer or to members not extracted before, device nodes for an unprivileged
    user. Nothing is ever written outside ``dest``: every path component is opened relative to its
    parent directory fd with ``O_NOFOLLOW``; no path is ever joined through an extracted entry.
    A broken image (bad JSON, missing blob, digest mismatch, unknown compression) raises
    :class:`ImageError`; the CLI prints its one-line message and exits 3. gzip layers are read with
    the stdlib, zstd layers with the ``zstandard`` module or the ``zstd`` program when present.

``diff_upper(upper: Path, out: Path | BinaryIO, *, progress: bool, lowers=None, gzip=None)``
    ``-> DiffResult``
    Export an upper (writable) layer as an OCI layer tarball (PAX format, sorted, deterministic):
    overlay whiteouts (char 0/0) and ``.wh.NAME`` files become ``.wh.NAME`` entries; opaque
    directories (``{trusted,user}.overlay.opaque=y``, ``user.fuseoverlayfs.opaque=y`` or a
    ``.wh..wh..opq`` file) get one ``DIR/.wh..wh..opq`` entry; hard links inside the upper become
    tar hard links; xattrs are written as PAX ``SCHILY.xattr.*`` except overlay/fuse-overlayfs
    bookkeeping ones and ``security.selinux``. A directory carrying ``overlay.redirect`` (a renamed
    lower directory) is exported *fully*: its merged content is read from ``lowers`` (paths,
    base first, needed only in that case: :class:`ImageError` otherwise), it is marked opaque, and a
    whiteout for the old name is added unless the upper already holds one. A metadata-only
    copy-up (a file with ``overlay.metacopy``) is exported with its data read from the lower file
    it stands for (its ``overlay.redirect`` path, else the same path); that also needs ``lowers``.
    Works on a live mount's upper too (files changing while read may fail with
    :class:`ImageError`). ``out`` ending in
    ``.gz``/``.tgz`` (or ``gzip=True``) is gzip-compressed. The result carries the sha256 digest of
    the bytes written (``digest``) and of the uncompressed tar (``diff_id``); the CLI prints them.

``image_layers(dest: Path) -> list[Path]``
    The layer directories of an imported image, base first (for ``unionfs mount --image DEST``).
    Raises :class:`ImageError` when the manifest is missing or points outside ``dest``.

``image_config(dest: Path) -> dict``: the image's runtime config (``Env``, ``Cmd``, ...), maybe {}.

Progress: a one-line counter on stderr, only when ``progress`` is true and stderr is a TTY.
"""

from unionfs.oci.common import DiffResult, ImageError, ImportResult, LayerInfo
from unionfs.oci.export import diff_upper
from unionfs.oci.store import image_config, image_layers, import_image

__all__ = [
    "DiffResult",
    "ImageError",
    "ImportResult",
    "LayerInfo",
    "diff_upper",
    "image_config",
    "image_layers",
    "import_image",
]
