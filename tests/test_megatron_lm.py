"""PSFT inside Megatron-LM's own loop: ``pretrain()`` end to end on CPU (examples/megatron_lm/pretrain_psft.py
with megatron_psft.megatron_lm's forward step, its model and optimizer built by Megatron-LM) against
megatron-psft's trainer on the same weights and data, and checkpoints moving between the two.

Two launches: TP2 + SP x EP2 on 4 ranks; TP1 x DP2 on 2 ranks, which also moves checkpoints both ways and
runs both trainers with MoE router replay. Each runs 6 steps with the old policy refreshed every 3 (so the
frozen copy serves steps 2, 3, 5, 6)."""

import importlib.util
import json
import os
import sys

import pytest

from bundled import ROOT, preprocess_bundled_data
from distributed import run_distributed

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is None,
    reason="megatron-core 0.16.1 (the py311 leg) has no megatron.training: Megatron-LM's loop ships in the "
           "0.17+ wheels, which need Python 3.12 (the py312 leg)")

EXAMPLE = os.path.join(ROOT, "examples", "megatron_lm")
SEQ, STEPS, INTERVAL, SEED = 96, 6, 3, 1234
# The same run in both trainers' flags (constant learning rate: their schedulers count steps differently).
SHARED = ["--seq-length", str(SEQ), "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-4",
          "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--moe-aux-loss-coeff", "0",
          "--train-iters", str(STEPS), "--old-policy-interval", str(INTERVAL), "--seed", str(SEED)]
# Megatron-LM's defaults that differ from megatron-psft's, and the reference kernels the CPU has.
MEGATRON_LM = ["--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--use-distributed-optimizer",
               "--moe-token-dispatcher-type", "alltoall", "--transformer-impl", "local", "--no-masked-softmax-fusion",
               "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
               "--no-persist-layer-norm", "--use-cpu-initialization", "--log-interval", "1", "--eval-iters", "0",
               "--eval-interval", "1000", "--num-workers", "0", "--no-load-optim", "--no-load-rng", "--finetune"]
LAYOUTS = {"tp2_sp_ep2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--expert-model-parallel-size", "2"]),
           "tp1_dp2": (2, [])}
COMPARED = ("loss", "clip_fraction", "entropy", "grad_norm")


def _weights(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items() if "_extra_state" not in name}


def _differing(got, want):
    """Names whose tensors are not exactly equal (or missing on one side)."""
    import torch

    return sorted(name for name in set(got) | set(want)
                  if name not in got or name not in want or not torch.equal(got[name], want[name]))


def _save_initial_weights(root):
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config

    hf_config = load_hf_config("debug")
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(parallel.ParallelLayout(), seed=3)
    checkpoint.save(root, 0, build_model_chunks(args, transformer_config(args, parallel.ParallelLayout())), hf_config)
    parallel.destroy()


def _run_trainer(argv):
    from megatron_psft import train

    train.main(argv)


class _Spy:
    """Megatron-LM's ``train_step`` as its loop calls it: each step's reduced metrics and grad norm, the
    model before the first step, and the model itself."""

    def __init__(self):
        from megatron.training import training

        self.training, self.original = training, training.train_step
        self.steps, self.model, self.initial = [], None, None
        training.train_step = self.train_step

    def train_step(self, forward_step_func, data_iterator, model, *args, **kwargs):
        from megatron_psft.engine.optimizer import unwrap

        if self.model is None:
            self.model, self.initial = model, _weights(unwrap(model[0]))
        result = self.original(forward_step_func, data_iterator, model, *args, **kwargs)
        self.steps.append({**{name: float(value) for name, value in result[0].items()}, "grad_norm": float(result[5])})
        return result

    def restore(self):
        self.training.train_step = self.original


def _run_megatron_lm(argv):
    """The example's main() under Megatron-LM's command line `argv`; returns the spy of its loop."""
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    destroy_rerun_state_machine()  # our trainer's schedule made one; Megatron-LM's start-up makes its own
    sys.path.insert(0, EXAMPLE)
    import pretrain_psft
    from qwen3_moe_flags import model_flags

    from megatron_psft.models.qwen3_moe import load_hf_config

    spy = _Spy()
    sys.argv = ["pretrain_psft.py", *model_flags(load_hf_config("debug")), *argv]
    try:
        pretrain_psft.main()
    finally:
        spy.restore()
    return spy


def _our_model_with(path, layout):
    """megatron-psft's model at `layout` holding the weights of the checkpoint at `path` (its own loader)."""
    from megatron_psft import checkpoint
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config

    args = Qwen3MoeArgs.from_hf_config(load_hf_config("debug"))
    chunks = build_model_chunks(args, transformer_config(args, layout))
    checkpoint.load_model(path, chunks)
    return _weights(chunks[0])


