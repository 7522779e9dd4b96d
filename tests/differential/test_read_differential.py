"""Read-only differential: for generated layer stacks, the system under test shows exactly the tree
that read-only kernel overlayfs shows over the same layers.

Compared (tests.differential.compare): per path name, type, mode, owner, size, sha256 of content,
symlink target, rdev, xattrs (only `security.*` ignored, so a leaked private overlay xattr is a
difference), nlink and mtime of non-directories; hard-link grouping; the mount root. Also: the
lower layers are byte-for-byte and metadata-for-metadata unchanged afterwards.

The OCI variant converts the overlay-format stack to `.wh.` files and mounts that on the system
under test, against the kernel's view of the overlay-format original.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings

from tests.differential.backends import ORACLE, Backend
from tests.differential.compare import compare_views, view_of
from tests.differential.conftest import Workspace, examples
from tests.differential.layers import (
    build_stack,
    convert_stack_to_oci,
    describe_stack,
    merged_view,
    stacks,
)
from tests.support.tree import diff_fingerprints, diff_snapshots, lower_fingerprint, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_overlay")]


def check_stack(stack: list, sut: Backend, base: Path, oci: bool) -> None:  # type: ignore[type-arg]
    layers = build_stack(stack, base / "layers")
    sut_layers = convert_stack_to_oci(layers, base / "oci") if oci else layers
    before = lower_fingerprint(layers + sut_layers)
    with ORACLE.mounted(layers, base / "kernel") as kernel_mount:
        kernel = view_of(kernel_mount)
    with sut.mounted(sut_layers, base / "sut") as sut_mount:
        got = view_of(sut_mount)
    # The generator's model of the union must agree with the kernel, else the stack is outside
    # the domain the generator promises (a harness bug, not a filesystem bug).
    modelled = {"/".join(path) for path in merged_view(stack)}
    kernel_paths = set(kernel[0])
    assert modelled == kernel_paths, (
        "harness: merged_view() disagrees with the kernel on which paths exist: "
        f"model only {sorted(modelled - kernel_paths)}, "
        f"kernel only {sorted(kernel_paths - modelled)}"
        f"\n{describe_stack(stack)}"
    )
    problems = compare_views(kernel, got, ("kernel", sut.name))
    changed = diff_fingerprints(before, lower_fingerprint(layers + sut_layers))
    problems += [f"lower layer changed: {line}" for line in changed]
    assert not problems, (
        f"{sut.name}{' (OCI form)' if oci else ''} differs from kernel overlayfs:\n  "
        + "\n  ".join(problems)
        + f"\nstack:\n{describe_stack(stack)}"
    )


@pytest.mark.timeout(240)
@settings(settings.get_profile("differential"), max_examples=examples(16))
@given(stack=stacks())
def test_read_view_equals_kernel_overlay(stack: list, sut: Backend, workspace: Workspace) -> None:  # type: ignore[type-arg]
    with workspace.example_dir() as base:
        check_stack(stack, sut, base, oci=False)


@pytest.mark.timeout(240)
@settings(settings.get_profile("differential"), max_examples=examples(10))
@given(stack=stacks())
def test_oci_form_read_view_equals_kernel_overlay_of_overlay_form(
    stack: list,  # type: ignore[type-arg]
    sut: Backend,
    workspace: Workspace,
) -> None:
    if not sut.reads_oci_whiteouts:
        pytest.skip(f"{sut.name} does not read OCI whiteouts")
    with workspace.example_dir() as base:
        check_stack(stack, sut, base, oci=True)


def test_oci_converter_matches_oci_builder(workspace: Workspace) -> None:
    """The on-disk converter and the builder's OCI mode write the same layers."""
    from tests.differential.layers import BASE_MTIME_NS, Node, build_layer, convert_layer_to_oci

    layer = {
        ("d",): Node("dir", opaque=True, mode=0o750, uid=1000, gid=1000),
        ("d", "f"): Node("file", content=b"x"),
        ("e",): Node("dir"),
        ("e", "gone"): Node("whiteout"),
        ("gone",): Node("whiteout", mtime_ns=BASE_MTIME_NS + 5),
    }
    with workspace.example_dir() as base:
        build_layer(base / "overlay", layer, "overlay")
        build_layer(base / "oci-built", layer, "oci")
        convert_layer_to_oci(base / "overlay", base / "oci-converted")
        built = snapshot(base / "oci-built", excluded_xattr_prefixes=())
        converted = snapshot(base / "oci-converted", excluded_xattr_prefixes=())
        assert diff_snapshots(built, converted, mtime_since_ns=2**63, compare_dir_mtime=True) == []
        assert os.path.isfile(base / "oci-converted" / "d" / ".wh..wh..opq")
        assert os.path.isfile(base / "oci-converted" / ".wh.gone")
