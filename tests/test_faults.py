"""Real faults and resume rules: a save killed at each of its points, SIGTERM preemption, a longer
--train-iters on resume, a changed layout, weights-only loads, a truncated metrics line.

The kills and the signal need real processes (torchrun, 2 ranks); the resume rules run in one
2-rank launch of ordinary processes."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings

import psutil
import pytest

from bundled import ROOT, preprocess_bundled_data
from distributed import free_port, run_distributed

SEQ = 64
COMMON = ["--seq-length", str(SEQ), "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
          "--lr-warmup-iters", "0", "--moe-aux-loss-coeff", "0", "--old-policy-interval", "2"]
# Where a save can die: each rank's collective part, rank 0's publication steps.
KILL_POINTS = {"staging_created": 1, "model_saved": 1, "rank_state_saved": 0, "renamed": 0, "latest_written": 0}
# Under --async-save: a rank killed by its own writer as the write starts and once it is written, one killed
# when every write is done but before the finalization (metadata) and rename, and one in the publication.
# The writers are rank 0's: at this data-parallel layout rank 1 has no shard of its own to write (no writer).
ASYNC_KILL_POINTS = {"background_write_started": 0, "background_write_done": 0, "finalize_started": 1,
                     "latest_written": 0}
# The kills leave two kinds of leftovers: a partial iter_4.incomplete, or a complete iter_4 that latest does
# not name. After one kill of each kind per mode the rerun resumes and must train as the uninterrupted run;
# after every kill the previous checkpoint must be byte for byte what it was, and still the latest.
RESUMED_AFTER = {"model_saved", "latest_written", "finalize_started"}


def _contents(directory):
    """Every file under `directory` by relative path, with its bytes' sha256."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _kill_group(session_leader):
    try:
        os.killpg(session_leader, signal.SIGKILL)
    except ProcessLookupError:  # nothing left in it
        pass


class _Run:
    def __init__(self, returncode, output, survivors):
        self.returncode, self.output, self.survivors = returncode, output, survivors


# Each launch's processes inherit this variable with a value of their own: a process that outlived its
# launch (an orphan, reparented away from it) is still found by it.
LAUNCH_MARKER = "PSFT_TEST_LAUNCH"


def _processes_carrying(marker_value):
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(LAUNCH_MARKER) == marker_value:
                found.append(process)
        except psutil.Error:  # gone, a zombie, or another user's
            pass
    return found


class _Launch:
    """2-rank training through torchrun in its own session (its own process group), its output in `log_path`.
    `trainer`: the module or script each rank runs."""

    def __init__(self, trainer, flags, log_path, env=None):
        self.marker, self.log_path = uuid.uuid4().hex, log_path
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(free_port()), *trainer, *COMMON, *flags]
        process_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", LAUNCH_MARKER: self.marker,
                       **(env or {})}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def finish(self, timeout=600):
        """Wait for torchrun; then note the launch's processes still alive after a grace period (ranks' children
        that outlived them: orphans), and kill the whole process group, whatever it holds."""
        survivors = []
        try:
            self.process.wait(timeout=timeout)
            _, alive = psutil.wait_procs(_processes_carrying(self.marker), timeout=15)
            survivors = [f"{p.pid} ppid {p.ppid()}: {' '.join(p.cmdline())}" for p in alive if p.is_running()]
        finally:
            _kill_group(self.process.pid)
            for orphan in _processes_carrying(self.marker):  # those that left the group too
                orphan.kill()
        with open(self.log_path) as f:
            return _Run(self.process.returncode, f.read(), survivors)


