"""The sweep's plots, drawn from the search itself rather than from the leaderboard.

The leaderboard is sorted best first and keeps finished trials only: plots drawn from it put rank on the x
axis and hide what ASHA stopped, so a categorical that decides the outcome (``method``) looked unimportant.
Here every trial keeps its place in the search order and its state. Each plot is a matplotlib PNG and a
self-contained Plotly HTML: MLflow's artifact viewer shows HTML in an iframe and a cluster may have no
internet, so plotly.js is inlined (about 5 MB a file).

This module imports optuna, plotly and matplotlib at the top: import it inside the function that plots, so
the CLI's config checks stay fast (see ``tuning/__init__.py``).
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
import warnings
from dataclasses import dataclass, field, replace

import matplotlib
import numpy as np
import optuna
import plotly.graph_objects as go
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

STATES = {"finished": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "failed": TrialState.FAIL}
COLORS = {"finished": "#1f77b4", "stopped": "#e66100", "failed": "#c00000"}
LABELS = {
    "finished": "finished",
    "stopped": "stopped early (at its last value)",
    "failed": "failed (no value)",
}
DASH = {"finished": "-", "stopped": "--", "failed": ":"}
PLOTLY_DASH = {"-": "solid", "--": "dash", ":": "dot"}
NA = "n/a"  # where a conditional param sits in the trials whose condition did not hold
SIZE, DPI = (12, 7), 100  # 1200 x 700 px
# viridis without its last tenth: the yellow end is too pale for a thin line on white
CMAP = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0, 0.9, 256)))
COLORSCALE = [[i / 9, to_hex(CMAP(i / 9))] for i in range(10)]


@dataclass
class TrialRecord:
    """One trial of the search as Tune ran it."""

    number: int  # 0-based order in which the search created the trial (Tune's trial order)
    trial_id: str  # Tune's trial id, e.g. "a1b2c_00003"
    state: str  # "finished" | "stopped" (the scheduler stopped it early) | "failed"
    value: float | None  # final objective if finished, last reported if stopped, None if none
    params: dict = field(default_factory=dict)  # search-space name -> value; absent where a condition failed
    intermediate: list = field(default_factory=list)  # [(training step, objective)] as reported, in order


def build_study(trials: list[TrialRecord], distributions: dict, metric: str, mode: str) -> optuna.Study:
    """An in-memory study whose trial i is the i-th record by ``number``: finished -> COMPLETE, stopped ->
    PRUNED (value = last report, intermediate values kept), failed -> FAIL. Params take their distribution's
    type (MLflow hands back strings: "16" becomes the choice 16). A finished trial without a value becomes
    FAIL, as Optuna's COMPLETE needs one; ``user_attrs["state"]`` keeps what Tune said."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" is noise here
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", study_name=metric)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in _prepared(trials, distributions):
        state = STATES[r.state] if r.value is not None else TrialState.FAIL
        trial = optuna.trial.create_trial(
            state=state,
            value=None if state == TrialState.FAIL else r.value,
            params=r.params,
            distributions={k: distributions[k] for k in r.params},
            intermediate_values={int(s): float(v) for s, v in r.intermediate},
            user_attrs={"trial_id": r.trial_id, "state": r.state},
        )
        study.add_trial(trial)
    return study


def draw(trials: list[TrialRecord], distributions: dict, metric: str, mode: str) -> dict[str, bytes | str]:
    """The artifact files, name -> content (bytes for PNG, str otherwise): ``plots/<plot>.png`` for
    optimization_history, intermediate_values, param_importances and parallel_coordinate, all four
    interactive in ``plots/search.html``, then
    ``plots/trials.csv`` (the table they were drawn from) and ``plots/NOTES.txt`` when a plot was skipped.

    Conditional params on the parallel coordinates: on a categorical axis a trial without the param sits at
    "n/a"; on a numeric axis its line has a gap (PNG) or sits at an "n/a" tick below the range (HTML, as
    Plotly draws nan at 0). Numeric axes with gaps come first, least set first, so that every line runs on
    unbroken to the objective."""
    sweep = _sweep(trials, distributions, metric, mode)
    files: dict[str, bytes | str] = {}
    # One self-contained page for all four (plotly.js, 4.8 MB, inlined once): the MLflow artifact viewer shows
    # HTML in a sandboxed frame, where a CDN or a sibling script file may not load.
    parts = [
        f"<h2 style='font-family:sans-serif'>{name.replace('_', ' ')}</h2>"
        + fig.to_html(include_plotlyjs=i == 0, full_html=False)
        for i, (name, fig) in enumerate(_plotly(sweep).items())
    ]
    files["plots/search.html"] = (
        f"<html><head><meta charset='utf-8'><title>sweep: {metric}</title></head><body>{''.join(parts)}</body></html>"
    )
    with matplotlib.rc_context({"font.size": 11, "axes.titlesize": 13, "figure.titlesize": 13}):
        for name, fig in _matplotlib(sweep).items():
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI)
            files[f"plots/{name}.png"] = buf.getvalue()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "trial_id", "state", "value", *distributions])
    for r in sweep.records:
        params = [r.params.get(n, "") for n in distributions]
        writer.writerow([r.number, r.trial_id, r.state, "" if r.value is None else r.value, *params])
    files["plots/trials.csv"] = buf.getvalue()
    if sweep.notes:
        files["plots/NOTES.txt"] = "\n".join(sweep.notes) + "\n"
    return files