def _layout_of(megatron_args):
    from megatron_psft.platform import parallel

    return parallel.ParallelLayout(tensor=megatron_args.tensor_model_parallel_size,
                                   expert=megatron_args.expert_model_parallel_size,
                                   sequence_parallel=megatron_args.sequence_parallel)


def _scenario(tmp, data_prefix, name, exchange_checkpoints):
    """Both trainers from the same start at layout `name`; with `exchange_checkpoints`, each loads the other's."""
    import torch.distributed as dist
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.training import destroy_global_state

    from megatron_psft import checkpoint
    from megatron_psft.engine.optimizer import unwrap
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, load_hf_config

    layout = LAYOUTS[name][1]
    initial, ours, theirs = (os.path.join(tmp, f"{name}_{what}") for what in ("initial", "ours", "megatron_lm"))
    _save_initial_weights(initial)
    _run_trainer(SHARED + layout + ["--data-prefix", data_prefix, "--pretrained-checkpoint", initial,
                                    "--metrics-file", os.path.join(tmp, f"{name}.jsonl"),
                                    *(["--save", ours] if exchange_checkpoints else [])])
    spy = _run_megatron_lm(SHARED + layout + MEGATRON_LM + ["--data-path", data_prefix, "--load", initial,
                                                            *(["--save", theirs, "--save-interval", str(STEPS)]
                                                              if exchange_checkpoints else [])])
    result = {"steps": spy.steps}
    if exchange_checkpoints:
        args = get_args()
        model = unwrap(spy.model[0])
        result["megatron_lm_loaded_ours"] = _differing(spy.initial, _our_model_with(initial, _layout_of(args)))
        result["we_loaded_megatron_lm"] = _differing(_our_model_with(theirs, _layout_of(args)), _weights(model))
        args.load, args.finetune, args.no_load_optim, args.no_load_rng = ours, True, True, True
        load_checkpoint(spy.model, None, None)
        result["megatron_lm_loaded_our_training_checkpoint"] = _differing(
            _weights(model), _our_model_with(ours, _layout_of(args)))
        final = _our_model_with(theirs, _layout_of(args))
        told = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(theirs))
        trained = Qwen3MoeArgs.from_hf_config({**load_hf_config("debug"), "router_aux_loss_coef": 0.0})  # SHARED's
        result["model_told_from_megatron_lm_arguments"] = told == trained
    destroy_global_state()
    if exchange_checkpoints:  # the trainer's own flags take Megatron-LM's checkpoint; at lr 0 it saves it unchanged
        _run_trainer(SHARED + layout + ["--data-prefix", data_prefix, "--load", theirs, "--finetune", "--train-iters",
                                        "1", "--lr", "0", "--save", ours + "_from_megatron_lm"])
        result["trainer_took_megatron_lm_weights"] = _differing(_trainer_weights(ours + "_from_megatron_lm"), final)
        result["replay"] = _with_router_replay(tmp, data_prefix, initial, layout)
    dist.barrier()
    return result


def _with_router_replay(tmp, data_prefix, initial, layout):
    """Both trainers replaying the old forward's routing in the training forward, at a learning rate that
    moves the routing: the forward step's steps (the trainer's are in replay.jsonl)."""
    from megatron.training.training import destroy_global_state

    replay = SHARED + layout + ["--train-iters", str(INTERVAL), "--lr", "1e-3", "--moe-router-replay"]
    _run_trainer(replay + ["--data-prefix", data_prefix, "--pretrained-checkpoint", initial,
                           "--metrics-file", os.path.join(tmp, "replay.jsonl")])
    spy = _run_megatron_lm(replay + MEGATRON_LM + ["--data-path", data_prefix, "--load", initial])
    destroy_global_state()
    return spy.steps


def _trainer_weights(path):
    from megatron_psft.config import ParallelLayout
    from megatron_psft.platform import parallel

    parallel.initialize(ParallelLayout(), seed=SEED)
    weights = _our_model_with(path, ParallelLayout())
    parallel.destroy()
    return weights


