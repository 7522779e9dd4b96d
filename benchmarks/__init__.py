"""Benchmark suite: unionfs beside native, kernel overlayfs, fuse-overlayfs and unionfs-fuse.

Run it with ``scripts/bench`` (or ``python -m benchmarks --help``). Modules:

- ``dataset``   the deterministic, seeded data set, cached under ``benchmarks/.cache``
- ``systems``   how each union filesystem is mounted, found (daemon PID) and unmounted
- ``actions``   small timed actions run in a child process (``python -m benchmarks.actions``)
- ``workloads`` what is measured, one ``Workload`` per row of the results table
- ``runner``    the protocol: fresh mount per sample, systems interleaved and rotated per round
- ``stats``     medians, min..max and paired per-round ratios
- ``targets``   the targets of issue 4 and how a row is judged met or missed
- ``report``    latest.json, latest.md, latest.png and the README's Benchmarks section

This package must stay cheap to import (``actions`` runs inside timed child processes), so
nothing here imports matplotlib at module level.
"""