def figures(trials: list[TrialRecord], distributions: dict, metric: str, mode: str) -> dict[str, go.Figure]:
    """The Plotly figures behind the HTML files, by plot name (for tests and notebooks)."""
    return _plotly(_sweep(trials, distributions, metric, mode))


# --- the trials, typed and in search order ---------------------------------------------------------------


@dataclass
class _Sweep:
    """What both renderers draw from; ``records`` are in search order with typed params."""

    records: list[TrialRecord]
    distributions: dict
    metric: str
    mode: str
    importances: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def axis(self) -> str:
        return f"{self.metric} ({self.mode})"

    @property
    def valued(self) -> list[TrialRecord]:
        return [r for r in self.records if r.value is not None]

    def title(self, plot: str) -> str:
        if plot == "param_importances":
            left = ", ".join(n for n in self.distributions if n not in (self.importances or {}))
            note = "\n" + textwrap.fill(f"left out, not set in every trial: {left}", 110) if left else ""
            return (
                f"fANOVA importance for {self.metric} (stopped trials count at their last evaluation){note}"
            )
        return {
            "optimization_history": f"Optimization history of {self.axis}, in search order",
            "intermediate_values": f"{self.metric} at each evaluation (dashed: stopped early)",
            "parallel_coordinate": f"Parallel coordinates, colour = {self.axis}; stopped trials at last value",
        }[plot]


def _sweep(trials, distributions, metric, mode) -> _Sweep:
    sweep = _Sweep(_prepared(trials, distributions), distributions, metric, mode)
    sweep.importances = _importances(sweep)
    if not sweep.valued:
        sweep.notes.append("parallel_coordinate: not drawn (no trial has a value)")
    return sweep


def _prepared(trials: list[TrialRecord], distributions: dict) -> list[TrialRecord]:
    out = []
    for r in sorted(trials, key=lambda r: r.number):
        if r.state not in STATES:
            raise ValueError(f"trial {r.trial_id}: state {r.state!r}, expected one of {', '.join(STATES)}")
        value = r.value
        if value is None and r.state == "stopped" and r.intermediate:
            value = r.intermediate[-1][1]
        out.append(replace(r, value=None if r.state == "failed" else value, params=_params(r, distributions)))
    return out


def _params(r: TrialRecord, distributions: dict) -> dict:
    out = {}
    for name, raw in r.params.items():
        if raw is None or raw == "":  # the condition did not hold
            continue
        if name not in distributions:
            raise ValueError(f"trial {r.trial_id}: {name!r} is not in the space ({', '.join(distributions)})")
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            match = [c for c in dist.choices if c == raw or str(c) == str(raw)]
            if not match:
                raise ValueError(f"trial {r.trial_id}: {name}={raw!r} is not one of {list(dist.choices)}")
            out[name] = match[0]
        else:
            out[name] = int(float(raw)) if isinstance(dist, IntDistribution) else float(raw)
    return out


