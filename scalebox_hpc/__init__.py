"""scalebox_hpc: streaming batch pipelines on supercomputers, with PostgreSQL as the only shared state."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
