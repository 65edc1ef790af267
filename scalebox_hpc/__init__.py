"""scalebox_hpc: streaming batch pipelines on supercomputers, with PostgreSQL as the only shared state.

``from scalebox_hpc import Client`` is the Python client (:mod:`scalebox_hpc.client`). It is
imported on first use: ``import scalebox_hpc`` stays cheap, because ``scalebox task add`` starts
once per emitted message.
"""

import logging

TYPE_CHECKING = False  # not typing's: importing typing would cost `import scalebox_hpc` milliseconds
if TYPE_CHECKING:
    from scalebox_hpc.client import Client as Client
    from scalebox_hpc.client import Outcome as Outcome
    from scalebox_hpc.client import Task as Task

__version__ = "0.1.0"
__all__ = ["Client", "Outcome", "Task", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = frozenset({"Client", "Outcome", "Task"})


def __getattr__(name: str) -> object:
    """The client's names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        from scalebox_hpc import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
