"""Compare fine-tuning runs of the toy fidelity experiment (examples/toy_fidelity.sh) from their metrics.jsonl.

    python examples/toy_fidelity/summarise.py --run sft=RUN_DIR --run psft=RUN_DIR ... \\
        --in-domain B --out-of-domain A --table table.md [--plot tradeoff.png]

Each run's eval records (``eval/NAME/nll``, ``eval/NAME/entropy``, logged by the trainer's
--eval-data-prefix) give a curve over steps. The runs start from the same weights and train on the
in-domain set at the same learning rate and step count, but reach different in-domain NLLs, so
they are compared twice: at their last step, and at a matched in-domain NLL, the lowest level every
run reaches. There each run's out-of-domain NLL and entropies are read where its in-domain NLL
first comes down to that level, interpolated linearly between the two eval points around it.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # a checkout
from megatron_psft.reports.plot import INSTALL_HINT, metrics_file, read_series  # noqa: E402


def eval_curve(series: dict, in_domain: str, out_of_domain: str, source: str) -> list:
    """[(step, {quantity: value})] at every step with eval records of both sets, in step order."""
    keys = {"in_nll": f"eval/{in_domain}/nll", "out_nll": f"eval/{out_of_domain}/nll",
            "in_entropy": f"eval/{in_domain}/entropy", "out_entropy": f"eval/{out_of_domain}/entropy"}
    by_key = {name: dict(series.get(key, [])) for name, key in keys.items()}
    steps = sorted(set.intersection(*(set(values) for values in by_key.values())))
    if len(steps) < 2:
        raise ValueError(f"{source}: fewer than two steps with {', '.join(keys.values())}; was it trained with "
                         f"--eval-data-prefix {in_domain}=... {out_of_domain}=... and --eval-interval?")
    return [(step, {name: values[step] for name, values in by_key.items()}) for step in steps]


def mean_training_entropy(series: dict, last_steps: int) -> float:
    """Mean of the training `entropy` metric (on the fine-tuning batches) over the last `last_steps` steps."""
    values = [value for _, value in series.get("entropy", [])][-last_steps:]
    return sum(values) / len(values) if values else math.nan


def at_in_domain_level(curve: list, level: float) -> dict:
    """Every quantity (and the step) where the in-domain NLL first comes down to `level`, linearly
    interpolated between the eval points around that crossing; None if it never does."""
    for (step_before, before), (step_after, after) in zip(curve, curve[1:]):
        if before["in_nll"] <= level:
            return {"step": float(step_before), **before}
        if after["in_nll"] <= level:
            weight = (before["in_nll"] - level) / (before["in_nll"] - after["in_nll"])
            point = {name: before[name] + weight * (after[name] - before[name]) for name in before}
            return {"step": step_before + weight * (step_after - step_before), **point}
    step, last = curve[-1]
    return {"step": float(step), **last} if last["in_nll"] <= level else None


def summarise(runs: dict, in_domain: str, out_of_domain: str, last_steps: int = 10) -> dict:
    """Per run: the curve, its start and end, the point at the matched in-domain NLL, the late training entropy."""
    series = {label: read_series(metrics_file(run)) for label, run in runs.items()}
    curves = {label: eval_curve(series[label], in_domain, out_of_domain, run) for label, run in runs.items()}
    matched_level = max(min(point["in_nll"] for _, point in curve) for curve in curves.values())
    result = {"matched_in_nll": matched_level, "runs": {}}
    for label, curve in curves.items():
        result["runs"][label] = dict(
            curve=curve, start=curve[0][1], end=dict(step=curve[-1][0], **curve[-1][1]),
            matched=at_in_domain_level(curve, matched_level),
            train_entropy=mean_training_entropy(series[label], last_steps))
    return result


def markdown_table(summary: dict, in_domain: str, out_of_domain: str, last_steps: int = 10) -> str:
    level = summary["matched_in_nll"]
    first = next(iter(summary["runs"].values()))["start"]
    lines = [
        f"Start (the model pre-trained on {out_of_domain}, step 0): NLL on {in_domain} {first['in_nll']:.3f}, "
        f"on {out_of_domain} {first['out_nll']:.3f}; entropy on {in_domain} {first['in_entropy']:.3f}.",
        "",
        f"| objective | {in_domain} NLL (in-domain), last | {out_of_domain} NLL (out-of-domain), last "
        f"| {in_domain} entropy, last | training entropy, last {last_steps} steps "
        f"| step at {in_domain} NLL = {level:.3f} | {out_of_domain} NLL there | {in_domain} entropy there "
        f"| {out_of_domain} entropy there |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in summary["runs"].items():
        end, matched = run["end"], run["matched"]
        lines.append(f"| {label} | {end['in_nll']:.3f} | {end['out_nll']:.3f} | {end['in_entropy']:.3f} "
                     f"| {run['train_entropy']:.3f} | {matched['step']:.1f} | {matched['out_nll']:.3f} "
                     f"| {matched['in_entropy']:.3f} | {matched['out_entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(summary: dict, in_domain: str, out_of_domain: str, path: str) -> None:
    """Out-of-domain NLL and in-domain entropy against the in-domain NLL, one curve per run (time runs
    right to left); the dotted line marks the matched level."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        sys.exit(f"the trade-off plot needs matplotlib: {INSTALL_HINT} (or leave out --plot)")

    figure = Figure(figsize=(9, 3.6))
    axes = figure.subplots(1, 2)
    for label, run in summary["runs"].items():
        in_nll = [point["in_nll"] for _, point in run["curve"]]
        for axis, quantity in zip(axes, ("out_nll", "in_entropy")):
            axis.plot(in_nll, [point[quantity] for _, point in run["curve"]], marker=".", label=label)
    for axis, ylabel in zip(axes, (f"{out_of_domain} NLL (out-of-domain)", f"{in_domain} entropy")):
        axis.axvline(summary["matched_in_nll"], color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(f"{in_domain} NLL (in-domain)")
        axis.set_ylabel(ylabel)
        axis.invert_xaxis()  # training moves right
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                        help="a run directory or its metrics file (as python -m megatron_psft.reports.plot reads them), "
                             "with its label; repeat per run")
    parser.add_argument("--in-domain", required=True, help="eval set name of the fine-tuning domain")
    parser.add_argument("--out-of-domain", required=True, help="eval set name of the pre-training domain")
    parser.add_argument("--table", required=True, help="markdown file to write")
    parser.add_argument("--summary-json", help="also write the numbers of the table (and the curves) as JSON")
    parser.add_argument("--plot", help="PNG of out-of-domain NLL and entropy against in-domain NLL")
    args = parser.parse_args(argv)

    runs = {}
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            parser.error(f"--run {item!r}: expected LABEL=PATH")
        runs[label] = path
    summary = summarise(runs, args.in_domain, args.out_of_domain)
    table = markdown_table(summary, args.in_domain, args.out_of_domain)
    with open(args.table, "w") as f:
        f.write(table)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.plot:
        plot_tradeoff(summary, args.in_domain, args.out_of_domain, args.plot)
    print(table, end="")


if __name__ == "__main__":
    main()