def _torchrun(flags, log_path, env=None, kill_at=None):
    """Train to the end (or death) and clean up after it (:meth:`_Launch.finish`). `kill_at` = (save point,
    rank): that rank dies there (kill_during_save.py)."""
    trainer = (["-m", "megatron_psft.train"] if kill_at is None else
               [os.path.join(ROOT, "tests", "kill_during_save.py"), kill_at[0], str(kill_at[1])])
    return _Launch(trainer, flags, log_path, env).finish()


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return preprocess_bundled_data(str(tmp_path_factory.mktemp("data") / "chat"), SEQ)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_prefix):
    """The run every killed save must resume into (4 steps), and the previous checkpoint: its step 2."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    base = ["--data-prefix", data_prefix, "--train-iters", "4"]
    straight = _torchrun(base + ["--metrics-file", str(tmp / "straight.jsonl")], tmp / "straight.log")
    assert straight.returncode == 0, straight.output[-4000:]
    first = _torchrun(base + ["--exit-interval", "2", "--save", str(tmp / "first")], tmp / "first.log")
    assert first.returncode == 0, first.output[-4000:]
    return _records(tmp / "straight.jsonl"), tmp / "first"


@pytest.mark.parametrize("mode, kill_points", [("sync", KILL_POINTS), ("async", ASYNC_KILL_POINTS)])
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint_resumes_exactly_and_no_orphan(
        tmp_path, data_prefix, uninterrupted, mode, kill_points):
    """After the kill, no process of the launch is left: the ranks' checkpoint writers (and the writer's
    results-queue Manager) die with them, without the launch's process group being killed."""
    want, first = uninterrupted
    flags = ["--data-prefix", data_prefix, "--train-iters", "4"] + (["--async-save"] if mode == "async" else [])
    for point, rank in kill_points.items():
        root = tmp_path / point
        shutil.copytree(first, root)
        killed = _torchrun(flags + ["--save", str(root), "--load", str(root)], tmp_path / f"{point}_killed.log",
                           kill_at=(point, rank))
        assert killed.returncode != 0, (point, "the kill hook did not fire")
        assert not killed.survivors, (point, "outlived their rank", killed.survivors)
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2", point
        assert _contents(root / "iter_0000002") == _contents(first / "iter_0000002"), point
        if point not in RESUMED_AFTER:
            continue
        resumed = _torchrun(flags + ["--save", str(root), "--load", str(root)], tmp_path / f"{point}_resumed.log")
        assert resumed.returncode == 0, (point, resumed.output[-4000:])
        assert "resumed from" in resumed.output and "iter_0000002" in resumed.output, point
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
        assert not list(root.glob("*.incomplete")), point  # the killed save's leftovers are gone
        got = _records(root / "metrics.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4], point
        for g, w in zip(got, want):
            for key in ("loss", "grad_norm", "entropy", "ratio_mean"):
                assert g[key] == pytest.approx(w[key], rel=0, abs=1e-6), (point, g["step"], key)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_saves(tmp_path, data_prefix, mode):
    """Under --async-save a save every 2 steps is likely in flight when the signal comes: the final save
    waits for it, and for itself, before the ranks exit."""
    root = tmp_path / "preempted"
    async_flags = ["--async-save", "--save-interval", "2"] if mode == "async" else []
    launch = _Launch(["-m", "megatron_psft.train"], ["--data-prefix", data_prefix, "--train-iters", "200", "--save",
                                                     str(root), "--exit-signal-handler", *async_flags],
                     tmp_path / "preempted.log")
    metrics = root / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert launch.process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        # torchrun's own children are the ranks; deeper down, a rank's forked checkpoint writer has the
        # rank's command line and environment, and may be exiting (a zombie) as it is listed.
        rank1 = next(p for p in psutil.Process(launch.process.pid).children() if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGTERM)  # as a preemption notice that reached one node first
    finally:
        run = launch.finish(timeout=300)
    assert run.returncode == 0, run.output[-4000:]
    steps = [r["step"] for r in _records(metrics)]
    saved = int((root / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 200 and steps == list(range(1, saved + 1)), (saved, steps)
    assert "SIGTERM received" in run.output
    assert sorted(os.listdir(root / f"iter_{saved:07d}" / "rank_state")) == ["rank_00000.pt", "rank_00001.pt"]
    assert not list(root.glob("*.incomplete")) and not run.survivors


def _resume_rules(tmp, data_prefix):
    import torch.distributed as dist

    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config
    from megatron_psft.train import Trainer, parse_launch

    base = COMMON + ["--data-prefix", data_prefix, "--objective", "sft", "--lr-decay-style", "cosine"]
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]

    def train(argv):
        try:
            Trainer(parse_launch(base + argv)).run()
            return "ok"
        except ValueError as error:
            return str(error)
        finally:
            parallel.destroy()
            dist.barrier()  # the last rank has closed its metrics file

    def metrics(name):
        return os.path.join(tmp, f"{name}.jsonl")

    results = {}
    saved = os.path.join(tmp, "saved")
    results["base"] = train(["--train-iters", "4", "--save", saved, "--metrics-file", metrics("base")])
    results["straight6"] = train(["--train-iters", "6", "--metrics-file", metrics("straight6"), "--profile",
                                  "--profile-step-start", "2", "--profile-step-end", "3",
                                  "--profile-dir", os.path.join(tmp, "profile")])
    override = os.path.join(tmp, "override")
    if dist.get_rank() == 0:
        shutil.copytree(saved, override)
        shutil.copy(metrics("base"), metrics("override"))
        with open(metrics("override"), "a") as f:  # a kill in the middle of writing a record
            f.write('{"step": 5, "loss": 1.2')
    dist.barrier()
    results["extended"] = train(["--train-iters", "6", "--load", saved, "--metrics-file", metrics("refused")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["override"] = train(["--train-iters", "6", "--load", override, "--save", override,
                                     "--override-opt-param-scheduler", "--metrics-file", metrics("override")])
    results["truncated_warning"] = any("truncated" in str(w.message) for w in caught)
    results["keep_schedule"] = train(["--train-iters", "6", "--load", saved, "--use-checkpoint-opt-param-scheduler",
                                      "--metrics-file", metrics("keep")])
    results["tp2"] = train(tp2 + ["--train-iters", "6", "--load", saved, "--override-opt-param-scheduler",
                                  "--metrics-file", metrics("tp2_resharded")])
    results["no_load_optim"] = train(tp2 + ["--train-iters", "6", "--load", saved, "--no-load-optim",
                                            "--metrics-file", metrics("no_load_optim")])
    results["finetune"] = train(tp2 + ["--train-iters", "2", "--load", saved, "--finetune",
                                       "--metrics-file", metrics("finetune")])
    results["duration"] = train(["--train-iters", "6", "--exit-duration-in-mins", "1e-6", "--save",
                                 os.path.join(tmp, "duration"), "--metrics-file", metrics("duration")])

    weights_only = os.path.join(tmp, "weights_only")  # what checkpoint_convert.hf_to_megatron writes
    hf_config = load_hf_config("debug")
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(parallel.ParallelLayout(), seed=3)
    checkpoint.save(weights_only, 0, build_model_chunks(args, transformer_config(args, parallel.ParallelLayout())),
                    hf_config)
    parallel.destroy()
    results["load_weights_only"] = train(["--train-iters", "1", "--load", weights_only,
                                          "--metrics-file", metrics("load_weights_only")])
    results["pretrained"] = train(["--train-iters", "1", "--pretrained-checkpoint", weights_only,
                                   "--metrics-file", metrics("pretrained")])
    return results


@pytest.fixture(scope="module")
def resume_rules(tmp_path_factory, data_prefix):
    tmp = str(tmp_path_factory.mktemp("resume_rules"))
    return tmp, run_distributed(2, _resume_rules, tmp, data_prefix)[-1]


def _lrs(tmp, name):
    return [(r["step"], r["learning_rate"]) for r in _records(os.path.join(tmp, f"{name}.jsonl"))]


def test_a_longer_train_iters_on_resume_is_refused_unless_the_schedule_is_chosen(resume_rules):
    tmp, results = resume_rules
    assert "lr_decay_steps" in results["extended"] and "--override-opt-param-scheduler" in results["extended"]
    assert results["override"] == "ok" == results["keep_schedule"]
    # Following the flags: steps 5-6 train at the learning rates of an uninterrupted 6-step run.
    assert _lrs(tmp, "override")[4:] == _lrs(tmp, "straight6")[4:] and all(lr > 0 for _, lr in _lrs(tmp, "override"))
    # Keeping the checkpoint's 4-step cosine: it has decayed to min_lr.
    assert [lr for _, lr in _lrs(tmp, "keep")] == [0.0, 0.0]


def test_a_truncated_metrics_line_is_dropped_with_a_warning(resume_rules):
    tmp, results = resume_rules
    assert results["truncated_warning"]
    assert [r["step"] for r in _records(os.path.join(tmp, "override.jsonl"))] == [1, 2, 3, 4, 5, 6]


def test_a_changed_layout_resumes_with_the_optimizer_state(resume_rules):
    """TP1 -> TP2 at a round boundary: the reshardable optimizer state carries over, so steps 5-6 are the
    TP1 run's (the same checkpoint resumed at TP1 with the same schedule). Refusals: tests/test_reshard.py."""
    tmp, results = resume_rules
    assert results["tp2"] == "ok", results["tp2"]
    got, want = _records(os.path.join(tmp, "tp2_resharded.jsonl")), _records(os.path.join(tmp, "override.jsonl"))
    assert [r["step"] for r in got] == [5, 6]
    for g, w in zip(got, want[4:]):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)


def test_no_load_optim_continues_the_weights_at_a_new_layout(resume_rules):
    tmp, results = resume_rules
    assert results["no_load_optim"] == "ok"
    got, want = _records(os.path.join(tmp, "no_load_optim.jsonl")), _records(os.path.join(tmp, "override.jsonl"))
    assert [r["step"] for r in got] == [5, 6]
    # Same weights, same batch at step 5, the flags' learning rate: only the layout differs.
    assert got[0]["loss"] == pytest.approx(want[4]["loss"], rel=1e-5)
    assert got[0]["learning_rate"] == want[4]["learning_rate"]


def test_finetune_takes_the_weights_only(resume_rules):
    tmp, results = resume_rules
    assert results["finetune"] == "ok"
    got = _records(os.path.join(tmp, "finetune.jsonl"))
    base = _records(os.path.join(tmp, "base.jsonl"))
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["loss"] < base[0]["loss"]  # step 1 starts from the trained weights, not the initial ones


def test_profile_writes_a_trace_per_rank(resume_rules):
    tmp, _ = resume_rules
    traces = sorted(os.listdir(os.path.join(tmp, "profile")))
    assert traces == ["trace_rank00000.json", "trace_rank00001.json"]
    with open(os.path.join(tmp, "profile", traces[0])) as f:
        assert json.load(f)["traceEvents"]


def test_exit_duration_stops_and_saves(resume_rules):
    tmp, results = resume_rules
    assert results["duration"] == "ok"
    assert open(os.path.join(tmp, "duration", "latest_checkpointed_iteration.txt")).read().strip() == "1"
    assert len(_records(os.path.join(tmp, "duration.jsonl"))) == 1


def test_load_of_a_weights_only_checkpoint_starts_from_its_weights(resume_rules):
    tmp, results = resume_rules
    assert results["load_weights_only"] == "ok" == results["pretrained"]
    got, want = _records(os.path.join(tmp, "load_weights_only.jsonl")), _records(os.path.join(tmp, "pretrained.jsonl"))
    assert [r["step"] for r in got] == [1] and got[0]["loss"] == want[0]["loss"]


def _outliving_a_killed_rank(script, processes_of):
    """Run `script` as a rank (in its own session); once it has printed its first line, SIGKILL it. Returns the
    command lines of the processes `processes_of(rank_pid, first_line)` names that are alive 30 s later."""
    rank = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, start_new_session=True)
    try:
        processes = processes_of(rank.pid, rank.stdout.readline())
        rank.kill()
        rank.wait(timeout=30)
        _, alive = psutil.wait_procs(processes, timeout=30)
        return [p.cmdline() for p in alive]
    finally:
        _kill_group(rank.pid)  # whatever is left in the rank's group
        rank.stdout.close()


def test_the_checkpoint_writers_queue_process_dies_with_its_rank(tmp_path):
    """megatron-core's writer queue lives in a Manager process of each saving rank; a rank killed by
    SIGKILL must not leave it (or its resource tracker) behind."""
    script = ("from megatron_psft import checkpoint; checkpoint.writer_queue_dies_with_this_process(); "
              "print(checkpoint._WRITER_QUEUE_MANAGER._process.pid, flush=True); import time; time.sleep(600)")

    def rank_children(rank_pid, manager_pid):
        children = psutil.Process(rank_pid).children(recursive=True)
        assert psutil.Process(int(manager_pid)) in children
        return children

    assert _outliving_a_killed_rank(script, rank_children) == []


WRITER_SCRIPT = """
import functools, os, time
from torch import multiprocessing
from megatron_psft import checkpoint

def write():  # as megatron-core 0.16.1's writer: a process forked per file, each writing for a long time
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    child.start()
    print(os.getpid(), child.pid, flush=True)
    time.sleep(600)

fork = multiprocessing.get_context("fork")  # as megatron-core's TemporalAsyncCaller starts the writer
fork.Process(target=functools.partial(checkpoint._write_in_background, write, os.getpid())).start()
time.sleep(600)
"""


def test_a_background_checkpoint_writer_and_the_processes_it_forks_die_with_their_rank():
    """--async-save writes from a process forked from each rank, which (0.16.1) forks one per file: a rank
    killed by SIGKILL mid-write must take them all with it."""
    def writers(rank_pid, writer_pids):
        return [psutil.Process(int(pid)) for pid in writer_pids.split()]

    assert _outliving_a_killed_rank(WRITER_SCRIPT, writers) == []
