"""Save and resume training with Megatron-Core's ``dist_checkpointing``.

Layout of a checkpoint root (shared with ``checkpoint_convert``)::

    ROOT/latest_checkpointed_iteration.txt      written last, only once a checkpoint is complete
    ROOT/iter_0000042/                          a torch_dist checkpoint:
        {"model": ..., "optimizer": ..., "scheduler": ..., "trainer_state": ...,
         "frozen_policy": ...}                 (sft-kl's reference / a never-refreshed old policy)
        hf_config.json                          the model's HF config, so the checkpoint stands alone
        run_config.json                         what produced it: flags, TransformerConfig, versions, git
        rank_state/rank_00003.pt                per-rank state: RNG, and the old-policy round

The model part is layout-free (global tensors), so a checkpoint loads at any TP / PP / EP / ETP; the
distributed optimizer's part is saved ``fully_reshardable`` (Megatron-Core's canonical per-parameter form),
so a run resumes with its Adam state at another world size or layout (checkpoints saved
``dp_reshardable`` before resume at their own layout only). The per-rank state (RNG, the old-policy
round's log-probs) is laid out by ranks: at another layout it is rebuilt (:func:`resume`).
A checkpoint is written to ``iter_*.incomplete``, synced to disk, and renamed into place once every
rank has finished; the ``latest`` marker is replaced atomically last. A process killed at any point
leaves the previous checkpoint the latest, and the next save removes the leftovers. Under --async-save
(:class:`BackgroundSaves`) the shards are written by a process forked from each rank while training goes
on, and the rename and ``latest`` wait until every rank's write is done; the writers die with their rank.
"""

import functools
import glob
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_psft.platform import parallel
from megatron_psft.engine.optimizer import (init_state_for_loading, reshardable_load_keeps_adam_step,
                                            restore_adam_steps, unwrap)
from megatron_psft.observability.run_config import write_run_config

LATEST_FILE = "latest_checkpointed_iteration.txt"
HF_CONFIG_FILE = "hf_config.json"
# How the distributed optimizer's state is saved (recorded in trainer_state; older checkpoints: dp_reshardable).
OPTIMIZER_SHARDING = "fully_reshardable"
LEGACY_OPTIMIZER_SHARDING = "dp_reshardable"
RESHARDABLE_OPTIMIZER_FORMATS = ("fully_reshardable", "fully_sharded_model_space")
FROZEN_PREFIX = "frozen_policy."


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def resolve(root_or_iteration_dir: str, iteration: Optional[int] = None) -> str:
    """The ``iter_*`` directory to load from a root (its latest, or `iteration`) or an ``iter_*`` path."""
    if os.path.isfile(os.path.join(root_or_iteration_dir, "metadata.json")):
        return root_or_iteration_dir
    iteration = latest_iteration(root_or_iteration_dir) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"no complete checkpoint in {root_or_iteration_dir} (no {LATEST_FILE})")
    path = iteration_dir(root_or_iteration_dir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} is missing")
    return path


def model_sharded_state_dict(model_chunks: List[torch.nn.Module], prefix: str = "") -> Dict[str, Any]:
    """One chunk's state dict as is; virtual-pipeline chunks side by side (their tensor keys are global).
    `prefix` keeps a second model's tensors (the frozen policy) apart from the trained one's."""
    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict(prefix=prefix)
    return {f"chunk{i}": unwrap(chunk).sharded_state_dict(prefix=prefix) for i, chunk in enumerate(model_chunks)}


def _load_model_state(model_chunks, state, prefix: str = "") -> None:
    states = [state] if len(model_chunks) == 1 else [state[f"chunk{i}"] for i in range(len(model_chunks))]
    for chunk, chunk_state in zip(model_chunks, states):
        unwrap(chunk).load_state_dict({k[len(prefix):]: v for k, v in chunk_state.items()}, strict=True)


# Called with the name of each point a save passes ("staging_created", "model_saved", "rank_state_saved",
# "before_rename", "renamed", "latest_written"; the last three on rank 0 only; under --async-save also
# "background_write_started" and "background_write_done" in each rank's writer process, and
# "finalize_started" when every rank's write is done). Empty in training; the crash-consistency test
# installs one that kills a rank at a chosen point, as a node failure would.
SAVE_POINT_HOOKS: List[Callable[[str], None]] = []


