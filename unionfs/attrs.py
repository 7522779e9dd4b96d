"""Conversion of real ``stat`` results into pyfuse3 ``EntryAttributes``."""

from __future__ import annotations

import os

import pyfuse3


def entry_attributes(
    st: os.stat_result, ino: int, nlink: int, timeout: float
) -> pyfuse3.EntryAttributes:
    attributes = pyfuse3.EntryAttributes()
    attributes.st_ino = ino
    attributes.generation = 0
    attributes.entry_timeout = timeout
    attributes.attr_timeout = timeout
    attributes.st_mode = st.st_mode
    attributes.st_nlink = nlink
    attributes.st_uid = st.st_uid
    attributes.st_gid = st.st_gid
    attributes.st_rdev = st.st_rdev
    attributes.st_size = st.st_size
    attributes.st_blksize = st.st_blksize
    attributes.st_blocks = st.st_blocks
    attributes.st_atime_ns = st.st_atime_ns
    attributes.st_mtime_ns = st.st_mtime_ns
    attributes.st_ctime_ns = st.st_ctime_ns
    return attributes


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """A cacheable "no such entry" answer (st_ino 0)."""
    attributes = pyfuse3.EntryAttributes()
    attributes.st_ino = 0
    attributes.entry_timeout = timeout
    return attributes
