"""Run outputs: write metrics while a run goes, rebuild plots and an HTML report from the files."""

from amble.report.files import RunData, read_run
from amble.report.html import build_report
from amble.report.writer import RunWriter

__all__ = ["RunData", "RunWriter", "build_report", "read_run"]
