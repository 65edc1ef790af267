"""Seeing a run (issue 18): the HTML report of an app and its Prometheus metrics.

``data`` reads what the report shows from PostgreSQL (every aggregate in SQL, named queries of
sql/queries.sql), ``html`` and ``svg`` turn those plain values into one self-contained HTML file
(inline SVG, no script, no network), ``metrics`` reads and writes the Prometheus text format.
The render functions take plain data and do no I/O, so they are unit-tested on their own.
"""

from __future__ import annotations
