"""The sweep's plots: the study keeps Tune's trial order and states, and the files are legible and
self-contained."""

from __future__ import annotations

import csv
import io
import math
import random
import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tuning import plots
from tuning.plots import TrialRecord

METRIC = "val/accuracy"
SPACE = {
    "method": CategoricalDistribution(["sft", "logit_kd", "flexkd"]),
    "feature.weight": FloatDistribution(0.3, 10.0, log=True),  # conditional on method=flexkd
    "selection.k": CategoricalDistribution([16, 32]),  # conditional on method=flexkd
    "scoring.batch_size": IntDistribution(4, 16),
    "optim.lr": FloatDistribution(1e-3, 4e-3, log=True),
    "feature.layers": CategoricalDistribution(["last", "uniform:2", "every_other_layer_from_the_top"]),
}


def sweep(n: int = 10, seed: int = 0) -> list[TrialRecord]:
    """A search as Tune leaves it: flexkd wins, the others are mostly stopped at the first rung, one fails;
    values as MLflow hands them back (strings), records not in trial order."""
    rng, records = random.Random(seed), []
    for i in range(n):
        method = ["sft", "logit_kd", "flexkd"][i % 3]
        params = {"method": method, "optim.lr": str(10 ** rng.uniform(-3, -2.4)), "scoring.batch_size": "8"}
        params["feature.layers"] = rng.choice(SPACE["feature.layers"].choices)
        if method == "flexkd":
            params.update(
                {"feature.weight": 10 ** rng.uniform(-0.5, 1), "selection.k": str(rng.choice([16, 32]))}
            )
        final = {"sft": 0.6, "logit_kd": 0.7, "flexkd": 0.85}[method] + rng.uniform(-0.03, 0.03)
        curve = [(step, final * step / 300) for step in (100, 200, 300)]
        state = "stopped" if method != "flexkd" and i % 2 else "finished"
        curve = curve[:1] if state == "stopped" else curve
        if i == 4:
            state, curve = "failed", []
        value = None if state == "failed" else curve[-1][1]
        records.append(TrialRecord(i, f"abcde_{i:05d}", state, value, params, curve))
    return records[::-1]


@pytest.fixture(scope="module")
def drawn():
    return plots.draw(sweep(), SPACE, METRIC, "max")


@pytest.fixture(scope="module")
def figs():
    return plots.figures(sweep(), SPACE, METRIC, "max")


def test_build_study_keeps_trial_order_states_and_types():
    records = sweep(6)
    study = plots.build_study(records, SPACE, METRIC, "max")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    by_number = {r.number: r for r in records}
    want = {"finished": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "failed": TrialState.FAIL}
    for i, trial in enumerate(study.trials):
        record = by_number[i]
        assert trial.number == i and trial.user_attrs == {"trial_id": record.trial_id, "state": record.state}
        assert trial.state == want[record.state]
        assert trial.intermediate_values == dict(record.intermediate)
        assert trial.value == (None if record.state == "failed" else pytest.approx(record.value))
    stopped = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert stopped and all(t.intermediate_values for t in stopped)
    flexkd = study.trials[2].params  # MLflow's strings come back as the distributions' own values
    assert flexkd["selection.k"] in (16, 32) and type(flexkd["selection.k"]) is int
    assert flexkd["scoring.batch_size"] == 8 and type(flexkd["scoring.batch_size"]) is int
    assert isinstance(flexkd["optim.lr"], float) and flexkd["method"] == "flexkd"
    assert "selection.k" not in study.trials[0].params  # conditional: absent where it did not apply
    assert plots.build_study(records, SPACE, METRIC, "min").direction == optuna.study.StudyDirection.MINIMIZE


def test_build_study_names_what_does_not_fit():
    bad_choice = TrialRecord(0, "t0", "finished", 0.5, {"method": "dpo"})
    with pytest.raises(ValueError, match="'sft', 'logit_kd', 'flexkd'"):
        plots.build_study([bad_choice], SPACE, METRIC, "max")
    with pytest.raises(ValueError, match="not in the space"):
        plots.build_study([TrialRecord(0, "t0", "finished", 0.5, {"kd.wieght": 1})], SPACE, METRIC, "max")
    with pytest.raises(ValueError, match="'max' or 'min'"):
        plots.build_study([], SPACE, METRIC, "maximize")


def test_draw_writes_legible_pngs_and_self_contained_html(drawn):
    from PIL import Image

    names = ["optimization_history", "intermediate_values", "param_importances", "parallel_coordinate"]
    assert {f"plots/{n}.png" for n in names} | {"plots/search.html"} <= set(drawn)
    assert "plots/NOTES.txt" not in drawn  # nothing was skipped
    for name in names:
        image = Image.open(io.BytesIO(drawn[f"plots/{name}.png"]))
        assert image.format == "PNG" and 1100 <= image.size[0] <= 1700 and 600 <= image.size[1] <= 800
        assert image.getextrema()[0][0] < 100  # something dark was drawn, not a blank canvas
    html = drawn["plots/search.html"]
    assert html.count("Plotly.newPlot") == 4 and len(html) > 1_000_000  # plotly.js is inlined, once
    assert html.count("plotly.js v") <= 2  # (its banner), not four copies
    assert not re.search(r"<script[^>]*\bsrc=", html)  # no script fetched from anywhere


