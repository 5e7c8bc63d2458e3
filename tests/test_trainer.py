"""The trainer end to end on the bundled data, in one 4-rank launch: layout invariance over 6 steps,
resume equals uninterrupted (and refused with changed settings), the first step of each round with
and without reuse, the fixed reference, every objective against exact relations, router replay."""

import json
import os

import pytest
import torch

from bundled import preprocess_bundled_data
from distributed import run_distributed

SEQ = 96
COMMON = ["--seq-length", str(SEQ), "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-4",
          "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--moe-aux-loss-coeff", "0"]
LAYOUTS = {
    "tp1_dp4": [],
    "tp2_ep2_sp_dp2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "tp2_sp_pp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"],
    "pp2_vpp2_dp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
}
RESUME_LAYOUT = LAYOUTS["tp2_ep2_sp_dp2"]
PACKED_LAYOUTS = ("tp1_dp4", "tp2_ep2_sp_dp2", "pp2_dp2", "pp2_vpp2_dp2")
NO_REUSE_LAYOUTS = ("tp1_dp4", "tp2_ep2_sp_dp2", "pp2_vpp2_dp2")
# Settings a resume must keep (checkpoint.RESUME_INVARIANTS): a changed one is refused, naming it.
CHANGED_ON_RESUME = {"seed": ["--seed", "99"], "old_policy_interval": ["--old-policy-interval", "4"]}


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _is_eval(record):
    return any(key.startswith("eval/") for key in record)


def _metrics(path):
    """The training records of a metrics file."""
    return [record for record in _lines(path) if not _is_eval(record)]


def _evals(path):
    """The evaluation records of a metrics file."""
    return [record for record in _lines(path) if _is_eval(record)]


def _paired(got, want, steps=None):
    """The records of two runs side by side, after checking both logged the same steps (`steps`)."""
    assert [r["step"] for r in got] == [r["step"] for r in want], ([r["step"] for r in got], [r["step"] for r in want])
    if steps is not None:
        assert [r["step"] for r in want] == list(steps)
    return list(zip(got, want))


