"""gpulock-monitor: finds and frees GPU locks whose holders died."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpulock-monitor")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
