"""Rebuild a work dir's report from its log: ``python -m experiments.report --workdir DIR``.

Reads ``metrics.jsonl`` and ``config.json`` only (no data, no training), writes ``report.md`` and
the plots again and prints the report.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import studies
from experiments.logs import JsonlLog
from experiments.run import usage_on_help
from experiments.runner import write_study_report
from experiments.tasks import TaskSpec
from experiments.workdir import check_writable, load_workdir_config

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The work dir of a run (holds metrics.jsonl).", required=True
)


def rebuild(workdir: str) -> str:
    """Rewrites ``report.md`` and the plots of ``workdir`` from its log; returns the report."""
    log_path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(log_path):
        raise FileNotFoundError(
            f"{workdir!r} has no metrics.jsonl: not a work dir of `python -m experiments.run` "
            "(give the --workdir a run wrote to)."
        )
    check_writable(
        workdir,
        "the report writes report.md, the summaries and the plots there",
        f"Read the report the run wrote ({os.path.join(workdir, 'report.md')}), or copy the work "
        f"dir (cp -r {workdir} <dir>) and run python -m experiments.report --workdir <dir>.",
    )
    records = list(JsonlLog(log_path).records())
    study_records = [r for r in records if r.get("kind") == "study"]
    if not study_records:
        raise ValueError(
            f"{workdir}/metrics.jsonl has no study record; is it a work dir of experiments.run?"
        )
    head = study_records[0]
    tasks = [TaskSpec(**t) for t in head["tasks"]]
    config = load_workdir_config(workdir)
    study = studies.get_study(head["study"])
    return write_study_report(study, records, tasks, config, workdir)


def main(argv):
    del argv
    try:
        print(rebuild(_WORKDIR.value))
    except (FileNotFoundError, ValueError) as e:  # WorkdirError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    usage_on_help(sys.argv)
    app.run(main)
