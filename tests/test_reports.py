"""The comparison table and plots read as a reader expects: units, Δm columns, distinct colours."""

from __future__ import annotations

import numpy as np

from experiments import reports
from experiments.tasks import TaskSpec


def _summary(run, seed, test, tasks):
    return {
        "kind": "summary",
        "run": run,
        "seed": seed,
        "tasks": tasks,
        "test": test,
        "incidence_all": {"global": 40.0},
        "incidence_last_half": {"global": 38.0},
        "seconds_per_step": 0.01,
        "wall_seconds": 12.0,
    }


def _header(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[0].strip("|").split("|")]


def test_two_delta_m_columns_only_where_they_can_differ():
    cls, depth = TaskSpec("cls", "classification", 3), TaskSpec("depth", "depth")
    ref = {"cls": {"accuracy": 80.0, "macro_f1": 0.8}, "depth": {"abs_err": 0.5, "rel_err": 0.2}}
    mtl_ = {"cls": {"accuracy": 88.0, "macro_f1": 0.8}, "depth": {"abs_err": 0.6, "rel_err": 0.2}}
    records = [
        _summary("single:cls", 0, {"cls": ref["cls"]}, ["cls"]),
        _summary("single:depth", 0, {"depth": ref["depth"]}, ["depth"]),
        _summary("joint", 0, mtl_, ["cls", "depth"]),
    ]
    table = reports.comparison_table(records, [cls, depth])
    header = _header(table)
    assert {"Δm% per-task", "Δm% flat"} <= set(header)
    row = next(line for line in table.splitlines() if line.startswith("| joint |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    per_task, flat = (float(cells[header.index(h)]) for h in ("Δm% per-task", "Δm% flat"))
    # by hand: accuracy +10%; depth abs_err -20% (lower is better), rel_err 0
    # per-task: (10 + (-20 + 0) / 2) / 2 = 0; flat: (10 - 20 + 0) / 3 = -3.333
    assert np.isclose(per_task, 0.0, atol=1e-3) and np.isclose(flat, -10 / 3, atol=1e-3)


def test_classification_tables_show_one_delta_m_and_f1_in_percent():
    tasks = [TaskSpec("a", "classification", 10), TaskSpec("b", "classification", 10)]
    test = {t: {"accuracy": 80.0, "macro_f1": 0.8123} for t in "ab"}
    records = [
        _summary("single:a", 0, {"a": test["a"]}, ["a"]),
        _summary("single:b", 0, {"b": test["b"]}, ["b"]),
        _summary("mean", 0, test, ["a", "b"]),
        {"kind": "train", "run": "mean", "seed": 0, "step": 1, "mean_cos": 0.00856},
    ]
    table = reports.comparison_table(records, tasks)
    header = _header(table)
    assert "Δm%" in header and "Δm% flat" not in header
    assert "a macro_f1 %" in header and "wall s" in header
    row = next(line for line in table.splitlines() if line.startswith("| mean |"))
    assert "| 81.23 |" in row and "| 0.0086 |" in row


def test_every_run_gets_its_own_colour():
    runs = [f"run{i}" for i in range(13)]
    colors = reports.run_colors(runs)
    assert len({tuple(np.round(c, 6)) for c in colors.values()}) == 13
