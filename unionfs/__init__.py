"""unionfs: a userspace union filesystem for container image layers.

The package is layered (imports point down only):
cli -> mount -> operations -> mutations/copyup -> stack -> layer -> safeio/whiteout.
The mypyc-compiled build of the hot modules runs when one matches these sources exactly
(unionfs/compiled.py).
"""

from unionfs import compiled as _compiled

__version__ = "0.1.0"

_compiled.activate(__path__)
