"""Layer blob streams: hashing readers/writers and decompression (gzip, zstd, plain)."""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import hashlib
import io
import shutil
import subprocess
from collections.abc import Callable
from typing import IO, Any, BinaryIO

from unionfs.oci.common import COPY_CHUNK, ImageError, Reader


class HashingReader(io.RawIOBase):
    """Reads through to ``raw`` while hashing and counting the bytes."""

    def __init__(self, raw: Reader, on_read: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        self.count += n
        if self.on_read is not None:
            self.on_read(n)
        return n

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class HashingWriter(io.RawIOBase):
    def __init__(self, raw: io.RawIOBase | gzip_module.GzipFile | IO[bytes] | BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.hash.update(view)
        self.count += len(view)
        return len(view)

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def decompressed(stream: io.RawIOBase) -> Reader:
    """Wrap a layer blob stream into its uncompressed tar stream (gzip, zstd or plain)."""
    buffered = io.BufferedReader(stream, buffer_size=COPY_CHUNK)
    head = buffered.peek(4)[:4]
    if head[:2] == b"\x1f\x8b":
        return gzip_module.GzipFile(fileobj=buffered, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        return _zstd_reader(buffered)
    return buffered


def _zstd_reader(stream: Reader) -> Reader:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        reader: Reader = zstandard.ZstdDecompressor().stream_reader(stream)
        return reader
    program = shutil.which("zstd")
    if program is None:
        raise ImageError(
            "layer is zstd-compressed: install the 'zstandard' Python package or the zstd program"
        )
    return _PipeReader([program, "-dc"], stream)


class _PipeReader(io.RawIOBase):
    """Stream ``source`` through a filter program, reading its stdout."""

    def __init__(self, command: list[str], source: Reader) -> None:
        import threading

        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdout = self.proc.stdout
        stdin = self.proc.stdin

        def feed() -> None:
            try:
                while chunk := source.read(COPY_CHUNK):
                    stdin.write(chunk)
            except (BrokenPipeError, ValueError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    stdin.close()

        self.feeder = threading.Thread(target=feed, daemon=True)
        self.feeder.start()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stdout.read(len(buffer))
        buffer[: len(data)] = data
        if not data:
            self.feeder.join()
            if self.proc.wait() != 0:
                assert self.proc.stderr is not None
                message = self.proc.stderr.read().decode(errors="replace").strip()
                raise ImageError(f"zstd failed: {message}")
        return len(data)


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error