def test_trials_csv_lists_every_trial_in_search_order(drawn):
    rows = list(csv.DictReader(io.StringIO(drawn["plots/trials.csv"])))
    assert [int(r["number"]) for r in rows] == list(range(10))
    assert list(rows[0])[:4] == ["number", "trial_id", "state", "value"] and list(rows[0])[4:] == list(SPACE)
    by_id = {r.trial_id: r for r in sweep()}
    for row in rows:
        record = by_id[row["trial_id"]]
        assert row["state"] == record.state
        assert row["value"] == ("" if record.value is None else str(record.value))
        assert row["selection.k"] == record.params.get("selection.k", "")
    assert {r["state"] for r in rows} == {"finished", "stopped", "failed"}


def test_history_x_is_the_trial_number_and_best_respects_mode(figs):
    traces = {t.name: t for t in figs["optimization_history"].data}
    records = sorted(sweep(), key=lambda r: r.number)
    finished = [r for r in records if r.state == "finished"]
    assert list(traces["finished"].x) == [r.number for r in finished]
    assert list(traces["stopped early (at its last value)"].x) == [
        r.number for r in records if r.state == "stopped"
    ]
    assert list(traces["failed (no value)"].x) == [4]
    assert list(traces["stopped early (at its last value)"].y) == [
        r.value for r in records if r.state == "stopped"
    ]
    best = traces["best so far"]
    running = [max(r.value for r in finished[: i + 1]) for i in range(len(finished))]
    assert list(best.y) == pytest.approx(running + running[-1:]) and best.x[-1] == 9
    assert "abcde_00001" in traces["stopped early (at its last value)"].text[0]  # hover names the trial

    low = plots.figures(sweep(), SPACE, METRIC, "min")["optimization_history"]
    best = next(t for t in low.data if t.name == "best so far")
    assert list(best.y)[:-1] == pytest.approx(
        [min(r.value for r in finished[: i + 1]) for i in range(len(finished))]
    )


def test_parallel_coordinate_shows_absent_params_and_short_labels(figs):
    dims = {d.label: d for d in figs["parallel_coordinate"].data[0].dimensions}
    selection_k, weight = dims["selection.k"], dims["feature.<br>weight (log)"]
    assert list(selection_k.ticktext) == ["16", "32", "n/a"]
    # numeric and absent: a slot of its own below the range, never 0 or a value in the range
    slot = weight.tickvals[0]
    assert weight.ticktext[0] == "n/a" and weight.range[0] < slot < math.log10(0.3)
    valued = [r for r in sorted(sweep(), key=lambda r: r.number) if r.value is not None]
    assert [p == slot for p in weight.values] == [r.params["method"] != "flexkd" for r in valued]
    assert all(len(t) <= 12 for d in dims.values() for t in d.ticktext)
    assert list(dims["state"].values) == [float(r.state == "stopped") for r in valued]


def test_importance_sees_a_param_decided_by_stopped_trials():
    """The losers are all stopped: counted at their last value, method is what decides, noise is not."""
    rng, space = (
        random.Random(1),
        {"method": CategoricalDistribution(["good", "bad"]), "noise": FloatDistribution(0, 1)},
    )
    records = []
    for i in range(12):
        good = i % 2 == 0
        value = (0.9 if good else 0.5) + rng.uniform(-0.02, 0.02)
        curve = [(100, value - 0.1), (200, value)] if good else [(100, value)]
        params = {"method": "good" if good else "bad", "noise": rng.random()}
        records.append(TrialRecord(i, f"t{i}", "finished" if good else "stopped", value, params, curve))
    importances = plots.figures(records, space, METRIC, "max")["param_importances"].data[0]
    importance = dict(zip(importances.y, importances.x))
    assert importance["method"] > importance["noise"] and importance["method"] > 0.5


@pytest.mark.parametrize(
    "records",
    [
        [],
        [TrialRecord(0, "t0", "finished", 0.7, {"method": "sft"}, [(100, 0.7)])],
        [
            TrialRecord(0, "t0", "failed", None, {"method": "sft"}),
            TrialRecord(1, "t1", "stopped", None, {}, [(1, 0.2)]),
        ],
        [TrialRecord(0, "t0", "failed", None, {"method": "sft"})],
    ],
    ids=["no trials", "one finished", "no finished", "all failed"],
)
def test_a_sweep_too_small_to_judge_says_why(records):
    files = plots.draw(records, SPACE, METRIC, "max")
    assert "plots/param_importances.png" not in files and "plots/NOTES.txt" in files
    assert "param_importances: not drawn" in files["plots/NOTES.txt"]
    assert {"plots/optimization_history.png", "plots/intermediate_values.png", "plots/trials.csv"} <= set(
        files
    )
    assert ("plots/parallel_coordinate.png" in files) == any(r.state != "failed" for r in records)
    assert len(files["plots/trials.csv"].splitlines()) == 1 + len(records)