def _reached(point: str) -> None:
    for hook in SAVE_POINT_HOOKS:
        hook(point)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_written_files(staging: str, rank_file: Optional[str]) -> None:
    """Each rank syncs the files it wrote (torch_dist names its shards ``__RANK_*``); rank 0 also the
    common files and the directories, so the rename publishes data that is on disk."""
    rank = dist.get_rank()
    mine = glob.glob(os.path.join(staging, f"__{rank}_*")) + ([rank_file] if rank_file else [])
    if rank == 0:
        mine += [p for p in glob.glob(os.path.join(staging, "*")) if os.path.isfile(p) and not
                 os.path.basename(p).startswith("__")]
        mine += [staging] + ([os.path.dirname(rank_file)] if rank_file else [])
    for path in mine:
        _fsync(path)


_WRITER_QUEUE_MANAGER = None  # kept alive for the process's lifetime, as megatron-core keeps its own


def _die_with_parent(parent: int) -> None:
    """Runs first in a checkpoint-writing child process: the kernel kills it when `parent` dies (a rank
    killed by SIGKILL runs no cleanup of its own). A parent that died before the signal was armed is
    checked for, as the kernel does not send it then."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def writer_queue_dies_with_this_process() -> None:
    """megatron-core's filesystem writer (0.16.1, 0.19.2) collects its results through a queue served by a
    Manager process it spawns once per process and never stops: a rank killed by SIGKILL (a node failure,
    a launcher ending the job) leaves it behind with its resource tracker. Started here first, the Manager
    dies with its rank, and the tracker, left without writers, with it."""
    global _WRITER_QUEUE_MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or not os.path.exists("/proc/self"):  # set, or not Linux
        return
    from multiprocessing.managers import SyncManager

    from torch import multiprocessing

    _WRITER_QUEUE_MANAGER = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _WRITER_QUEUE_MANAGER.start(_die_with_parent, (os.getpid(),))
    filesystem_async._results_queue = _WRITER_QUEUE_MANAGER.Queue()


def _write_in_background(write: Callable, parent: int, *args, **kwargs) -> None:
    """The body of the process megatron-core forks to write a rank's shards (--async-save): it and the
    processes it forks in turn (0.16.1's writer forks one per file) die with their parent, so a killed
    rank leaves none of them behind."""
    _die_with_parent(parent)
    os.register_at_fork(before=_note_forking_process, after_in_child=_die_with_forking_process)
    _reached("background_write_started")
    write(*args, **kwargs)
    _reached("background_write_done")


_FORKING_PROCESS = None  # in a background writer: the pid a child forked now has as its parent


def _note_forking_process() -> None:
    global _FORKING_PROCESS
    _FORKING_PROCESS = os.getpid()


def _die_with_forking_process() -> None:
    _die_with_parent(_FORKING_PROCESS)


class BackgroundSaves:
    """The checkpoint writes in flight under --async-save, in megatron-core's ``AsyncCallsQueue``: each
    rank's shards are written by a process forked at the save (it sees the state of that step while
    training changes its own), and a save is published (metadata, rename, ``latest``) only once every
    rank's write is done, by the :meth:`poll` or :meth:`wait` that finds it so (collectives: every rank
    calls them at the same points)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)  # a forked writer per save, as Megatron-LM's default

    def schedule(self, request, publish: Callable[[], None]) -> None:
        """Start writing `request` (from ``dist_checkpointing.save(..., async_sharded_save=True)``);
        megatron-core's finalization (its metadata), then `publish`, run when it is done everywhere."""
        write = request.async_fn  # None where the rank has nothing to write
        request = request._replace(
            async_fn=None if write is None else functools.partial(_write_in_background, write, os.getpid()),
            finalize_fns=[functools.partial(_reached, "finalize_started"), *request.finalize_fns, publish])
        self.queue.schedule_async_request(request)

    def in_flight(self) -> bool:
        return self.queue.get_num_unfinalized_calls() > 0  # the same on every rank

    def poll(self) -> None:
        """Publish the saves whose writes are done on every rank; never waits for a write."""
        self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Wait for the writes in flight and publish them."""
        if self.in_flight():
            parallel.print_rank_last("waiting for the checkpoint being written in the background")
            self.queue.maybe_finalize_async_calls(blocking=True)


def _async_save_arguments() -> dict:
    """``dist_checkpointing.save``'s asynchronous form. From 0.19 its default implementation is NVRx's
    (nvidia-resiliency-ext, not a dependency); megatron-core's own is asked for by name."""
    import inspect

    from megatron.core import dist_checkpointing

    arguments = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        arguments["async_strategy"] = "mcore"
    return arguments