def _metrics(path):
    with open(path) as f:
        return [record for record in map(json.loads, f) if not any(key.startswith("eval/") for key in record)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("megatron_lm"))
    data_prefix = preprocess_bundled_data(os.path.join(tmp, "data", "chat"), SEQ)
    return tmp, {name: run_distributed(world_size, _scenario, tmp, data_prefix, name, name == "tp1_dp2")
                 for name, (world_size, _) in LAYOUTS.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_six_steps_in_megatron_lm_equal_our_trainer(runs, name):
    tmp, per_layout = runs
    hook = per_layout[name][-1]["steps"]
    trainer = _metrics(os.path.join(tmp, f"{name}.jsonl"))
    assert [record["step"] for record in trainer] == list(range(1, STEPS + 1)) and len(hook) == STEPS
    for step, (got, want) in enumerate(zip(hook, trainer), start=1):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (name, step, key, got[key], want[key])
    # The frozen copy served the rounds' later steps: the policy had moved away from it.
    assert hook[1]["ratio_mean"] != 1.0 and hook[1]["approx_kl"] > 0
    assert hook[3]["approx_kl"] == 0.0 and hook[3]["clip_fraction"] == 0.0  # step 4 begins a round


def test_router_replay_in_megatron_lm_equals_our_trainer(runs):
    tmp, per_layout = runs
    hook, trainer = per_layout["tp1_dp2"][-1]["replay"], _metrics(os.path.join(tmp, "replay.jsonl"))
    assert len(hook) == len(trainer) == INTERVAL
    for step, (got, want) in enumerate(zip(hook, trainer), start=1):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (step, key, got[key], want[key])
    # The later steps of the round ran on the old forward's routing: no top-k choice moved.
    assert [step["routing_flip_fraction"] for step in hook[1:]] == [0.0, 0.0]
    assert [record["routing_flip_fraction"] for record in trainer[1:]] == [0.0, 0.0]
    assert hook[2]["approx_kl"] > 0


def test_checkpoints_move_both_ways_exactly(runs):
    _, per_layout = runs
    for rank in per_layout["tp1_dp2"]:
        assert rank["megatron_lm_loaded_ours"] == []
        assert rank["we_loaded_megatron_lm"] == []
        assert rank["megatron_lm_loaded_our_training_checkpoint"] == []
        assert rank["trainer_took_megatron_lm_weights"] == []
        assert rank["model_told_from_megatron_lm_arguments"]


def _config(**changes):
    """The TransformerConfig fields the forward step's layout check reads."""
    from types import SimpleNamespace

    return SimpleNamespace(**{"pipeline_model_parallel_size": 1, "context_parallel_size": 1,
                              "calculate_per_token_loss": True, "overlap_moe_expert_parallel_comm": False, **changes})


def test_layouts_the_forward_step_cannot_serve_are_refused_in_one_line():
    from megatron_psft.megatron_lm import check_layout

    check_layout(_config())
    for changes, words in (({"pipeline_model_parallel_size": 2}, ("pipeline parallelism", "megatron_psft.train")),
                           ({"context_parallel_size": 2}, ("context parallelism",)),
                           ({"calculate_per_token_loss": False}, ("--calculate-per-token-loss",)),
                           ({"overlap_moe_expert_parallel_comm": True}, ("--overlap-moe-expert-parallel-comm",))):
        with pytest.raises(ValueError) as refused:
            check_layout(_config(**changes))
        assert "\n" not in str(refused.value) and all(word in str(refused.value) for word in words), refused.value


def test_psft_flags_become_the_forward_step_settings():
    import argparse

    import torch

    from megatron_psft.config import ObjectiveConfig, OldPolicyConfig
    from megatron_psft.megatron_lm import add_psft_arguments, forward_step_from_args

    parser = add_psft_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--objective", "psft-ent", "--eps-high", "0.3", "--old-policy-interval", "never",
                              "--no-first-step-reuse", "--moe-router-replay", "--fused-logprobs"])
    # Megatron-LM's own arguments, which pretrain() parses beside these (--fused-logprobs auto reads the shapes)
    vars(args).update(vocab_size=1000, seq_length=4096, micro_batch_size=1, tensor_model_parallel_size=1,
                      params_dtype=torch.bfloat16)
    step = forward_step_from_args(args)
    assert step.objective == ObjectiveConfig("psft-ent", eps_high=0.3)
    assert step.schedule.interval is None and not step.schedule.reuse_first_step
    assert step.settings.replay_routing and step.settings.fused_logprobs and step.settings.vocab_size == 1000
    assert args.moe_enable_routing_replay  # the routers get Megatron-Core's replay hooks
    assert not parser.parse_args([]).moe_enable_routing_replay
    with pytest.raises(ValueError, match="old-policy-micro-batch-size"):
        type(step)(ObjectiveConfig(), OldPolicyConfig(old_policy_micro_batch_size=4), step.settings)


def test_megatron_metrics_keep_what_megatron_reduces_exactly():
    import torch

    from megatron_psft.megatron_lm import megatron_metrics

    metrics = {"loss": torch.tensor([-5.0, 5.0]), "logprob": torch.tensor([-20.0, 5.0]),
               "ratio_max": torch.tensor(1.3), "trained_tokens_total": torch.tensor(5.0)}
    report = megatron_metrics(metrics)
    assert sorted(report) == ["loss", "nll"] and report["nll"].tolist() == [20.0, 5.0]


def test_a_megatron_lm_model_megatron_psft_cannot_build_is_refused():
    import argparse

    from megatron_psft.megatron_lm import hf_config_from_megatron_lm_args

    with pytest.raises(ValueError, match="normalization='LayerNorm'"):
        hf_config_from_megatron_lm_args(argparse.Namespace(normalization="LayerNorm", qk_layernorm=True, swiglu=True))
