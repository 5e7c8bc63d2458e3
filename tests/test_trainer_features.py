"""Trainer features and error paths, each against an oracle: a feature that must not change the math
(non-distributed optimizer, overlapped gradient reduction, the allgather dispatcher, recompute)
reproduces the default run; bf16 stays close to fp32; the aux loss changes the gradient, not the
forward; dense and tied-embedding models train, agree across layouts and resume exactly; a
non-finite gradient stops the run before the optimizer moves; a resume at another world size is
refused. One 4-rank launch, between two short 2-rank ones for the world-size checks."""

import hashlib
import json
import math
import os

import megatron.core as megatron_core
import pytest
import torch

from bundled import preprocess_bundled_data
from distributed import run_distributed
from test_trainer import COMMON, SEQ, _metrics, _paired, _snapshot, _train, _weights

STEPS = 3  # rounds of 2: steps 1 and 3 start a round, step 2 uses the old policy's log-probs
FEATURE_LAYOUTS = {
    "ep2_dp4": ["--expert-model-parallel-size", "2"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "pp2_vpp2_dp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
    "tp2_sp_pp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"],
}
# name: (layout of the default run it must reproduce, extra flags)
SAME_MATH = {
    "no_distributed_optimizer": ("ep2_dp4", ["--no-distributed-optimizer"]),
    "overlap_grad_reduce": ("ep2_dp4", ["--overlap-grad-reduce"]),
    "allgather_dispatcher": ("ep2_dp4", ["--moe-token-dispatcher-type", "allgather"]),
    "recompute_full": ("ep2_dp4", ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                   "--recompute-num-layers", "1"]),
    "recompute_selective": ("ep2_dp4", ["--recompute-granularity", "selective",
                                        "--recompute-modules", "core_attn", "moe"]),
    "overlap_grad_reduce_pp2": ("pp2_dp2", ["--overlap-grad-reduce"]),
    "overlap_grad_reduce_pp2_vpp2": ("pp2_vpp2_dp2", ["--overlap-grad-reduce"]),
    # The old-policy pass in micro-batches of 4 rows (training's 2 rows each, regrouped), through the pipeline.
    "old_policy_micro_batch_size": ("pp2_dp2", ["--old-policy-micro-batch-size", "4"]),
    # Log-probs from the hidden states and the output weight, logits never materialised, under TP + SP and PP.
    "fused_logprobs": ("tp2_sp_pp2", ["--fused-logprobs"]),
}
OTHER_MATH = {"bf16": ("ep2_dp4", ["--params-dtype", "bf16"]),
              "aux_loss": ("ep2_dp4", ["--moe-aux-loss-coeff", "0.01"]),
              # Twice the padding per row: Megatron's padding mask keeps it out of the load-balancing loss.
              "aux_loss_more_padding": ("ep2_dp4", ["--moe-aux-loss-coeff", "0.01", "--seq-length", str(2 * SEQ)]),
              # Later pipeline stages under sequence parallelism get the padding mask split as their hidden states.
              "aux_loss_tp2_sp_pp2": ("tp2_sp_pp2", ["--moe-aux-loss-coeff", "0.01"])}
WORLD_SIZE_ARGS = ["--train-iters", "3", "--old-policy-interval", "2"]