def _create_staging(root: str, final: str) -> str:
    """An empty ``iter_*.incomplete`` beside where the checkpoint goes, a killed save's leftovers removed."""
    staging = final + ".incomplete"
    if dist.get_rank() == 0:
        for stale in glob.glob(os.path.join(root, "iter_*.incomplete")):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    _reached("staging_created")
    return staging


def _sharded_state(model_chunks, optimizer, scheduler, trainer_state, frozen_chunks) -> dict:
    model_state = model_sharded_state_dict(model_chunks)
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if trainer_state is not None:
        state["trainer_state"] = trainer_state
    if frozen_chunks:
        state["frozen_policy"] = model_sharded_state_dict(frozen_chunks, FROZEN_PREFIX)
    return state


def _write_side_files(staging: str, hf_config: dict, run_config: Optional[dict], rank_state: Optional[dict],
                      rank_file: Optional[str]) -> None:
    """What a checkpoint holds beside dist_checkpointing's files: the HF and run configs, each rank's state."""
    if dist.get_rank() == 0:
        with open(os.path.join(staging, HF_CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2)
        if run_config is not None:
            write_run_config(staging, run_config)
    if rank_file is not None:
        os.makedirs(os.path.dirname(rank_file), exist_ok=True)
        torch.save(rank_state, rank_file)
    _reached("rank_state_saved")


def _publish(root: str, iteration: int, staging: str, rank_file: Optional[str]) -> None:
    """Collective, once every rank's files are written: synced to disk, renamed into place by rank 0, and
    the ``latest`` marker replaced atomically last."""
    _sync_written_files(staging, rank_file)
    dist.barrier()
    if dist.get_rank() == 0:
        _reached("before_rename")
        final = iteration_dir(root, iteration)
        shutil.rmtree(final, ignore_errors=True)  # a save of this step that never became the latest
        os.replace(staging, final)
        _fsync(root)
        _reached("renamed")
        latest_tmp = os.path.join(root, LATEST_FILE + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        _reached("latest_written")
        os.replace(latest_tmp, os.path.join(root, LATEST_FILE))
        _fsync(root)
    dist.barrier()


def save(root: str, iteration: int, model_chunks, hf_config: dict, optimizer=None, scheduler=None,
         trainer_state: Optional[dict] = None, rank_state: Optional[dict] = None, frozen_chunks=None,
         run_config: Optional[dict] = None, background: Optional[BackgroundSaves] = None) -> str:
    """Save a complete checkpoint (collective: every rank calls it); returns its directory. `run_config`
    goes beside it as ``run_config.json``: what produced it. With `background` (--async-save) the shards
    are written while training goes on, and the directory and ``latest`` appear when `background`
    publishes the save; a save in flight is waited for first, so one is written at a time."""
    from megatron.core import dist_checkpointing

    writer_queue_dies_with_this_process()
    if background is not None:
        background.wait()
    final = iteration_dir(root, iteration)
    staging = _create_staging(root, final)
    state = _sharded_state(model_chunks, optimizer, scheduler, trainer_state, frozen_chunks)
    rank_file = None if rank_state is None else os.path.join(staging, "rank_state", f"rank_{dist.get_rank():05d}.pt")
    publish = functools.partial(_publish, root, iteration, staging, rank_file)
    # dist_checkpointing wants an empty directory: the side files are written after it.
    if background is None:
        dist_checkpointing.save(state, staging)
    else:
        background.schedule(dist_checkpointing.save(state, staging, **_async_save_arguments()), publish)
    _reached("model_saved")  # written, or being written in the background
    _write_side_files(staging, hf_config, run_config, rank_state, rank_file)
    if background is None:
        publish()
    return final


def load_model(path: str, model_chunks, frozen_chunks=None) -> None:
    """Load only the model weights (a converted HF checkpoint, or a training checkpoint), any layout;
    with `frozen_chunks`, also the frozen policy a training checkpoint holds."""
    from megatron.core import dist_checkpointing

    request = {"model": model_sharded_state_dict(model_chunks)}
    if frozen_chunks:
        request["frozen_policy"] = model_sharded_state_dict(frozen_chunks, FROZEN_PREFIX)
    loaded = dist_checkpointing.load(request, resolve(path))
    _load_model_state(model_chunks, loaded["model"])
    if frozen_chunks:
        _load_model_state(frozen_chunks, loaded["frozen_policy"], FROZEN_PREFIX)


def is_training_checkpoint(path: str) -> bool:
    """A checkpoint the trainer saved (trainer state, optimizer, per-rank state), rather than weights
    alone (a converter's output)."""
    return os.path.isdir(os.path.join(resolve(path), "rank_state"))


def read_common_state(path: str) -> dict:
    """The checkpoint's small common entries (trainer state, scheduler) without loading any tensor."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(resolve(path))


def load_training_state(path: str, model_chunks, optimizer, scheduler, frozen_chunks=None,
                        optimizer_sharding: str = OPTIMIZER_SHARDING) -> dict:
    """Resume: model, optimizer (saved as `optimizer_sharding`) and scheduler in place; returns the
    trainer state."""
    from megatron.core import dist_checkpointing

    directory = resolve(path)
    init_state_for_loading(optimizer)
    model_state = model_sharded_state_dict(model_chunks)
    request = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True,
                                                  metadata={"distrib_optim_sharding_type": optimizer_sharding}),
    }
    if frozen_chunks:
        request["frozen_policy"] = model_sharded_state_dict(frozen_chunks, FROZEN_PREFIX)
    loaded = dist_checkpointing.load(request, directory)  # common entries (scheduler, trainer_state) come too
    _load_model_state(model_chunks, loaded["model"])
    if frozen_chunks:
        _load_model_state(frozen_chunks, loaded["frozen_policy"], FROZEN_PREFIX)
    with torch.no_grad(), reshardable_load_keeps_adam_step(optimizer):  # fp32 main params are the leaf params
        optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    return loaded["trainer_state"]


def load_rank_state(directory: str, rank: int) -> dict:
    """One rank's state, on the host as it was saved: RNG states must be CPU ByteTensors, so the
    caller moves to the device only what lives there (:func:`to_device`)."""
    rank_file = os.path.join(directory, "rank_state", f"rank_{rank:05d}.pt")
    if not os.path.isfile(rank_file):
        raise FileNotFoundError(f"{rank_file} is missing: resume with the world size the checkpoint was saved with")
    return torch.load(rank_file, map_location="cpu", weights_only=True)  # tensors and plain containers only


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor in nested dicts / lists / tuples moved to `device`."""
    if torch.is_tensor(tree):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(value, device) for value in tree)
    return tree


def read_hf_config(path: str) -> dict:
    """The HF config a checkpoint carries: from a checkpoint root or ``iter_*`` directory, or from a
    directory holding just its ``hf_config.json`` (enough for a dry run without the weights). A Megatron-LM
    checkpoint carries none: its config is told from the arguments it saved."""
    direct = os.path.join(path, HF_CONFIG_FILE)
    carried = direct if os.path.isfile(direct) else os.path.join(resolve(path), HF_CONFIG_FILE)
    if not os.path.isfile(carried):
        from megatron_psft.megatron_lm import megatron_lm_hf_config

        return megatron_lm_hf_config(resolve(path))
    with open(carried) as f:
        return json.load(f)


# --- resume rules ----------------------------------------------------------------------------------
# Configuration keys (:meth:`TrainConfig.flat`) a resumed run must share with its checkpoint: they place
# the data and the old-policy round.
RESUME_INVARIANTS = ("seed", "global_batch_size", "micro_batch_size", "seq_length", "pack_sequences", "objective",
                     "old_policy_interval", "sft_warmup_steps", "data_prefix")
# The parallel layout: a reshardable optimizer state resumes across a change of these (the per-rank
# state is rebuilt); a dp_reshardable one needs --no-load-optim or --finetune.
LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
               "virtual_pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size")
