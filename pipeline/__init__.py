"""distill: the framework (configs, stage registry, manifests, engine seam, tracking, CLI)."""

from importlib import metadata

try:
    __version__ = metadata.version("distill")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
