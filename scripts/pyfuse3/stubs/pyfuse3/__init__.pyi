# Type stubs of the pyfuse3 API unionfs uses: stock pyfuse3 3.5.0 plus what our patch adds
# (scripts/pyfuse3/unionfs.patch; marked "patched"). mypy --strict checks unionfs against these
# (pyproject.toml: mypy_path), whichever build is installed. Patched names exist only when
# pyfuse3.UNIONFS_FEATURES lists them: unionfs reaches them through unionfs/fusefeatures.py.
# Handlers are not declared on Operations: unionfs's are plain functions or coroutine
# functions (fusefeatures adapts them to stock pyfuse3), so their signatures are its own.

from collections.abc import Iterable

__version__: str
ROOT_INODE: int
default_options: frozenset[str]
UNIONFS_FEATURES: frozenset[str]  # patched

class FUSEError(Exception):
    def __init__(self, errno: int) -> None: ...
    @property
    def errno(self) -> int: ...

class RequestContext:
    @property
    def uid(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def umask(self) -> int: ...

class SetattrFields:
    @property
    def update_atime(self) -> bool: ...
    @property
    def update_mtime(self) -> bool: ...
    @property
    def update_ctime(self) -> bool: ...
    @property
    def update_mode(self) -> bool: ...
    @property
    def update_uid(self) -> bool: ...
    @property
    def update_gid(self) -> bool: ...
    @property
    def update_size(self) -> bool: ...

class EntryAttributes:
    st_ino: int
    generation: int
    entry_timeout: float
    attr_timeout: float
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_birthtime_ns: int

class FileInfo:
    fh: int
    direct_io: bool
    keep_cache: bool
    nonseekable: bool
    cache_readdir: bool  # patched
    noflush: bool  # patched
    def __init__(
        self,
        fh: int = ...,
        direct_io: bool = ...,
        keep_cache: bool = ...,
        nonseekable: bool = ...,
        cache_readdir: bool = ...,  # patched
        noflush: bool = ...,  # patched
    ) -> None: ...

class StatvfsData:
    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_namemax: int

class ReaddirToken: ...

class Operations:
    supports_dot_lookup: bool
    enable_writeback_cache: bool
    enable_acl: bool
    init_want: int  # patched
    init_clear: int  # patched
    dir_inode_arguments: bool  # patched
    def init(self) -> None: ...

def init(ops: Operations, mountpoint: str, options: Iterable[str] = ...) -> None: ...
async def main(min_tasks: int = ..., max_tasks: int = ...) -> None: ...
async def main_lean(checkpoint_every: int = ...) -> None: ...  # patched
def connection_capabilities() -> tuple[int, int]: ...  # patched
def terminate() -> None: ...
def close(unmount: bool = ...) -> None: ...
def readdir_reply(token: ReaddirToken, name: bytes, attr: EntryAttributes, next_id: int) -> bool: ...
def get_sup_groups(pid: int) -> set[int]: ...
def invalidate_inode(inode: int, attr_only: bool = ...) -> None: ...
def invalidate_entry(inode_p: int, name: bytes, deleted: int = ...) -> None: ...
def invalidate_entry_async(
    inode_p: int, name: bytes, deleted: int = ..., ignore_enoent: bool = ...
) -> None: ...
