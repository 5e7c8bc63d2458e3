"""Training curves from ``metrics.jsonl``, without a service.

    python -m megatron_psft.reports.plot RUN [RUN ...] -o curves.png [--labels A B ...]

RUN is a run directory (``SAVE/metrics.jsonl``, or the run script's ``RUN_DIR/checkpoints/metrics.jsonl``)
or a metrics file. One panel per quantity against the step: loss, entropy, clip fraction, ratio min / max,
grad norm, then the NLL and entropy of each evaluation set (``eval/NAME/nll``, ``eval/NAME/entropy``).
Runs are overlaid, one colour each; a panel no run has data for is left out. Needs matplotlib
(``pip install 'megatron-psft[plot]'``).
"""

import argparse
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

# (title, [(metrics key, line label suffix)]) for the training panels, in drawing order.
TRAINING_PANELS = (
    ("loss", [("loss", "")]),
    ("entropy", [("entropy", "")]),
    ("clip fraction", [("clip_fraction", "")]),
    ("ratio min / max", [("ratio_max", " max"), ("ratio_min", " min")]),
    ("grad norm", [("grad_norm", "")]),
)
EVAL_QUANTITIES = (("nll", "eval NLL"), ("entropy", "eval entropy"))
INSTALL_HINT = "pip install 'megatron-psft[plot]'"

Series = Dict[str, List[Tuple[int, float]]]


def metrics_file(run: str) -> str:
    """The metrics file of `run`: the path itself, or the JSONL in the run directory."""
    if os.path.isfile(run):
        return run
    tried = [os.path.join(run, "metrics.jsonl"), os.path.join(run, "checkpoints", "metrics.jsonl")]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{run}: no metrics file (looked for {' and '.join(tried)})")


def default_label(run: str) -> str:
    """The run directory's name; for a metrics file, that of its directory (above the run script's
    ``checkpoints/``)."""
    directory = os.path.abspath(run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run)))
    if not os.path.isdir(run) and os.path.basename(directory) == "checkpoints":
        directory = os.path.dirname(directory)
    return os.path.basename(directory)


def read_series(path: str) -> Series:
    """``{key: [(step, value), ...]}`` sorted by step, from every numeric value in the JSONL.

    Records may hold any subset of keys (evaluation lines of their own, records every interval).
    A step logged twice keeps its last value, as a resumed run rewrote it; unreadable lines (a kill
    mid-write) and records without a step are skipped with a warning; nulls are gaps.
    """
    by_key: Dict[str, Dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                warnings.warn(f"{path}:{number}: skipping a record without a readable step")
                continue
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def panels(runs: Sequence[Series]) -> List[Tuple[str, List[Tuple[str, str]]]]:
    """The panels with data in at least one run: training quantities, then each evaluation set's."""
    present = {key for series in runs for key in series}
    chosen = [(title, lines) for title, lines in TRAINING_PANELS if any(key in present for key, _ in lines)]
    eval_sets = sorted({key.split("/")[1] for key in present if key.startswith("eval/") and key.count("/") == 2})
    for name in eval_sets:
        for quantity, title in EVAL_QUANTITIES:
            key = f"eval/{name}/{quantity}"
            if key in present:
                chosen.append((f"{title}: {name}", [(key, "")]))
    return chosen


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib: {INSTALL_HINT}") from e
    return Figure


def make_figure(runs: Sequence[Series], labels: Sequence[str], columns: int = 3):
    """A matplotlib Figure (no pyplot state) with one axis per panel and every run overlaid."""
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    chosen = panels(runs)
    if not chosen:
        raise ValueError("none of the runs has a metric to plot (loss, entropy, clip_fraction, ratio_min/max, "
                         "grad_norm, eval/NAME/nll)")
    Figure = _figure_class()
    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(5 * columns, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for axis, (title, lines) in zip(axes, chosen):
        for series, label, colour in zip(runs, labels, colours):
            for (key, suffix), style in zip(lines, ("-", "--")):
                points = series.get(key)
                if not points:
                    continue
                steps, values = zip(*points)
                # Sparse series (evaluation, records every interval) get markers so single points show.
                marker = "o" if len(points) <= 50 else None
                axis.plot(steps, values, style, color=colour, marker=marker, markersize=3, label=label + suffix)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(runs) > 1 or len(lines) > 1:
            axis.legend(fontsize="small")
    for axis in axes[len(chosen):]:
        axis.remove()
    return figure


def plot_runs(runs: Sequence[str], labels: Optional[Sequence[str]] = None):
    """The figure for run directories or metrics files `runs` (labels default to the run names)."""
    labels = list(labels) if labels else [default_label(run) for run in runs]
    return make_figure([read_series(metrics_file(run)) for run in runs], labels)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_psft.reports.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory or metrics.jsonl")
    parser.add_argument("-o", "--output", required=True, help="image file (format from the extension: .png, .svg, .pdf)")
    parser.add_argument("--labels", nargs="+", help="one legend label per RUN (default: the run directory's name)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    try:
        figure = plot_runs(args.runs, args.labels)
    except ImportError as e:
        raise SystemExit(str(e))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}: {', '.join(axis.get_title() for axis in figure.axes)}")


if __name__ == "__main__":
    main()
