"""The run report: read a run root's stage outputs (`inputs`), analyse synthetic sets (`synthetic`, with
the pure measurements of `measures.synthetic_set`), render tables and figures (`render`, `samples`) and
write them (`write`)."""

from diffinject.report.write import json_safe, main, write_report

__all__ = ["json_safe", "main", "write_report"]