def _snapshot(root):
    """Every file under `root` with its size, modification time and, for small files, content."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            stat = os.stat(path)
            with open(path, "rb") as f:
                content = f.read() if stat.st_size < 1 << 16 else None
            files[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns, content)
    return files


def _train(argv):
    from megatron_psft.train import Trainer, parse_launch

    trainer = Trainer(parse_launch(argv))
    trainer.run()
    return trainer


def _weights(chunks):
    return {k: v.detach().clone() for chunk in chunks
            for k, v in (chunk.module if hasattr(chunk, "module") else chunk).state_dict().items() if "_extra_state" not in k}


def _scenarios(tmp, data_prefix):
    import torch.distributed as dist

    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config

    base = COMMON + ["--data-prefix", data_prefix]
    init = os.path.join(tmp, "init")
    hf_config = load_hf_config("debug")
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(parallel.ParallelLayout(), seed=3)
    checkpoint.save(init, 0, build_model_chunks(args, transformer_config(args, parallel.ParallelLayout())), hf_config)
    parallel.destroy()
    start = base + ["--pretrained-checkpoint", init]

    for name, layout in LAYOUTS.items():
        _train(start + layout + ["--train-iters", "6", "--old-policy-interval", "4",
                                 "--metrics-file", os.path.join(tmp, f"layout_{name}.jsonl")])
        parallel.destroy()
    for name in NO_REUSE_LAYOUTS:  # the round's first step through the forward-only pass instead
        _train(start + LAYOUTS[name] + ["--train-iters", "6", "--old-policy-interval", "4", "--no-first-step-reuse",
                                        "--metrics-file", os.path.join(tmp, f"no_reuse_{name}.jsonl")])
        parallel.destroy()

    # Packed: the same samples per step, several to a row, at four layouts; and resumed mid-round. Each
    # evaluates a held-out set (here the training data's first batch) at steps 0, 2, 4 and 6.
    packed = start + ["--train-iters", "6", "--old-policy-interval", "4", "--pack-sequences",
                      "--eval-data-prefix", f"held={data_prefix}", "--eval-iters", "1", "--eval-interval", "2"]
    for name in PACKED_LAYOUTS:
        _train(packed + LAYOUTS[name] + ["--metrics-file", os.path.join(tmp, f"packed_{name}.jsonl")])
        parallel.destroy()
    packed_ckpt = os.path.join(tmp, "packed_ckpt")
    for part, extra in (("part1", ["--exit-interval", "3"]), ("part2", ["--load", packed_ckpt])):
        _train(packed + RESUME_LAYOUT + ["--save", packed_ckpt, *extra,
                                         "--metrics-file", os.path.join(tmp, f"packed_{part}.jsonl")])
        parallel.destroy()

    resume = start + RESUME_LAYOUT + ["--train-iters", "8", "--old-policy-interval", "3"]
    _train(resume + ["--metrics-file", os.path.join(tmp, "straight.jsonl")]); parallel.destroy()
    ckpt = os.path.join(tmp, "resume_ckpt")
    _train(resume + ["--save", ckpt, "--exit-interval", "4", "--metrics-file", os.path.join(tmp, "part1.jsonl")])
    parallel.destroy()
    _train(resume + ["--save", ckpt, "--load", ckpt, "--metrics-file", os.path.join(tmp, "part2.jsonl")])
    parallel.destroy()
    # A resume with a changed invariant is refused before anything is written: were it not, it
    # would train steps 9-10 (the schedule follows the longer run) and save iteration 10 over the
    # checkpoint and the metrics.
    refusals = {}
    for key, flag in CHANGED_ON_RESUME.items():
        dist.barrier()  # every rank is done writing
        before = _snapshot(tmp) if dist.get_rank() == 0 else None
        try:
            _train(resume + ["--train-iters", "10", "--override-opt-param-scheduler", "--save", ckpt, "--load", ckpt,
                             "--metrics-file", os.path.join(tmp, "part2.jsonl")] + flag)
            error = None
        except (Exception, SystemExit) as raised:  # reported, with its type, to the test
            error = (type(raised).__name__, str(raised))
        parallel.destroy()
        dist.barrier()
        refusals[key] = dict(error=error, unchanged=_snapshot(tmp) == before if dist.get_rank() == 0 else None)

    # Fixed reference: the frozen old policy must stay the starting weights while the model moves.
    trainer = _train(start + ["--train-iters", "3", "--old-policy-interval", "never",
                              "--metrics-file", os.path.join(tmp, "never.jsonl")])
    frozen, trained = _weights(trainer.frozen), _weights(trainer.model)
    initial_chunks = build_model_chunks(args, transformer_config(args, trainer.launch.layout))
    checkpoint.load_model(init, initial_chunks)
    initial = _weights(initial_chunks)
    never = {"frozen_is_initial": all(torch.equal(frozen[k], initial[k]) for k in initial),
             "trained_moved": any(not torch.equal(trained[k], initial[k]) for k in initial)}
    parallel.destroy()

    # Baselines, from the same start as layout_tp1_dp4 (PSFT, whose first two steps share one round).
    for name, extra in (("sft", []), ("sft-kl", []), ("dft", []), ("psft-ent", []),
                        ("psft-ent-all", ["--entropy-top-fraction", "1.0"])):
        _train(start + ["--train-iters", "2", "--objective", name.removesuffix("-all")] + extra
               + ["--metrics-file", os.path.join(tmp, f"objective_{name}.jsonl")])
        parallel.destroy()
    for name, extra in (("flips", ["--moe-routing-flip-stats"]), ("replay", ["--moe-router-replay"]),
                        ("replay_lr0", ["--moe-router-replay", "--lr", "0"]),
                        ("replay_lr0_packed", ["--moe-router-replay", "--lr", "0", "--pack-sequences"])):
        _train(start + LAYOUTS["tp2_ep2_sp_dp2"] + [
            "--train-iters", "3", "--old-policy-interval", "3", "--no-first-step-reuse", "--lr", "1e-3", *extra,
            "--metrics-file", os.path.join(tmp, f"routing_{name}.jsonl")])
        parallel.destroy()
    _train(start + ["--train-iters", "4", "--sft-warmup-steps", "2", "--sft-warmup-lr", "1e-3",
                    "--old-policy-interval", "2", "--metrics-file", os.path.join(tmp, "warmup.jsonl")])
    parallel.destroy()
    return dict(never=never, refusals=refusals)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("trainer"))
    data_prefix = preprocess_bundled_data(os.path.join(tmp, "data", "chat"), SEQ)
    per_rank = run_distributed(4, _scenarios, tmp, data_prefix)
    return tmp, per_rank


def test_six_steps_agree_across_layouts(run):
    tmp, _ = run
    reference = _metrics(os.path.join(tmp, "layout_tp1_dp4.jsonl"))
    for name in LAYOUTS:
        records = _metrics(os.path.join(tmp, f"layout_{name}.jsonl"))
        for got, want in _paired(records, reference, steps=range(1, 7)):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6), (name, got["step"])
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (name, got["step"])
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-4), (name, got["step"])
    # Training moved the policy: later steps of a round see ratios away from 1.
    assert reference[2]["ratio_max"] > 1.0 and reference[2]["approx_kl"] > 0


def test_packed_steps_equal_padded_steps_at_every_layout(run):
    """Packing changes the rows, not the math: the same samples per step, each attending only to itself,
    give the padded run's loss, gradient norm and entropy (the aux loss, whose statistics follow the
    micro-batches, is off here)."""
    tmp, _ = run
    padded = _metrics(os.path.join(tmp, "layout_tp1_dp4.jsonl"))
    for name in PACKED_LAYOUTS:
        packed = _metrics(os.path.join(tmp, f"packed_{name}.jsonl"))
        for got, want in _paired(packed, padded, steps=range(1, 7)):
            for key in ("loss", "grad_norm", "entropy", "trained_tokens_total"):
                assert got[key] == pytest.approx(want[key], rel=1e-4), (name, got["step"], key)


def _resumed_equals_straight(tmp, straight_name, part_names, steps):
    """The records of a run resumed from its checkpoint (`part_names`, in order) against the uninterrupted one."""
    straight = _metrics(os.path.join(tmp, f"{straight_name}.jsonl"))
    resumed = [record for name in part_names for record in _metrics(os.path.join(tmp, f"{name}.jsonl"))]
    for got, want in _paired(resumed, straight, steps=steps):
        for key in ("loss", "grad_norm", "ratio_mean", "clip_fraction", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-6), (key, got["step"], got[key], want[key])
    return resumed


def test_packed_resume_mid_round_equals_uninterrupted(run):
    tmp, _ = run
    resumed = _resumed_equals_straight(tmp, "packed_tp2_ep2_sp_dp2", ("packed_part1", "packed_part2"), range(1, 7))
    assert resumed[3]["old_policy_s"] == 0.0 and resumed[3]["ratio_min"] != 1.0  # step 4: old log-probs from the checkpoint
    evals = _evals(os.path.join(tmp, "packed_part1.jsonl")) + _evals(os.path.join(tmp, "packed_part2.jsonl"))
    for got, want in zip(evals, _evals(os.path.join(tmp, "packed_tp2_ep2_sp_dp2.jsonl")), strict=True):
        assert got == pytest.approx(want, rel=0, abs=1e-9)


def test_evaluation_at_step_zero_every_interval_and_the_end_agrees_across_layouts(run):
    tmp, _ = run
    reference = _evals(os.path.join(tmp, "packed_tp1_dp4.jsonl"))
    assert [record["step"] for record in reference] == [0, 2, 4, 6]
    assert reference[0]["eval/held/tokens"] > 0 and reference[-1]["eval/held/nll"] < reference[0]["eval/held/nll"]
    for name in PACKED_LAYOUTS:
        for got, want in zip(_evals(os.path.join(tmp, f"packed_{name}.jsonl")), reference, strict=True):
            assert got == pytest.approx(want, rel=1e-5), name


def test_first_step_of_each_round_has_ratio_exactly_one(run):
    tmp, _ = run
    for name in LAYOUTS:
        records = _metrics(os.path.join(tmp, f"layout_{name}.jsonl"))
        assert [r["step"] for r in records] == list(range(1, 7))
        for record in records:
            if record["step"] in (1, 5):  # interval 4: rounds start at steps 1 and 5
                assert record["clip_fraction"] == 0.0 and record["ratio_min"] == 1.0 == record["ratio_max"], record
                assert record["loss"] == -1.0, record  # -min(r, clip(r)) at r = 1, token for token
                assert record["old_policy_s"] > 0  # the pass over the rest of the round ran here
            else:
                assert record["old_policy_s"] == 0.0


@pytest.mark.parametrize("name", NO_REUSE_LAYOUTS)
def test_first_step_reuse_equals_recomputing_the_old_logprobs(run, name):
    """Reuse gives ratio 1 by construction; recomputing the round's first step in the forward-only
    pass must give the same old log-probs bit for bit (CPU fp32, same micro-batch shapes), so the
    two runs agree exactly at every step, and the recomputed ratio is exactly 1 too."""
    tmp, _ = run
    reused = _metrics(os.path.join(tmp, f"layout_{name}.jsonl"))
    recomputed = _metrics(os.path.join(tmp, f"no_reuse_{name}.jsonl"))
    for got, want in _paired(recomputed, reused, steps=range(1, 7)):
        for key in ("loss", "grad_norm", "entropy", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction"):
            assert got[key] == want[key], (name, got["step"], key, got[key], want[key])
        if got["step"] in (1, 5):
            assert got["ratio_min"] == 1.0 == got["ratio_max"] and got["approx_kl"] == 0.0, got
    assert recomputed[1]["ratio_max"] > 1.0  # not a run that never moved


def test_resume_equals_uninterrupted(run):
    tmp, _ = run
    resumed = _resumed_equals_straight(tmp, "straight", ("part1", "part2"), range(1, 9))
    # Step 5 is mid-round (rounds of 3 start at steps 1, 4, 7): its old log-probs came from the checkpoint.
    assert resumed[4]["old_policy_s"] == 0.0 and resumed[4]["ratio_min"] != 1.0


@pytest.mark.parametrize("key", CHANGED_ON_RESUME)
def test_resume_with_changed_settings_is_refused_and_writes_nothing(run, key):
    _, per_rank = run
    for rank, result in enumerate(per_rank):
        refusal = result["refusals"][key]
        assert refusal["error"] is not None, f"rank {rank}: a resume with a changed {key} trained on"
        kind, message = refusal["error"]
        assert kind == "ValueError" and key in message and "resum" in message, (rank, kind, message)
    assert per_rank[0]["refusals"][key]["unchanged"], "the refused resume changed files (checkpoint or metrics)"


def test_fixed_reference_stays_the_initial_model(run):
    tmp, per_rank = run
    never = [result["never"] for result in per_rank]
    assert all(r["frozen_is_initial"] and r["trained_moved"] for r in never), never
    records = _metrics(os.path.join(tmp, "never.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["ratio_max"] == 1.0 and records[2]["approx_kl"] > records[1]["approx_kl"] > 0


def _objective(tmp, name):
    records = _metrics(os.path.join(tmp, f"objective_{name}.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert [r["phase"] for r in records] == [name.removesuffix("-all")] * 2
    assert all(r["grad_norm"] > 0 and r["entropy"] > 0 for r in records)
    return records


def test_sft_is_the_negative_log_likelihood_and_psft_at_ratio_one_has_its_gradient(run):
    tmp, _ = run
    sft, psft = _objective(tmp, "sft"), _metrics(os.path.join(tmp, "layout_tp1_dp4.jsonl"))[:2]
    assert all(r["loss"] == -r["logprob"] for r in sft)
    # Step 1: same weights, so the same forward; PSFT at r = 1 has SFT's gradient (r * grad logp).
    assert sft[0]["logprob"] == psft[0]["logprob"] and sft[0]["entropy"] == psft[0]["entropy"]
    assert sft[0]["grad_norm"] == pytest.approx(psft[0]["grad_norm"], rel=1e-6)
    # ... hence the same update: step 2 starts from the same weights.
    assert sft[1]["logprob"] == pytest.approx(psft[1]["logprob"], rel=1e-6)
    assert sft[1]["logprob"] > sft[0]["logprob"]  # and the data got more likely


def test_sft_kl_is_sft_plus_the_weighted_kl_to_the_frozen_reference(run):
    tmp, _ = run
    sft, sft_kl = _objective(tmp, "sft"), _objective(tmp, "sft-kl")
    # Step 1: the policy is the reference: KL 0 with zero gradient, so exactly SFT.
    assert sft_kl[0]["reference_kl"] == 0.0
    for key in ("loss", "grad_norm", "logprob"):
        assert sft_kl[0][key] == sft[0][key], key
    # Step 2: same weights as SFT's step 2; the loss adds kl_coef (0.5) x the reference KL.
    assert sft_kl[1]["logprob"] == sft[1]["logprob"] and sft_kl[1]["reference_kl"] > 0
    assert sft_kl[1]["loss"] == pytest.approx(-sft_kl[1]["logprob"] + 0.5 * sft_kl[1]["reference_kl"], rel=1e-6)


def test_dft_weights_each_token_by_its_probability(run):
    tmp, _ = run
    sft, dft = _objective(tmp, "sft"), _objective(tmp, "dft")
    assert dft[0]["logprob"] == sft[0]["logprob"] and dft[0]["entropy"] == sft[0]["entropy"]
    # -p log p per token: positive, at most 1/e, and below the NLL -log p.
    assert all(0 < r["loss"] < min(-r["logprob"], 1 / 2.718281828) for r in dft)
    assert dft[0]["grad_norm"] != pytest.approx(sft[0]["grad_norm"], rel=1e-3)


def test_psft_ent_trains_the_highest_entropy_fraction(run):
    tmp, _ = run
    psft = _metrics(os.path.join(tmp, "layout_tp1_dp4.jsonl"))[:2]
    ent, everything = _objective(tmp, "psft-ent"), _objective(tmp, "psft-ent-all")
    assert ent[0]["loss"] == -1.0 and ent[0]["ratio_min"] == 1.0 == ent[0]["ratio_max"]
    assert ent[0]["entropy"] == psft[0]["entropy"]  # over every response token, not just the selected
    for record, full in _paired(ent, psft):
        assert record["selected_fraction"] == pytest.approx(0.2, abs=0.02)
        # the selected share of the step's response tokens (PSFT trains them all) is what trains
        selected = record["selected_fraction"] * full["trained_tokens_total"]
        assert record["trained_tokens_total"] == pytest.approx(selected)
    assert ent[0]["grad_norm"] != pytest.approx(psft[0]["grad_norm"], rel=1e-3)
    # Selecting every token is PSFT itself.
    for got, want in _paired(everything, psft):
        assert got["selected_fraction"] == 1.0
        for key in ("loss", "grad_norm", "entropy", "ratio_mean", "trained_tokens_total"):
            assert got[key] == want[key], (got["step"], key)


def test_sft_warm_up_then_psft_rounds(run):
    tmp, _ = run
    records = _metrics(os.path.join(tmp, "warmup.jsonl"))
    assert [r["phase"] for r in records] == ["sft-warmup", "sft-warmup", "psft", "psft"]
    assert records[0]["learning_rate"] == pytest.approx(1e-3) and records[2]["learning_rate"] == pytest.approx(1e-4)
    assert records[2]["ratio_min"] == 1.0 == records[2]["ratio_max"]
    assert records[0]["loss"] == -records[0]["logprob"]


def test_routing_flips_are_measured_and_replay_imposes_the_old_routing(run):
    tmp, _ = run
    flips = _metrics(os.path.join(tmp, "routing_flips.jsonl"))
    replay = _metrics(os.path.join(tmp, "routing_replay.jsonl"))
    pairs = _paired(replay, flips, steps=[1, 2, 3])
    # Step 1 without reuse: the old-policy pass and the training pass see identical weights and
    # micro-batch shapes; on CPU in fp32 both routing and log-probs agree bit for bit.
    assert flips[0]["routing_flip_fraction"] == 0.0 and flips[0]["ratio_min"] == 1.0 == flips[0]["ratio_max"]
    assert flips[1]["routing_flip_fraction"] > 0 and flips[2]["routing_flip_fraction"] > 0
    # Replay: the training pass routed every token exactly as the old-policy pass recorded.
    assert [r["routing_flip_fraction"] for r in replay] == [0.0, 0.0, 0.0]
    for key in ("loss", "grad_norm", "entropy"):  # step 1 routes identically either way
        assert pairs[0][0][key] == pairs[0][1][key], key
    # Step 2, same weights: the imposed routing changed the policy's log-probs and ratios.
    assert replay[1]["entropy"] != flips[1]["entropy"] and replay[1]["ratio_mean"] != flips[1]["ratio_mean"]


def test_replay_without_weight_change_gives_ratio_one_everywhere(run):
    """lr 0: the weights never move, so the replayed training pass reproduces the old policy's
    log-probs exactly at every step of the round, not just at its first."""
    tmp, _ = run
    for name in ("routing_replay_lr0", "routing_replay_lr0_packed"):
        _replayed_exactly(_metrics(os.path.join(tmp, f"{name}.jsonl")))


def _replayed_exactly(records):
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["learning_rate"] == 0.0 and record["routing_flip_fraction"] == 0.0, record
        assert record["ratio_min"] == 1.0 == record["ratio_max"] and record["clip_fraction"] == 0.0, record
        assert record["loss"] == -1.0 and record["approx_kl"] == 0.0, record
