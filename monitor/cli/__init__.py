"""The `gpulock-monitor` command line: click commands over the core, and what they print.

The core never imports this package.
"""

from monitor.cli.commands import main

__all__ = ["main"]
