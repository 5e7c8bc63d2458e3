"""python -m megatron_psft.reports.plot: panels from the metrics keys, runs overlaid, a PNG written, and a clear
error without matplotlib."""

import json
import re
import subprocess
import sys

import pytest

from megatron_psft.reports import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAINING_TITLES = ["loss", "entropy", "clip fraction", "ratio min / max", "grad norm"]


def _write(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _psft_records():
    """Steps 1-6 of a PSFT run with evaluation lines of their own at steps 0, 3 and 6 (two sets), a
    step logged twice (a resume: the second is kept), a null metric, and a line cut short by a kill."""
    records = [{"step": 0, "eval/chat/nll": 3.0, "eval/chat/entropy": 2.0, "eval/code/nll": 4.0}]
    for step in range(1, 7):
        records.append({"step": step, "phase": "psft", "loss": -1.0 + step / 100, "entropy": 2.0 - step / 10,
                        "clip_fraction": step / 50, "ratio_min": 1 - step / 20, "ratio_max": 1 + step / 10,
                        "grad_norm": None if step == 2 else 0.5 * step, "learning_rate": 1e-3})
        if step in (3, 6):
            records.append({"step": step, "eval/chat/nll": 3.0 - step / 10, "eval/chat/entropy": 2.0,
                            "eval/code/nll": 4.0 - step / 20})
    records.append({"step": 4, "loss": -0.5, "entropy": 1.5, "grad_norm": 9.0})
    return records


@pytest.fixture
def runs(tmp_path):
    psft = tmp_path / "psft-run"
    _write(psft / "metrics.jsonl", _psft_records(), tail='{"step": 7, "loss": -0.9')
    # SFT in the run script's layout (RUN_DIR/checkpoints), one record every 2 steps, no ratios.
    sft = tmp_path / "sft-run"
    _write(sft / "checkpoints" / "metrics.jsonl",
           [{"step": s, "loss": 2.0 / s, "entropy": 2.0 - s / 5, "grad_norm": 1.0} for s in (2, 4, 6)]
           + [{"step": 6, "eval/chat/nll": 2.5}])
    return psft, sft


def _lines(figure, title):
    axis = next(a for a in figure.axes if a.get_title() == title)
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}


def test_series_keep_each_steps_last_value_and_skip_gaps_and_a_cut_line(runs):
    with pytest.warns(UserWarning, match="metrics.jsonl:11"):
        series = plot.read_series(plot.metrics_file(str(runs[0])))
    assert series["loss"] == [(s, -0.5 if s == 4 else -1.0 + s / 100) for s in range(1, 7)]  # 7 was cut off
    assert [s for s, _ in series["grad_norm"]] == [1, 3, 4, 5, 6]  # null at step 2 is a gap
    assert series["eval/chat/nll"] == [(0, 3.0), (3, 2.7), (6, 2.4)]
    assert "phase" not in series


def test_panels_for_one_run_with_two_eval_sets(runs):
    with pytest.warns(UserWarning):
        figure = plot.plot_runs([str(runs[0])])
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == TRAINING_TITLES + ["eval NLL: chat", "eval entropy: chat", "eval NLL: code"]
    assert _lines(figure, "ratio min / max") == {
        "psft-run max": ([1, 2, 3, 4, 5, 6], [1 + s / 10 for s in range(1, 7)]),
        "psft-run min": ([1, 2, 3, 4, 5, 6], [1 - s / 20 for s in range(1, 7)])}
    assert _lines(figure, "eval NLL: code") == {"psft-run": ([0, 3, 6], [4.0, 3.85, 3.7])}


def test_two_runs_overlaid_with_their_labels_and_panels_without_data_left_out(runs):
    psft, sft = runs
    with pytest.warns(UserWarning):
        figure = plot.plot_runs([str(psft), str(sft / "checkpoints" / "metrics.jsonl")])
    assert set(_lines(figure, "loss")) == {"psft-run", "sft-run"}  # a metrics file under checkpoints/: the run's name
    assert _lines(figure, "loss")["sft-run"] == ([2, 4, 6], [1.0, 0.5, 2.0 / 6])
    assert set(_lines(figure, "clip fraction")) == {"psft-run"}  # SFT has no ratio: no line, the panel stays
    assert set(_lines(figure, "eval NLL: chat")) == {"psft-run", "sft-run"}
    assert set(_lines(figure, "eval NLL: code")) == {"psft-run"}

    sft_only = plot.plot_runs([str(sft)], labels=["SFT"])
    assert [a.get_title() for a in sft_only.axes] == ["loss", "entropy", "grad norm", "eval NLL: chat"]
    assert set(_lines(sft_only, "loss")) == {"SFT"}


def test_the_command_writes_a_png_with_the_panels(runs, tmp_path):
    psft, sft = runs
    out = tmp_path / "plots" / "curves.png"
    result = subprocess.run([sys.executable, "-m", "megatron_psft.reports.plot", str(psft), str(sft), "-o", str(out),
                             "--labels", "PSFT", "SFT"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    assert "loss, entropy, clip fraction, ratio min / max, grad norm, eval NLL: chat" in result.stdout
    assert "metrics.jsonl:11" in result.stderr  # the cut line is reported, not fatal


def test_errors_name_the_input(runs, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=re.escape(f"{missing}: no metrics file (looked for {missing}/metrics.jsonl")):
        plot.main([str(missing), "-o", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(runs[1]), "-o", str(tmp_path / "x.png"), "--labels", "a", "b"])
    assert exit_info.value.code == 2 and "2 labels for 1 runs" in capsys.readouterr().err
    empty = _write(tmp_path / "empty" / "metrics.jsonl", [{"step": 1, "phase": "psft", "learning_rate": 1e-3}])
    with pytest.raises(SystemExit, match="none of the runs has a metric to plot"):
        plot.main([str(empty), "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_it_says_how_to_install_it(runs, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match=r"plotting needs matplotlib: pip install 'megatron-psft\[plot\]'"):
        plot.main([str(runs[1]), "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
