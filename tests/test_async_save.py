"""--async-save: saves written in the background change nothing in training (the same losses as saving
synchronously, checkpoints that load to the same weights), a resume from an asynchronous checkpoint
continues as the uninterrupted run, and a save becomes the latest only once every rank has written it.

One 2-rank launch runs every case (tests/distributed.py); kills during a background write are in
tests/test_faults.py."""

import json
import os

import pytest

from bundled import preprocess_bundled_data
from distributed import run_distributed

SEQ = 64
COMMON = ["--seq-length", str(SEQ), "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
          "--lr-warmup-iters", "0", "--moe-aux-loss-coeff", "0", "--old-policy-interval", "2", "--train-iters", "6"]
COMPARED = ("loss", "grad_norm", "entropy", "ratio_mean", "learning_rate")


def _weights(directory):
    """The model weights of the checkpoint in `directory`, loaded at this launch's layout."""
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config

    args = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(directory))
    parallel.initialize(parallel.ParallelLayout(), seed=7)  # another seed: the initial weights must not matter
    try:
        chunks = build_model_chunks(args, transformer_config(args, parallel.ParallelLayout()))
        checkpoint.load_model(directory, chunks)
        return {name: tensor.detach().clone() for name, tensor in chunks[0].state_dict().items()
                if not name.endswith("_extra_state")}
    finally:
        parallel.destroy()


def _publication(tmp, base):
    """Two saves in a row under --async-save, watched from rank 0's save points."""
    import torch.distributed as dist

    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    root = os.path.join(tmp, "publication")
    points = []
    checkpoint.SAVE_POINT_HOOKS.append(points.append)
    trainer = Trainer(parse_launch(base + ["--save", root, "--async-save"]))
    trainer.train_one_step()
    trainer.save()
    dist.barrier()  # every rank has returned from the save: its writer may still be writing
    staging = os.path.join(root, "iter_0000001.incomplete")
    seen = {"latest_after_save": checkpoint.latest_iteration(root), "staging": sorted(os.listdir(staging)),
            "published_after_save": os.path.isdir(checkpoint.iteration_dir(root, 1))}
    trainer.train_one_step()
    trainer.save()  # waits for the first save and publishes it, then starts the second
    seen["latest_after_second_save"] = checkpoint.latest_iteration(root)
    trainer.background_saves.wait()
    seen["latest_after_wait"] = checkpoint.latest_iteration(root)
    seen["points"] = points
    checkpoint.SAVE_POINT_HOOKS.remove(points.append)
    trainer.logger.close()
    parallel.destroy()
    return seen


def _async_cases(tmp, data_prefix):
    import torch
    import torch.distributed as dist

    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    base = COMMON + ["--data-prefix", data_prefix]

    def train(name, argv):
        Trainer(parse_launch(base + ["--metrics-file", os.path.join(tmp, f"{name}.jsonl")] + argv)).run()
        parallel.destroy()
        dist.barrier()  # the last rank has closed its metrics file

    def saved(name):
        return os.path.join(tmp, name)

    train("sync", ["--save", saved("sync"), "--save-interval", "2"])
    train("async", ["--save", saved("async"), "--save-interval", "2", "--async-save"])
    train("resumed", ["--save", saved("resumed"), "--save-interval", "2", "--async-save", "--exit-interval", "4"])
    train("resumed", ["--save", saved("resumed"), "--load", saved("resumed"), "--save-interval", "2", "--async-save"])
    same_weights = {}
    for step in (2, 4, 6):
        sync_weights = _weights(os.path.join(saved("sync"), f"iter_{step:07d}"))
        async_weights = _weights(os.path.join(saved("async"), f"iter_{step:07d}"))
        same_weights[step] = (sync_weights.keys() == async_weights.keys() and
                              all(torch.equal(sync_weights[k], async_weights[k]) for k in sync_weights))
    return {"same_weights": same_weights, "publication": _publication(tmp, base)}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("async_save"))
    data_prefix = preprocess_bundled_data(os.path.join(tmp, "data", "chat"), SEQ)
    return tmp, run_distributed(2, _async_cases, tmp, data_prefix)


def _compared(tmp, name):
    """The compared metrics of the six steps a run logged."""
    with open(os.path.join(tmp, f"{name}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], name
    return [{key: r[key] for key in COMPARED} for r in records]


def test_async_training_equals_sync_training_bit_for_bit(cases):
    tmp, _ = cases
    assert _compared(tmp, "async") == _compared(tmp, "sync")


def test_async_checkpoints_load_to_the_sync_checkpoints_weights(cases):
    tmp, results = cases
    assert all(results[0]["same_weights"].values()) and all(results[1]["same_weights"].values()), results
    for mode in ("sync", "async"):
        assert open(os.path.join(tmp, mode, "latest_checkpointed_iteration.txt")).read().strip() == "6"


def test_a_resume_from_an_async_checkpoint_equals_the_uninterrupted_run(cases):
    tmp, _ = cases
    assert _compared(tmp, "resumed") == _compared(tmp, "sync")


def test_latest_moves_only_once_every_rank_has_written_the_save(cases):
    _, results = cases
    seen = results[0]["publication"]
    assert seen["latest_after_save"] is None and not seen["published_after_save"]
    # The side files are in place before the publication; dist_checkpointing's metadata is written by it.
    assert {"hf_config.json", "run_config.json", "rank_state"} <= set(seen["staging"])
    assert "metadata.json" not in seen["staging"]
    assert seen["latest_after_second_save"] == 1 and seen["latest_after_wait"] == 2


def test_a_save_waits_for_the_save_in_flight(cases):
    """The second save starts only after the first is published: one write at a time."""
    _, results = cases
    points = results[0]["publication"]["points"]
    one_save = ["staging_created", "model_saved", "rank_state_saved", "finalize_started", "before_rename",
                "renamed", "latest_written"]
    assert points == one_save + one_save