def _importances(sweep: _Sweep) -> dict[str, float] | None:
    """fANOVA (seed 0) on a study where stopped trials count as COMPLETE at their last value: Optuna reads
    only COMPLETE trials, and under ASHA the losers are exactly the stopped ones, so without them a decisive
    param looks like noise. The evaluator leaves out params that some trial lacks (conditional ones)."""
    usable = [replace(r, state="finished") for r in sweep.valued]
    if len(usable) < 2:
        sweep.notes.append(f"param_importances: not drawn (needs 2 trials with a value, got {len(usable)})")
        return None
    try:
        with warnings.catch_warnings():
            # small studies and experimental APIs warn: not the user's business
            warnings.simplefilter("ignore")
            study = build_study(usable, sweep.distributions, sweep.metric, sweep.mode)
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            out = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as err:  # e.g. scikit-learn (fANOVA's forest) missing
        sweep.notes.append(f"param_importances: not drawn ({type(err).__name__}: {err})")
        return None
    if not out or not all(math.isfinite(v) for v in out.values()):
        sweep.notes.append(f"param_importances: not drawn (no param set in every trial, or no spread: {out})")
        return None
    return dict(out)


# --- shared pieces ---------------------------------------------------------------------------------------


def _short(value, width: int = 12) -> str:
    """A categorical value as a tick label: long ones keep both ends, which is where bundle names differ."""
    s = str(value)
    return s if len(s) <= width else s[: width // 2] + "…" + s[-(width - width // 2 - 1) :]


def _wrap(name: str, sep: str = "\n") -> str:
    """Axis names break after dots and at spaces ("selection.", "strategy"): neighbours' names never meet."""
    return sep.join(textwrap.wrap(name.replace(".", ". "), 13, break_on_hyphens=False)).replace(". ", ".")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _columns(sweep: _Sweep) -> list[tuple]:
    """The parallel-coordinate axes as (name, positions, (tickvals, ticktext), (low, high)), one per param
    some trial has, then the objective; positions are per trial with a value. Categoricals: the choice's
    index (absent -> "n/a"); numeric: the value, log10 for log params, nan where absent."""
    valued, cols = sweep.valued, []
    for name, dist in sweep.distributions.items():
        got = [r.params.get(name) for r in valued]
        if all(p is None for p in got):
            continue
        if isinstance(dist, CategoricalDistribution):
            labels = [_short(c) for c in dist.choices] + [NA] * (None in got)
            pos = [float(len(dist.choices) if p is None else dist.choices.index(p)) for p in got]
            cols.append((name, pos, (list(range(len(labels))), labels), (-0.5, len(labels) - 0.5)))
            continue
        f = math.log10 if dist.log else float
        pos = [math.nan if p is None else f(p) for p in got]
        lo, hi = np.nanmin([f(dist.low), *pos]), np.nanmax([f(dist.high), *pos])
        lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
        ticks = np.linspace(lo, hi, 4).tolist()
        text = [f"{10**t if dist.log else t:.3g}" for t in ticks]
        cols.append((name + " (log)" * dist.log, pos, (ticks, text), (lo, hi)))
    cols.sort(key=lambda c: -sum(map(math.isnan, c[1])))  # stable: the rest keep the search space's order
    values = [r.value for r in valued]
    lo, hi = min(values), max(values)
    lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    ticks = np.linspace(lo, hi, 5).tolist()
    return cols + [(sweep.axis, values, (ticks, [f"{t:.4g}" for t in ticks]), (lo, hi))]


def _best_so_far(sweep: _Sweep) -> tuple[list[int], list[float]]:
    done = [r for r in sweep.records if r.state == "finished" and r.value is not None]
    best = [r.value for r in done]
    best = list((np.maximum if sweep.mode == "max" else np.minimum).accumulate(best)) if best else []
    # the step runs on to the last trial: after the last improvement the best stays where it was
    return [r.number for r in done] + ([sweep.records[-1].number] if done else []), best + best[-1:]


def _groups(sweep: _Sweep):
    """The history's markers: finished and stopped at their value, failed (no value) on the x axis."""
    yield "finished", [r for r in sweep.valued if r.state == "finished"]
    yield "stopped", [r for r in sweep.valued if r.state == "stopped"]
    yield "failed", [r for r in sweep.records if r.value is None]


# --- Plotly (interactive HTML) ---------------------------------------------------------------------------


def _plotly(sweep: _Sweep) -> dict[str, go.Figure]:
    def figure(plot, **layout):
        title = sweep.title(plot).replace("\n", "<br>")
        return go.Figure(layout=dict(title=title, template="plotly_white", **layout))

    def hover(r):
        params = "".join(f"<br>{k} = {_fmt(v)}" for k, v in r.params.items())
        return f"trial {r.number} ({r.trial_id})<br>{r.state}<br>{sweep.metric} = {_fmt(r.value)}{params}"

    # failed trials have no value: marks on the x axis, pinned there by a hidden second y axis
    y2 = dict(overlaying="y", range=[0, 1], visible=False)
    out = {"optimization_history": figure("optimization_history", yaxis2=y2)}
    out["optimization_history"].update_layout(xaxis_title="trial number (search order)")
    out["optimization_history"].update_layout(yaxis_title=sweep.axis)
    for state, group in _groups(sweep):
        symbol = {"finished": "circle", "stopped": "circle-open", "failed": "x"}[state]
        y = [0.02] * len(group) if state == "failed" else [r.value for r in group]
        marker = dict(symbol=symbol, size=11, color=COLORS[state], line=dict(width=2, color=COLORS[state]))
        trace = go.Scatter(x=[r.number for r in group], y=y, mode="markers", name=LABELS[state])
        trace.update(marker=marker, yaxis="y2" if state == "failed" else "y", text=list(map(hover, group)))
        out["optimization_history"].add_trace(trace.update(hovertemplate="%{text}<extra></extra>"))
    x, y = _best_so_far(sweep)
    best = go.Scatter(x=x, y=y, mode="lines", line=dict(shape="hv", color="black"), name="best so far")
    out["optimization_history"].add_trace(best)

    out["intermediate_values"] = figure("intermediate_values", xaxis_title="training step")
    out["intermediate_values"].update_layout(yaxis_title=sweep.axis)
    for r in (r for r in sweep.records if r.intermediate):
        (x, y), line = zip(*r.intermediate), dict(color=COLORS[r.state], dash=PLOTLY_DASH[DASH[r.state]])
        trace = go.Scatter(x=x, y=y, mode="lines+markers", name=f"#{r.number} {r.trial_id} ({r.state})")
        tip = "step %{x}: %{y:.4g}<br>" + hover(r) + "<extra></extra>"
        out["intermediate_values"].add_trace(trace.update(line=line, hovertemplate=tip))

    if sweep.importances:
        names = list(sweep.importances)[::-1]  # largest at the top
        bar = go.Bar(x=[sweep.importances[n] for n in names], y=names, orientation="h")
        out["param_importances"] = figure("param_importances", xaxis_title="importance (sums to 1)")
        out["param_importances"].add_trace(bar.update(marker_color=COLORS["finished"]))

    if sweep.valued:
        # Parcoords cannot dash a line: the state gets an axis of its own (which can also be brushed)
        states = [float(r.state == "stopped") for r in sweep.valued]
        ticks = dict(tickvals=[0, 1], ticktext=["finished", "stopped"])
        dims = [dict(label="state", values=states, range=[-0.5, 1.5], **ticks)]
        for name, pos, (tickvals, ticktext), (lo, hi) in _columns(sweep):
            if any(map(math.isnan, pos)):  # absent values get a slot below the range (nan would draw at 0)
                lo, slot = lo - 0.15 * (hi - lo), lo - 0.12 * (hi - lo)
                pos = [slot if math.isnan(p) else p for p in pos]
                tickvals, ticktext = [slot, *tickvals], [NA, *ticktext]
            ticks = dict(tickvals=tickvals, ticktext=ticktext)
            dims.append(dict(label=_wrap(name, "<br>"), values=pos, range=[lo, hi], **ticks))
        colors = [r.value for r in sweep.valued]
        line = dict(color=colors, colorscale=COLORSCALE, showscale=True, colorbar=dict(title_text=sweep.axis))
        out["parallel_coordinate"] = figure("parallel_coordinate", margin=dict(t=150, l=80, r=80))
        out["parallel_coordinate"].add_trace(go.Parcoords(dimensions=dims, line=line))
    return out


# --- matplotlib (PNG) ------------------------------------------------------------------------------------


def _matplotlib(sweep: _Sweep) -> dict[str, Figure]:
    def axes(plot, **labels):
        ax = Figure(figsize=SIZE, dpi=DPI, layout="constrained").subplots()
        ax.set(title=sweep.title(plot), **labels)
        out[plot] = ax.figure
        return ax

    out: dict[str, Figure] = {}
    ax = axes("optimization_history", xlabel="trial number (search order)", ylabel=sweep.axis)
    for state, group in ((s, g) for s, g in _groups(sweep) if g):  # an empty state stays out of the legend
        x = [r.number for r in group]
        style = dict(color=COLORS[state], label=f"{LABELS[state]}: {len(group)}")
        if state == "failed":  # no value to plot: marks on the x axis itself
            on_axis = ax.get_xaxis_transform()
            ax.plot(x, [0] * len(x), "x", ms=10, mew=2, clip_on=False, transform=on_axis, **style)
        else:
            face = COLORS[state] if state == "finished" else "none"
            ax.plot(x, [r.value for r in group], "o", ms=8, mew=1.8, mfc=face, zorder=3, **style)
    ax.step(*_best_so_far(sweep), where="post", color="black", lw=1.5, label=f"best so far ({sweep.mode})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()

    ax = axes("intermediate_values", xlabel="training step", ylabel=sweep.axis)
    for r in (r for r in sweep.records if r.intermediate):
        ax.plot(*zip(*r.intermediate), ls=DASH[r.state], marker="o", ms=4, lw=1.6, color=COLORS[r.state])
    ax.grid(alpha=0.3)
    shown = [s for s in STATES if any(r.state == s and r.intermediate for r in sweep.records)]
    ax.legend(handles=[Line2D([], [], color=COLORS[s], lw=2, ls=DASH[s], label=s) for s in shown])

    if sweep.importances:
        ax = axes("param_importances", xlabel="importance (sums to 1)")
        names = list(sweep.importances)[::-1]  # largest at the top
        bars = ax.barh(names, [sweep.importances[n] for n in names], color=COLORS["finished"])
        ax.bar_label(bars, fmt="%.3f", padding=3)
        ax.set_xlim(0, max(sweep.importances.values()) * 1.12)
    if sweep.valued:
        out["parallel_coordinate"] = _parallel(sweep)
    return out


def _parallel(sweep: _Sweep) -> Figure:
    """Drawn by hand (Optuna's version overlaps its labels): one normalised vertical axis per column with
    its ticks on its right; a numeric param that a trial lacks is a gap in that trial's line."""
    cols, valued = _columns(sweep), sweep.valued
    n = len(cols)
    fig = Figure(figsize=(min(max(SIZE[0], n + 1.0), 16), SIZE[1]), dpi=DPI)
    fig.suptitle(sweep.title("parallel_coordinate"), y=0.97)
    ax = fig.add_axes((0.02, 0.1, 0.86, 0.7))
    ax.set_axis_off()
    ax.set(xlim=(-0.5, n - 0.3), ylim=(-0.01, 1.01))
    for i, (name, _, (tickvals, ticktext), (lo, hi)) in enumerate(cols):
        ax.plot([i, i], [0, 1], color="0.2", lw=1.2, zorder=1)
        ax.text(i, 1.04, _wrap(name), ha="center", va="bottom")
        for t, label in zip(tickvals, ticktext):
            y = (t - lo) / (hi - lo)
            ax.plot([i - 0.04, i], [y, y], color="0.2", lw=1.2, zorder=1)
            box = dict(facecolor="white", alpha=0.75, lw=0, pad=0.5)
            ax.text(i + 0.05, y, label, va="center", fontsize=10, zorder=5, bbox=box)
    ys = np.array([[(p - lo) / (hi - lo) for p in pos] for _, pos, _, (lo, hi) in cols]).T  # trials x axes
    norm, sign = Normalize(*cols[-1][3]), 1 if sweep.mode == "max" else -1
    # finished over stopped, the best on top: the trials worth reading are never buried
    order = sorted(range(len(valued)), key=lambda j: (valued[j].state == "finished", sign * valued[j].value))
    for j in order:
        done = valued[j].state == "finished"
        style = dict(lw=2.2, alpha=0.95, zorder=3) if done else dict(lw=1.6, ls="--", alpha=0.7, zorder=2)
        ax.plot(range(n), ys[j], color=CMAP(norm(valued[j].value)), marker="o", ms=3.5, **style)
    fig.colorbar(ScalarMappable(norm, CMAP), cax=fig.add_axes((0.93, 0.1, 0.015, 0.7)), label=sweep.axis)
    handles = [Line2D([], [], color="0.35", lw=2, ls=DASH[s], label=LABELS[s]) for s in list(STATES)[:2]]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False)
    return fig


# --- several objectives: the Pareto front ------------------------------------------------------------------


def draw_front(rows: list[dict], goals: list[tuple[str, str]], distributions: dict) -> dict[str, bytes | str]:
    """Several objectives: ``plots/pareto.png`` and ``plots/pareto.html``. ``rows``: leaderboard rows with
    each objective's value and ``pareto`` (the front rank, or None); ``goals``: (metric, mode) each.

    The scatter shows every completed trial on the first two objectives, the front joined in order and
    labelled ``pareto-<k>`` (the registry's aliases), with arrows in the axis titles saying which way is
    better. The HTML page holds the same scatter (hover: trial, method, every objective, the sampled
    params) and Optuna's own ``plot_pareto_front`` of a study rebuilt from these trials (2 or 3 objectives).
    """
    (mx, dx), (my, dy) = goals[0], goals[1]
    done = [
        r
        for r in rows
        if r["status"] == "completed" and all(isinstance(r.get(m), (int, float)) for m, _ in goals)
    ]
    front = sorted((r for r in done if r.get("pareto")), key=lambda r: r[mx])
    rest = [r for r in done if not r.get("pareto")]
    more = f" (first two of {len(goals)} objectives)" if len(goals) > 2 else ""
    title = f"Pareto front: {len(front)} of {len(done)} completed trials{more}"

    def axis(metric: str, mode: str) -> str:
        return f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)"

    def hover(r: dict) -> str:
        values = "<br>".join(f"{m} = {r[m]:.4g}" for m, _ in goals)
        params = "<br>".join(f"{k} = {_fmt(r[k])}" for k in distributions if r.get(k) not in (None, ""))
        tag = f"pareto-{r['pareto']}<br>" if r.get("pareto") else ""
        return f"{tag}trial {r['trial']} ({r.get('flexkd.method', '')})<br>{values}<br>{params}"

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r[mx] for r in rest],
            y=[r[my] for r in rest],
            mode="markers",
            name="dominated",
            marker={"color": "#9a9a9a", "size": 9},
            hovertext=[hover(r) for r in rest],
            hoverinfo="text",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[r[mx] for r in front],
            y=[r[my] for r in front],
            mode="lines+markers+text",
            name="Pareto front",
            line={"color": COLORS["finished"]},
            marker={"color": COLORS["finished"], "size": 12},
            text=[f"pareto-{r['pareto']}" for r in front],
            textposition="top center",
            hovertext=[hover(r) for r in front],
            hoverinfo="text",
        )
    )
    fig.update_layout(
        title=title, xaxis_title=axis(mx, dx), yaxis_title=axis(my, dy), template="plotly_white", height=600
    )
    parts = [
        "<h2 style='font-family:sans-serif'>Pareto front</h2>"
        + fig.to_html(include_plotlyjs=True, full_html=False)
    ]
    optuna_fig = _optuna_front(done, goals, distributions)
    if optuna_fig is not None:
        parts.append(
            "<h2 style='font-family:sans-serif'>Optuna's plot_pareto_front</h2>"
            + optuna_fig.to_html(include_plotlyjs=False, full_html=False)
        )
    files: dict[str, bytes | str] = {
        "plots/pareto.html": "<html><head><meta charset='utf-8'><title>Pareto front</title></head><body>"
        + "".join(parts)
        + "</body></html>"
    }
    with matplotlib.rc_context({"font.size": 11, "axes.titlesize": 13}):
        png = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
        ax = png.subplots()
        ax.scatter([r[mx] for r in rest], [r[my] for r in rest], color="#9a9a9a", s=50, label="dominated")
        ax.plot(
            [r[mx] for r in front],
            [r[my] for r in front],
            "-o",
            color=COLORS["finished"],
            markersize=9,
            label="Pareto front",
        )
        for r in front:
            ax.annotate(
                f"pareto-{r['pareto']}",
                (r[mx], r[my]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=10,
            )
        ax.set_xlabel(axis(mx, dx))
        ax.set_ylabel(axis(my, dy))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        png.savefig(buf, format="png", dpi=DPI)
        files["plots/pareto.png"] = buf.getvalue()
    return files


def _optuna_front(done: list[dict], goals: list[tuple[str, str]], distributions: dict):
    """Optuna's Pareto-front figure of a study rebuilt from the completed trials (None for > 3 objectives)."""
    if not 2 <= len(goals) <= 3 or not done:
        return None
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=["maximize" if md == "max" else "minimize" for _, md in goals])
    finally:
        optuna.logging.set_verbosity(verbosity)
    for r in done:
        record = TrialRecord(
            int(r["trial"]),
            str(r["trial_id"]),
            "finished",
            None,
            {k: r[k] for k in distributions if r.get(k) not in (None, "")},
        )
        params = _params(record, distributions)
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[float(r[m]) for m, _ in goals],
                params=params,
                distributions={k: distributions[k] for k in params},
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the visualisation module
        return optuna.visualization.plot_pareto_front(study, target_names=[m for m, _ in goals])
