"""The per-node launcher: slots that claim, run, record and hand off tasks."""
