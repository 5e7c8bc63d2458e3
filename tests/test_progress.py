"""megatron_psft/observability/progress.py and the tools that use it: a live bar (count / total, rate) on stderr only
when stderr is a terminal (a pseudo-terminal here), nothing on stderr otherwise, and the tools'
periodic and summary lines for logs kept when there is no bar. Also how the tools are installed: the
console scripts setup.py declares, and the thin tools/ scripts of a checkout."""

import contextlib
import importlib.metadata
import io
import json
import os
import pty
import select
import subprocess
import sys

import pytest

from megatron_psft.data import preprocess
from megatron_psft.observability.progress import ProgressBar, count_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "megatron_psft", "assets", "tokenizer")
CHAT_DATA = os.path.join(REPO, "megatron_psft", "assets", "chat_data.jsonl")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@contextlib.contextmanager
def terminal():
    """A pseudo-terminal: (a stream writing to it, a function returning what has reached it so far)."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")

    def read():
        stream.flush()
        out = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: nothing left and no writer
                break
            if not chunk:
                break
            out += chunk
        return out.decode("utf-8", "replace")

    try:
        yield stream, read
    finally:
        stream.close()
        os.close(master)


def never_called():
    raise AssertionError("the total was computed although no bar is drawn")


# --- the helper -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_quiet_when_stderr_is_not_a_terminal(monkeypatch, tmp_path, kind):
    stderr = io.StringIO() if kind == "pipe" else open(tmp_path / "log", "w+")
    monkeypatch.setattr(sys, "stderr", stderr)
    with ProgressBar("work", total=never_called, unit="line") as bar:
        assert not bar.active
        for _ in range(1000):
            bar.update(1, status="busy")
    stderr.seek(0)
    assert stderr.read() == ""


def test_bar_with_total_on_a_terminal(monkeypatch):
    with terminal() as (stream, read):
        monkeypatch.setattr(sys, "stderr", stream)
        with ProgressBar("work", total=lambda: 37, unit="line") as bar:
            assert bar.active
            bar.update(5, status="stage one")
            bar.write("a message")
        out = read()
    assert "work:" in out and "/37" in out and "line/s" in out and "\r" in out, repr(out)
    assert "a message" in out


def test_no_bar_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    with terminal() as (stream, read):
        monkeypatch.setattr(sys, "stderr", stream)
        with ProgressBar("work", total=never_called) as bar:
            assert not bar.active
            bar.update(3)
        assert read() == ""


def test_count_lines(tmp_path):
    path = tmp_path / "lines"
    for text, lines in [(b"", 0), (b"a\n", 1), (b"a\n\nb", 3), (b"x" * (3 << 20) + b"\n" * 5, 5)]:
        path.write_bytes(text)
        assert count_lines(str(path)) == lines, text[:10]


# --- checkpoint conversion: checkpoint_convert.common.Progress ---------------------------------------

def run_stages(**kwargs):
    from checkpoint_convert.common import Progress

    progress = Progress("hf->megatron", total_bytes=3_000_000, stages=2, **kwargs)
    for stage in ("embedding", "layer 0"):
        for _ in range(3):
            progress.update(stage, 500_000)
    progress.close()


def stage_lines(text):
    return [line for line in text.splitlines() if "MB/s" in line and "/2 " in line]


def test_conversion_prints_stage_lines_without_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines = io.StringIO()
    run_stages(stream=lines)
    assert [line.split()[1:3] for line in stage_lines(lines.getvalue())] == [["embedding", "1/2"], ["layer", "0"]]
    assert lines.getvalue().splitlines()[-1].startswith("[hf->megatron] done: 3.0 MB")
    assert sys.stderr.getvalue() == ""


def test_conversion_bar_on_terminal(monkeypatch):
    with terminal() as (stream, read):
        monkeypatch.setattr(sys, "stderr", stream)
        lines = io.StringIO()  # stdout into a log while stderr is a terminal: the log keeps its lines
        run_stages(stream=lines)
        out = read()
        assert "hf->megatron:" in out and "/3.00M" in out, repr(out)
        assert len(stage_lines(lines.getvalue())) == 2
        run_stages(stream=stream)  # both on the terminal: the bar instead of the stage lines
        out = read()
    assert "/3.00M" in out and not stage_lines(out), repr(out)
    assert "[hf->megatron] done: 3.0 MB" in out


# --- the tools --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clipped_tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "clipped_tokens.jsonl"
    path.write_text("".join(json.dumps({"step": step, "clipped": {"5": step}, "response": {"5": 10, "6": 4}}) + "\n"
                            for step in (1, 2, 3)))
    return path


def run_clipped_tokens(path, stderr):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "clipped_tokens.py"), "--clipped-tokens",
                           str(path), "--tokenizer", TOKENIZER], stdout=subprocess.PIPE, stderr=stderr, text=True,
                          env=ENV, timeout=300)


SUMMARY = "steps read: 3 (1..3); clipped tokens: 6 / 42 response tokens (14.29%)"


def test_clipped_tokens_quiet_without_terminal(clipped_tokens_file):
    result = run_clipped_tokens(clipped_tokens_file, subprocess.PIPE)
    assert result.returncode == 0, result.stderr
    assert SUMMARY in result.stdout
    assert "\r" not in result.stdout + result.stderr and "line/s" not in result.stderr, result.stderr


def test_clipped_tokens_bar_on_terminal(clipped_tokens_file):
    with terminal() as (stream, read):
        result = run_clipped_tokens(clipped_tokens_file, stream.fileno())
        out = read()
    assert result.returncode == 0, out
    assert "reading clipped_tokens.jsonl:" in out and "/3" in out and "line/s" in out, repr(out)
    assert SUMMARY in result.stdout  # stdout is not the terminal: the report is as ever


def run_preprocess(tmp_path):
    with open(CHAT_DATA, encoding="utf-8") as f:
        lines = [next(f) for _ in range(3)]
    (tmp_path / "in.jsonl").write_text(lines[0] + "\n" + "".join(lines[1:]))  # a blank line: 4 lines, 3 samples
    preprocess.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                     "--tokenizer", TOKENIZER, "--seq-length", "128", "--log-interval", "1"])


def test_preprocess_log_lines_without_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    run_preprocess(tmp_path)
    log = sys.stderr.getvalue()
    assert [line.split(",")[0] for line in log.splitlines()] == ["1 lines", "2 lines", "3 lines"], log
    assert "\r" not in log
    assert capsys.readouterr().out.startswith("done in ")


def test_preprocess_bar_on_terminal(tmp_path, monkeypatch, capsys):
    with terminal() as (stream, read):
        monkeypatch.setattr(sys, "stderr", stream)
        run_preprocess(tmp_path)
        out = read()
    assert "preprocessing:" in out and "/4" in out and "line/s" in out, repr(out)
    assert "lines, " not in out  # the bar replaces the periodic lines
    assert capsys.readouterr().out.startswith("done in ")


# --- how the tools are installed ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def console_scripts(tmp_path_factory):
    """setup.py's metadata as an install gets it: the console scripts (name -> entry point) and the
    files the distribution ships."""
    pytest.importorskip("setuptools", reason="setup.py needs setuptools to write its metadata")
    egg_base = tmp_path_factory.mktemp("egg_info")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_base)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    (egg_info,) = egg_base.glob("*.egg-info")
    distribution = importlib.metadata.PathDistribution(egg_info)
    scripts = {entry.name: entry for entry in distribution.entry_points if entry.group == "console_scripts"}
    return scripts, (egg_info / "SOURCES.txt").read_text().split()


@pytest.mark.parametrize("script, module, tool, flag", [
    ("megatron-psft-preprocess", "megatron_psft.data.preprocess", "preprocess_data.py", "--output-prefix"),
    ("megatron-psft-clipped-tokens", "megatron_psft.reports.clipped_tokens", "clipped_tokens.py", "--clipped-tokens"),
])
def test_console_scripts_resolve_and_the_tools_scripts_run(console_scripts, script, module, tool, flag):
    scripts, shipped = console_scripts
    assert scripts[script].module == module and scripts[script].load() is importlib.import_module(module).main
    assert module.replace(".", "/") + ".py" in shipped  # a non-editable install has the code behind the script
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), "--help"], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {tool} ") and flag in result.stdout