# What the optimizer state's own form depends on: a change needs --no-load-optim or --finetune.
PRECISION_INVARIANTS = ("params_dtype", "fp8_format", "fp8_recipe", "use_distributed_optimizer")
# The learning-rate / weight-decay schedule's settings, as OptimizerParamScheduler saves them.
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
                 "wd_incr_steps", "wd_incr_style")


def trainer_state(config, step: int, world_size: int, optimizer) -> dict:
    """What a checkpoint records of the run: its step, world size, whole configuration and optimizer form."""
    return {"step": step, "world_size": world_size, "config": config.to_dict(), "optimizer_sharding": OPTIMIZER_SHARDING,
            "optimizer_parts": optimizer_parts(optimizer)}


def optimizer_parts(optimizer) -> int:
    """How many optimizers Megatron-Core chains: dense and expert parameters get one each when the experts
    have a data-parallel group of their own, and share one otherwise; their checkpoint keys differ."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def saved_settings(saved_trainer_state: dict) -> dict:
    """The settings a checkpoint recorded, by configuration key. Checkpoints from before the typed
    configuration (main at 2337daf and earlier) recorded the resume keys flat, under the same names."""
    if "config" not in saved_trainer_state:
        settings = {key: value for key, value in saved_trainer_state.items() if key != "step"}
    else:
        settings = {"world_size": saved_trainer_state["world_size"],
                    **{key: value for section in saved_trainer_state["config"].values() for key, value in section.items()}}
    if isinstance(settings.get("data_prefix"), str):  # one prefix, as checkpoints before blends recorded it
        settings["data_prefix"] = [settings["data_prefix"]]
    return settings


def changed_settings(config, world_size: int, saved_trainer_state: dict, keys) -> dict:
    """The settings among `keys` that differ from the checkpoint's: {key: (saved, now)}."""
    saved, now = saved_settings(saved_trainer_state), {**config.flat(), "world_size": world_size}
    return {key: (saved[key], now[key]) for key in keys if key in saved and saved[key] != now[key]}


