"""uid/gid mapping and squashing (fuse-overlayfs uidmapping=/gidmapping=/squash_to_*)."""

from __future__ import annotations

import errno

import pytest

from unionfs.config import MountConfig
from unionfs.idmap import OVERFLOW_ID, IdMapper
from unionfs.options import apply_options


def mapper(*options: str) -> IdMapper:
    config = MountConfig(lowers=["/l"], mountpoint="/m")
    apply_options(config, list(options))
    return IdMapper(config)


def test_identity_by_default() -> None:
    ids = mapper()
    assert ids.identity and ids.shown(1000, 100) == (1000, 100)
    assert ids.stored(5, 6) == (5, 6)


def test_ranges_both_directions() -> None:
    ids = mapper("uidmapping=0:100000:65536", "gidmapping=0:200000:1:1:300000:10")
    assert ids.shown(100000, 200000) == (0, 0)
    assert ids.shown(100042, 300003) == (42, 4)
    assert ids.stored(42, 4) == (100042, 300003)
    assert ids.stored(-1, -1) == (-1, -1)
    assert ids.shown(5, 5) == (OVERFLOW_ID, OVERFLOW_ID)  # unmapped host ids


def test_unmapped_container_id_cannot_be_stored() -> None:
    with pytest.raises(OSError) as refused:
        mapper("uidmapping=0:1000:1").stored(7, -1)
    assert refused.value.errno == errno.EINVAL


def test_squash() -> None:
    assert mapper("squash_to_root").shown(1234, 5678) == (0, 0)
    assert mapper("squash_to_uid=7", "squash_to_gid=8").shown(1, 2) == (7, 8)