def _hf_configs(tmp):
    """The debug MoE config with tied embeddings, and a dense Qwen3 of the same shape, as config.json files."""
    from megatron_psft.models.qwen3_moe import load_hf_config

    debug = load_hf_config("debug")
    tied = dict(debug, tie_word_embeddings=True)
    dense = {k: v for k, v in debug.items() if k not in (
        "moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
        "decoder_sparse_step", "mlp_only_layers", "output_router_logits")}
    dense.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    paths = {}
    for name, config in (("tied", tied), ("dense", dense)):
        paths[name] = os.path.join(tmp, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(config, f, indent=2)
    return paths


def _save_initial(path, hf_config):
    """A checkpoint of freshly initialised weights, so runs at different layouts start alike."""
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config

    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(parallel.ParallelLayout(), seed=3)
    checkpoint.save(path, 0, build_model_chunks(args, transformer_config(args, parallel.ParallelLayout())), hf_config)
    parallel.destroy()


def _attempt(argv):
    """Train with `argv`; (exception type name, message), or None when it trained."""
    from megatron_psft.platform import parallel

    try:
        _train(argv)
        error = None
    except (Exception, SystemExit) as raised:
        error = (type(raised).__name__, str(raised))
    parallel.destroy()
    return error


def _resume_at_another_world_size(tmp, data_prefix, saved_at):
    """Resume the checkpoint saved with `saved_at` processes; reports the error, if any, and whether the
    checkpoint root is unchanged."""
    import torch.distributed as dist

    ckpt = os.path.join(tmp, f"world{saved_at}")
    dist.barrier()
    before = _snapshot(ckpt) if dist.get_rank() == 0 else None
    error = _attempt(COMMON + ["--data-prefix", data_prefix] + WORLD_SIZE_ARGS + ["--load", ckpt, "--save", ckpt])
    dist.barrier()
    return dict(error=error, unchanged=_snapshot(ckpt) == before if dist.get_rank() == 0 else None)


def _save_for_another_world_size(tmp, data_prefix):
    """One step, saved as world{N} (N processes), mid-round: its old-policy state is in the checkpoint."""
    import torch.distributed as dist

    from megatron_psft.platform import parallel

    ckpt = os.path.join(tmp, f"world{dist.get_world_size()}")
    _train(COMMON + ["--data-prefix", data_prefix] + WORLD_SIZE_ARGS + ["--save", ckpt, "--exit-interval", "1"])
    parallel.destroy()


def _resume_the_four_rank_checkpoint(tmp, data_prefix):
    return _resume_at_another_world_size(tmp, data_prefix, saved_at=4)


def _non_finite_gradient(start, tmp, name, value):
    """One step whose gradient of one tensor is `value`: it must raise before the optimizer moves,
    and nothing is saved or logged. (Megatron's DDP checks each rank's own gradients before the
    reduction and raises there; a rank whose gradients are finite would wait in the reduction, as
    in a real job until the launcher stops it, so every rank gets the bad value here.)"""
    import torch.distributed as dist

    from megatron_psft.platform import parallel
    from megatron_psft.engine.optimizer import unwrap
    from megatron_psft.train import Trainer, parse_launch

    save = os.path.join(tmp, name)
    trainer = Trainer(parse_launch(start + ["--train-iters", "2", "--save", save]))
    before = _weights(trainer.model)
    param = dict(unwrap(trainer.model[0]).named_parameters())["decoder.layers.1.self_attention.linear_qkv.weight"]
    param.register_hook(lambda grad: torch.full_like(grad, value))
    try:
        trainer.run()
        error = None
    except (Exception, SystemExit) as raised:
        error = (type(raised).__name__, str(raised))
    after = _weights(trainer.model)
    parallel.destroy()
    dist.barrier()
    return dict(error=error, weights_kept=all(torch.equal(before[k], after[k]) for k in before),
                files=sorted(os.listdir(save)) if os.path.isdir(save) else [])


def _tied_weights(trainer):
    """A digest of the embedding (first stage) or of the output layer's copy of it (last stage)."""
    from megatron_psft.engine.optimizer import unwrap

    found = {}
    for chunk in trainer.model:
        model = unwrap(chunk)
        if model.pre_process or model.post_process:
            weight = model.shared_embedding_or_output_weight().detach().cpu().numpy()
            found["first" if model.pre_process else "last"] = hashlib.sha256(weight.tobytes()).hexdigest()
    return found


def _features(tmp, data_prefix, configs):
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import load_hf_config

    results = {}
    for name, hf_config in (("moe", load_hf_config("debug")), ("tied", load_hf_config(configs["tied"]))):
        _save_initial(os.path.join(tmp, f"init_{name}"), hf_config)
    base = COMMON + ["--data-prefix", data_prefix]
    start = base + ["--pretrained-checkpoint", os.path.join(tmp, "init_moe")]
    steps = ["--train-iters", str(STEPS), "--old-policy-interval", "2"]

    def metrics(name):
        return ["--metrics-file", os.path.join(tmp, f"{name}.jsonl")]

    # Features: each run's effective settings come back too, so a flag that is silently dropped shows.
    settings = {}
    for name, layout in FEATURE_LAYOUTS.items():
        _train(start + layout + steps + metrics(f"default_{name}"))
        parallel.destroy()
    for name, (layout, extra) in {**SAME_MATH, **OTHER_MATH}.items():
        trainer = _train(start + FEATURE_LAYOUTS[layout] + steps + extra + metrics(name))
        config, ddp = trainer.transformer_config, trainer.model[0].ddp_config
        settings[name] = dict(
            distributed_optimizer=ddp.use_distributed_optimizer, overlap_grad_reduce=ddp.overlap_grad_reduce,
            dispatcher=config.moe_token_dispatcher_type, recompute=config.recompute_granularity,
            params_dtype=str(config.params_dtype), aux_loss_coeff=config.moe_aux_loss_coeff,
            old_policy_micro_batch_size=trainer.config.old_policy.old_policy_micro_batch_size,
            fused_logprobs=trainer.config.model.fused_logprobs)
        parallel.destroy()
    results["settings"] = settings

    # Tied embeddings: the same run at PP2 (embedding and output layer on different stages, their
    # gradients summed over the embedding group) and TP1; at PP2 also interrupted and resumed.
    tied = base + ["--pretrained-checkpoint", os.path.join(tmp, "init_tied"), "--train-iters", "4",
                   "--old-policy-interval", "2"]
    pp2 = FEATURE_LAYOUTS["pp2_dp2"]
    results["tied"] = _tied_weights(_train(tied + pp2 + metrics("tied_pp2")))
    parallel.destroy()
    _train(tied + metrics("tied_tp1"))
    parallel.destroy()
    tied_ckpt = os.path.join(tmp, "tied_ckpt")
    for part, extra in (("part1", ["--exit-interval", "2"]), ("part2", ["--load", tied_ckpt])):
        _train(tied + pp2 + ["--save", tied_ckpt] + extra + metrics(f"tied_pp2_{part}"))
        parallel.destroy()

    # Dense Qwen3 (no experts) from --hf-config, at TP2 with sequence parallelism: straight and resumed.
    dense = base + ["--hf-config", configs["dense"], "--train-iters", "4", "--old-policy-interval", "2",
                    "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    trainer = _train(dense + metrics("dense"))
    results["dense_is_moe"] = trainer.model_args.is_moe
    parallel.destroy()
    dense_ckpt = os.path.join(tmp, "dense_ckpt")
    for part, extra in (("part1", ["--exit-interval", "2"]), ("part2", ["--load", dense_ckpt])):
        _train(dense + ["--save", dense_ckpt] + extra + metrics(f"dense_{part}"))
        parallel.destroy()

    # World size: resume the 2-rank checkpoint here; save one for the 2-rank launch that follows.
    results["world_size"] = _resume_at_another_world_size(tmp, data_prefix, saved_at=2)
    _save_for_another_world_size(tmp, data_prefix)

    # Non-finite gradients, last.
    results["inf"] = _non_finite_gradient(start, tmp, "inf_run", math.inf)
    results["nan"] = _non_finite_gradient(start, tmp, "nan_run", math.nan)
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("features"))
    data_prefix = preprocess_bundled_data(os.path.join(tmp, "data", "chat"), SEQ)
    run_distributed(2, _save_for_another_world_size, tmp, data_prefix)
    per_rank = run_distributed(4, _features, tmp, data_prefix, _hf_configs(tmp))
    two_ranks = run_distributed(2, _resume_the_four_rank_checkpoint, tmp, data_prefix)
    return tmp, per_rank, two_ranks


def _records(tmp, name, steps=STEPS):
    records = _metrics(os.path.join(tmp, f"{name}.jsonl"))
    assert [r["step"] for r in records] == list(range(1, steps + 1)), name
    for record in records:
        assert all(math.isfinite(record[key]) for key in ("loss", "grad_norm", "entropy", "logprob")), record
    return records


EXPECTED_SETTINGS = {
    "no_distributed_optimizer": dict(distributed_optimizer=False),
    "overlap_grad_reduce": dict(overlap_grad_reduce=True),
    "allgather_dispatcher": dict(dispatcher="allgather"),
    "recompute_full": dict(recompute="full"),
    "recompute_selective": dict(recompute="selective"),
    "overlap_grad_reduce_pp2": dict(overlap_grad_reduce=True),
    "overlap_grad_reduce_pp2_vpp2": dict(overlap_grad_reduce=True),
    "bf16": dict(params_dtype="torch.bfloat16"),
    "aux_loss": dict(aux_loss_coeff=0.01),
    "old_policy_micro_batch_size": dict(old_policy_micro_batch_size=4),
    "fused_logprobs": dict(fused_logprobs=True),
}


@pytest.mark.parametrize("name", SAME_MATH)
def test_feature_reproduces_the_default_run(run, name):
    tmp, per_rank, _ = run
    settings = per_rank[0]["settings"][name]
    assert {key: settings[key] for key in EXPECTED_SETTINGS[name]} == EXPECTED_SETTINGS[name], settings
    layout, _ = SAME_MATH[name]
    for got, want in _paired(_records(tmp, name), _records(tmp, f"default_{layout}")):
        for key in ("loss", "grad_norm", "entropy", "ratio_mean", "clip_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (name, got["step"], key)
    assert _records(tmp, name)[1]["ratio_max"] > 1.0  # the policy moved between the passes


def test_bf16_is_close_to_fp32_and_finite(run):
    tmp, per_rank, _ = run
    assert per_rank[0]["settings"]["bf16"]["params_dtype"] == "torch.bfloat16"
    pairs = _paired(_records(tmp, "bf16"), _records(tmp, "default_ep2_dp4"))
    for got, want in pairs:
        for key in ("loss", "grad_norm", "entropy", "logprob"):
            assert got[key] == pytest.approx(want[key], rel=2e-2), (got["step"], key, got[key], want[key])
    assert any(got["grad_norm"] != want["grad_norm"] for got, want in pairs)  # bf16 did round


def test_aux_loss_reaches_the_gradient_and_the_load_balance_metrics(run):
    tmp, per_rank, _ = run
    assert per_rank[0]["settings"]["aux_loss"]["aux_loss_coeff"] == 0.01
    with_aux, without = _records(tmp, "aux_loss"), _records(tmp, "default_ep2_dp4")
    pairs = _paired(with_aux, without)
    # Step 1: same weights, so the same forward and objective; the aux loss adds to the gradient only.
    assert with_aux[0]["logprob"] == without[0]["logprob"] and with_aux[0]["entropy"] == without[0]["entropy"]
    assert with_aux[0]["grad_norm"] != pytest.approx(without[0]["grad_norm"], rel=1e-4)
    assert with_aux[1]["logprob"] != without[1]["logprob"]  # and so to the update
    for got, want in pairs:
        assert "moe_load_balance_mean" not in want
        # Megatron's load-balancing loss: 1 for a uniform router, more when tokens crowd experts.
        assert 0.9 < got["moe_load_balance_mean"] <= got["moe_load_balance_max"] < 8, got


def _same_aux_loss_run(tmp, name):
    for got, want in _paired(_records(tmp, name), _records(tmp, "aux_loss")):
        for key in ("loss", "grad_norm", "moe_load_balance_mean", "moe_load_balance_max"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (name, got["step"], key, got[key], want[key])


def test_load_balancing_loss_is_over_real_tokens_whatever_the_padding(run):
    """Padding takes no part in the aux loss: twice the padding per row changes neither the
    load-balancing loss nor the gradient it adds. (Counted, it would scale with padded/real tokens.)"""
    tmp, _, _ = run
    _same_aux_loss_run(tmp, "aux_loss_more_padding")


@pytest.mark.xfail(megatron_core.__version__.startswith("0.19."), strict=True,
                   reason="megatron-core 0.19.2 scales the padding-masked aux loss by each sequence-parallel "
                          "shard's own real-token count: under TP2+SP the aux gradient differs from TP1's (grad "
                          "norm 4.153 vs 4.106 at step 1); unmasked, the layouts agree")
def test_load_balancing_loss_with_padding_is_the_same_under_sequence_parallelism(run):
    """Later pipeline stages under sequence parallelism get the padding mask split like their hidden
    states; the load-balancing loss and its gradient are those of the TP1 layout."""
    tmp, _, _ = run
    _same_aux_loss_run(tmp, "aux_loss_tp2_sp_pp2")


def test_tied_embeddings_train_agree_across_layouts_and_stay_tied(run):
    tmp, per_rank, _ = run
    pp2, tp1 = _records(tmp, "tied_pp2", 4), _records(tmp, "tied_tp1", 4)
    for got, want in _paired(pp2, tp1):
        for key in ("loss", "grad_norm", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)
    assert pp2[1]["ratio_max"] > 1.0 and pp2[3]["logprob"] > pp2[0]["logprob"]
    # At PP2 the first stage holds the embedding, the last its copy as output layer: still equal.
    firsts = [r["tied"]["first"] for r in per_rank if "first" in r["tied"]]
    lasts = [r["tied"]["last"] for r in per_rank if "last" in r["tied"]]
    assert len(firsts) == len(lasts) == 2
    assert set(firsts + lasts) == {firsts[0]}, (firsts, lasts)  # bit for bit


@pytest.mark.parametrize("model", ["tied_pp2", "dense"])
def test_tied_and_dense_models_resume_exactly(run, model):
    tmp, per_rank, _ = run
    straight = _records(tmp, model, 4)
    resumed = _metrics(os.path.join(tmp, f"{model}_part1.jsonl")) + _metrics(os.path.join(tmp, f"{model}_part2.jsonl"))
    for got, want in _paired(resumed, straight, steps=range(1, 5)):
        for key in ("loss", "grad_norm", "entropy", "ratio_mean"):
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-6), (model, got["step"], key)
    if model == "dense":
        assert per_rank[0]["dense_is_moe"] is False
        assert straight[1]["ratio_max"] > 1.0 and straight[3]["logprob"] > straight[0]["logprob"]


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_gradient_stops_before_the_optimizer_moves(run, value):
    _, per_rank, _ = run
    for rank, result in enumerate(per_rank):
        outcome = result[value]
        assert outcome["error"] is not None, f"rank {rank}: a {value} gradient trained on"
        kind, message = outcome["error"]
        expected = f"found {dict(inf='Inf', nan='NaN')[value]} in local grad norm"  # Megatron's DDP check
        assert kind == "RuntimeError" and expected in message, (rank, kind, message)
        assert outcome["weights_kept"], f"rank {rank}: the weights moved"
        assert not [f for f in outcome["files"] if f.startswith(("iter_", "latest"))], outcome["files"]
    metrics = os.path.join(run[0], f"{value}_run", "metrics.jsonl")  # the default --metrics-file
    assert not os.path.exists(metrics) or os.path.getsize(metrics) == 0, "the failed step was logged"


def _check_world_size_reshard(per_rank, saved, now):
    """A checkpoint saved mid-round by `saved` processes resumes on `now` with its optimizer state (the
    per-rank state rebuilt) and saves its last step; tests/test_reshard.py checks the numbers."""
    for rank, outcome in enumerate(per_rank):
        assert outcome["error"] is None, (rank, saved, now, outcome["error"])
    assert not per_rank[0]["unchanged"], "the resumed run saved nothing"


def test_resume_on_more_processes_reshards(run):
    _, per_rank, _ = run
    _check_world_size_reshard([result["world_size"] for result in per_rank], saved=2, now=4)


def test_resume_on_fewer_processes_reshards(run):
    _, _, two_ranks = run
    _check_world_size_reshard(two_ranks, saved=4, now=2)