def saved_optimizer_sharding(saved_trainer_state: dict) -> str:
    """The form the checkpoint's distributed optimizer state was saved in (before it was recorded: dp_reshardable)."""
    return saved_trainer_state.get("optimizer_sharding", LEGACY_OPTIMIZER_SHARDING)


def check_resume(config, world_size: int, saved_trainer_state: dict, saved_schedule: dict, schedule: dict) -> None:
    """Refuse a resume whose settings differ from its checkpoint's, saying what changed and how to go on."""
    def changed(keys):
        return changed_settings(config, world_size, saved_trainer_state, keys)

    data_settings = changed(RESUME_INVARIANTS)
    if data_settings:  # the data position and the saved old-policy round depend on them
        raise ValueError(f"resuming needs the checkpoint's settings; changed (saved, now): {data_settings}")
    settings = config.checkpoint
    if settings.no_load_optim:
        return
    how_to_go_on = ("To continue from its weights, pass --no-load-optim (keeps the step and the schedule) or "
                    "--finetune (starts at step 0)")
    precision = changed(PRECISION_INVARIANTS)
    if precision:
        raise ValueError(f"the checkpoint's optimizer state was saved at another precision / optimizer; changed "
                         f"(saved, now): {precision}. {how_to_go_on}")
    sharding = saved_optimizer_sharding(saved_trainer_state)
    layout = changed(LAYOUT_KEYS)
    if layout and sharding not in RESHARDABLE_OPTIMIZER_FORMATS:
        raise ValueError(f"the checkpoint's optimizer and per-rank state were saved ({sharding}) at another layout; "
                         f"changed (saved, now): {layout}. {how_to_go_on}")
    schedule_changes = {key: (saved_schedule[key], schedule[key]) for key in SCHEDULE_KEYS
                        if key in saved_schedule and saved_schedule[key] != schedule[key]}
    if schedule_changes and not (settings.override_opt_param_scheduler or settings.use_checkpoint_opt_param_scheduler):
        raise ValueError(f"the learning-rate schedule of the flags differs from the checkpoint's; changed (saved, now): "
                         f"{schedule_changes}. Pass --override-opt-param-scheduler to follow the flags (e.g. a longer "
                         f"--train-iters) or --use-checkpoint-opt-param-scheduler to keep the checkpoint's")


