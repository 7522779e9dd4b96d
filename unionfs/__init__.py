"""unionfs: a userspace union filesystem for container image layers.

The package is layered (imports point down only):
cli -> mount -> operations -> mutations/copyup -> stack -> layer -> safeio/whiteout.
"""

__version__ = "0.1.0"