# --- per-rank state --------------------------------------------------------------------------------
def capture_rank_state(old_policy_state: dict) -> dict:
    """This rank's RNG states and old-policy round, as a checkpoint's rank_state file holds them."""
    from megatron.core import tensor_parallel

    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": None if parallel.use_cpu() else torch.cuda.get_rng_state(),
        "tracker_rng": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "old_policy": old_policy_state,
    }


def restore_rng_states(rank_state: dict) -> None:
    """The RNG states of :func:`capture_rank_state`; they stay on the host, as saved."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(rank_state["torch_rng"])
    if rank_state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(rank_state["cuda_rng"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rank_state["tracker_rng"])


# --- resuming a run --------------------------------------------------------------------------------
def _check_optimizer_parts(saved_trainer_state: dict, optimizer, layout: dict) -> None:
    saved_parts = saved_trainer_state.get("optimizer_parts", optimizer_parts(optimizer))
    if saved_parts != optimizer_parts(optimizer):
        raise ValueError(f"the checkpoint's optimizer state has {saved_parts} part(s) (dense / expert), this layout "
                         f"{optimizer_parts(optimizer)}: Megatron-Core keys them apart only when the experts have their "
                         f"own data-parallel group, so changed (saved, now) {layout} cannot carry the Adam state. Keep "
                         "the experts' grouping (e.g. EP > 1 on both sides), or pass --no-load-optim or --finetune")


def resume(root: str, config, model_chunks, optimizer, scheduler, frozen_chunks, old_policy) -> int:
    """Resume the run of `config` from the checkpoint under `root`, refusing changed settings
    (:func:`check_resume`); returns the step to continue from. With ``--no-load-optim`` only the weights
    and the step: the configuration's schedule, a fresh optimizer and old-policy round. At another
    layout the per-rank state is rebuilt: the RNG from the seed (training draws no random numbers), and
    the interrupted round's old log-probs recomputed from the resumed weights (docs/run_script.md)."""
    saved = read_common_state(root)
    world_size = dist.get_world_size()
    check_resume(config, world_size, saved["trainer_state"], saved["scheduler"], scheduler.state_dict())
    settings = config.checkpoint
    if settings.no_load_optim:
        load_model(root, model_chunks, frozen_chunks)
        step = saved["trainer_state"]["step"]
        scheduler.step(step)
        parallel.print_rank_last(f"loaded the weights of {resolve(root)} (--no-load-optim): "
                                 f"fresh optimizer state from step {step}")
        return step
    scheduler.override_opt_param_scheduler = settings.override_opt_param_scheduler
    scheduler.use_checkpoint_opt_param_scheduler = settings.use_checkpoint_opt_param_scheduler
    layout = changed_settings(config, world_size, saved["trainer_state"], LAYOUT_KEYS)
    if layout:
        _check_optimizer_parts(saved["trainer_state"], optimizer, layout)
    trainer_state = load_training_state(root, model_chunks, optimizer, scheduler, frozen_chunks=frozen_chunks,
                                        optimizer_sharding=saved_optimizer_sharding(saved["trainer_state"]))
    if layout:
        parallel.print_rank_last(f"resharded from {resolve(root)} at step {trainer_state['step']}: changed (saved, "
                                 f"now) {layout}; RNG from the seed, the round's old log-probs recomputed")
        return trainer_state["step"]
    rank_state = load_rank_state(resolve(root), dist.get_rank())
    restore_rng_states(rank_state)
    old_policy.load_state_dict(to_device(rank_state["old_policy"], parallel.device()))
    parallel.print_rank_last(f"resumed from {resolve(root)} at step {trainer_state['step']}")
    return trainer_state["step"]
