"""Evaluation sets (megatron_psft/engine/evaluation.py) against a float64 oracle, at six layouts, and
training unchanged by them; the logger's eval records across a resume.

The oracle is tests/oracle_qwen3.py's float64 transformers forward of the converted weights, run on
each sample alone (no padding, no batching): per set, the sum over response tokens of -log p and of
the full-vocabulary entropy, and their count. The sets are synthetic preprocessed data: samples of
mixed lengths (full rows and short ones), one without any response token, and a set with none at
all; the batch size makes the last batch of each set short, so some data-parallel ranks evaluate
padding only. One 4-rank launch runs every layout.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import oracle_qwen3 as oracle
from distributed import run_distributed

SEQ, GLOBAL_BATCH, EVAL_ITERS = 16, 4, 2
# name: number of samples (10 and 7: short last batches of 2 and 3); "untrained" has no response token.
SETS = {"chat": 10, "code": 7, "untrained": 2}
UNTRAINED_SAMPLE = 3  # of "chat": a sample without a response token
LAYOUTS = {
    # name: (layout kwargs, micro-batch size)
    "tp1_dp4": (dict(), 1),
    "tp2_sp_dp2": (dict(tensor=2, sequence_parallel=True), 2),
    "tp2_ep2_sp_dp2": (dict(tensor=2, expert=2, sequence_parallel=True), 1),
    "pp2_dp2": (dict(pipeline=2), 1),
    "pp2_vpp2_dp2": (dict(pipeline=2, virtual_pipeline=2), 1),
    "tp2_sp_ep4_etp1": (dict(tensor=2, expert=4, expert_tensor=1, sequence_parallel=True), 2),
}
FUSED_LAYOUTS = ("tp2_sp_dp2", "pp2_vpp2_dp2")  # --fused-logprobs: the output layer inside the log-probs
TRAINING_LAYOUT = (dict(pipeline=2, expert=2), 1)  # PP (stage hand-off and broadcast) and EP (all-to-all)
RTOL = 1e-5


# --- synthetic preprocessed sets -------------------------------------------------------------------

def make_samples(name, count, vocab_size):
    """`count` samples ``(ids, mask)``: lengths from 3 to SEQ + 1 ids, a prompt then a response."""
    rng = np.random.default_rng(sum(map(ord, name)))
    samples = []
    for index in range(count):
        length = SEQ + 1 if index % 3 == 0 else int(rng.integers(3, SEQ + 1))
        ids = rng.integers(1, vocab_size, length)
        mask = np.zeros(length, dtype=bool)
        if name != "untrained" and not (name == "chat" and index == UNTRAINED_SAMPLE):
            mask[int(rng.integers(1, length)):] = True
        samples.append((ids, mask))
    return samples


def write_set(prefix, samples, vocab_size):
    """The files tools/preprocess_data.py writes (data.SFTDataset reads and checks them)."""
    from megatron_psft.data import FORMAT_VERSION

    ids = np.concatenate([s[0] for s in samples]).astype(np.uint16)
    ids.tofile(f"{prefix}.tokens.bin")
    np.concatenate([s[1] for s in samples]).astype(np.uint8).tofile(f"{prefix}.mask.bin")
    np.save(f"{prefix}.offsets.npy", np.cumsum([0] + [len(s[0]) for s in samples]).astype(np.int64))
    meta = dict(format_version=FORMAT_VERSION, tokenizer={"name": "synthetic", "vocab_sha256": "none"},
                vocab_size=vocab_size, pad_id=0, eos_id=None, seq_length=SEQ, token_dtype="uint16", mask_dtype="uint8",
                num_samples=len(samples), num_tokens=int(ids.size))
    with open(f"{prefix}.meta.json", "w") as f:
        json.dump(meta, f)
    return prefix


def oracle_sums(model, samples):
    """float64 (sum of -log p, sum of entropy, count) over the samples' response tokens, one at a time."""
    nll = entropy = 0.0
    tokens = 0
    for ids, mask in samples:
        ids = torch.from_numpy(ids)[None]
        label_mask = torch.from_numpy(mask[1:])[None]  # ids[t + 1] is the label at position t
        logp, token_entropy = oracle.policy(model, ids[:, :-1], ids[:, 1:], torch.arange(ids.shape[1] - 1)[None])
        nll -= float(logp[label_mask].sum())
        entropy += float(token_entropy[label_mask].sum())
        tokens += int(label_mask.sum())
    return nll, entropy, tokens


def expected(model, samples, eval_iters=None):
    evaluated = samples[:len(samples) if eval_iters is None else eval_iters * GLOBAL_BATCH]
    nll, entropy, tokens = oracle_sums(model, evaluated)
    return dict(nll=nll / tokens, entropy=entropy / tokens, tokens=tokens) if tokens else \
        dict(nll=None, entropy=None, tokens=0)


# --- Megatron side (inside the 4-rank launch) --------------------------------------------------------

def _build(paths, layout_kwargs, lr=0.0):
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config
    from megatron_psft.engine.optimizer import OptimConfig, build_optimizer, wrap_with_ddp

    layout = parallel.ParallelLayout(**layout_kwargs)
    parallel.initialize(layout, seed=5)
    args = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(paths["megatron"]))
    config = transformer_config(args, layout)  # the HF config's aux loss: evaluation must leave its tracker alone
    chunks = build_model_chunks(args, config)
    checkpoint.load_model(paths["megatron"], chunks)
    optim = OptimConfig(lr=lr, lr_warmup_steps=0)
    chunks = wrap_with_ddp(chunks, config, optim)
    optimizer, scheduler = build_optimizer(chunks, optim, torch.float32, train_steps=2)
    return args, chunks, optimizer, scheduler


def _datasets(paths, vocab_size):
    from megatron_psft.data import SFTDataset

    return {name: SFTDataset(prefix, vocab_size=vocab_size) for name, prefix in paths["sets"].items()}


def _as_dicts(results):
    return {name: vars(result) for name, result in results.items()}


def _evaluate_layout(name, paths):
    from megatron_psft.platform import parallel
    from megatron_psft.engine.evaluation import EvalSettings, evaluate

    layout_kwargs, micro_batch_size = LAYOUTS[name]
    args, chunks, _, _ = _build(paths, layout_kwargs)
    datasets = _datasets(paths, args.vocab_size)
    whole = evaluate(chunks, datasets, EvalSettings(SEQ, micro_batch_size, GLOBAL_BATCH), args.vocab_size)
    first = evaluate(chunks, {"chat": datasets["chat"]},
                     EvalSettings(SEQ, micro_batch_size, GLOBAL_BATCH, eval_iters=EVAL_ITERS), args.vocab_size)
    results = dict(whole=_as_dicts(whole), first=_as_dicts(first))
    if name in FUSED_LAYOUTS:
        results["fused"] = _as_dicts(evaluate(chunks, datasets, EvalSettings(SEQ, micro_batch_size, GLOBAL_BATCH,
                                                                             fused_logprobs=True), args.vocab_size))
    parallel.destroy()
    return results


def _state(chunks):
    """What evaluation must leave alone: weights, gradient buffers, every RNG state."""
    from megatron.core import tensor_parallel

    return dict(weights=[p.detach().clone() for chunk in chunks for p in chunk.parameters()],
                grads=[b.grad_data.clone() for chunk in chunks for b in chunk.buffers + chunk.expert_parallel_buffers],
                torch_rng=torch.get_rng_state(),
                tracker_rng={k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()})


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _train_two_steps(paths, with_eval):
    """Two SFT steps (lr 1e-3) on the first two batches of "chat", with or without an evaluation of
    every set before each step. Returns each step's loss, grad norm and MoE load balance, the final
    weights, and (with evaluation) whether each evaluation left the state as it found it."""
    from megatron_psft.platform import parallel
    from megatron_psft.data.batching import Batching, rank_micro_batches
    from megatron_psft.engine.evaluation import EvalSettings, evaluate
    from megatron_psft.observability.metrics import moe_load_balance
    from megatron_psft.psft.objectives import ObjectiveConfig
    from megatron_psft.engine.step import train_step

    layout_kwargs, micro_batch_size = TRAINING_LAYOUT
    args, chunks, optimizer, scheduler = _build(paths, layout_kwargs, lr=1e-3)
    datasets = _datasets(paths, args.vocab_size)
    steps, evaluations, untouched = [], [], []
    for step in range(2):
        if with_eval:
            before = _state(chunks)
            evaluations.append(_as_dicts(evaluate(chunks, datasets, EvalSettings(SEQ, micro_batch_size, GLOBAL_BATCH),
                                                  args.vocab_size)))
            untouched.append(_same(before, _state(chunks)))
        indices = list(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))
        batching = Batching(SEQ, micro_batch_size, datasets["chat"].meta["pad_id"])
        micro_batches = rank_micro_batches(datasets["chat"], indices, batching, parallel.device())
        result = train_step(chunks, optimizer, scheduler, micro_batches, ObjectiveConfig("sft"), args.vocab_size)
        steps.append(dict(loss=result.metrics["loss"], grad_norm=result.grad_norm,
                          **moe_load_balance(len(micro_batches))))
    weights = [p.detach().clone() for chunk in chunks for p in chunk.parameters()]
    parallel.destroy()
    return dict(steps=steps, weights=weights, evaluations=evaluations, untouched=untouched)


def _trainer_runs(paths, root):
    """The trainer with its eval flags (PP2 x DP2, PSFT in rounds of 2): with evaluation every 2 of 5
    steps; the same stopped after step 2 (--exit-interval) and resumed, into one metrics file; and
    without evaluation."""
    from megatron_psft.platform import parallel
    from megatron_psft.train import Trainer, parse_launch

    common = ["--pretrained-checkpoint", paths["megatron"], "--data-prefix", paths["sets"]["chat"],
              "--seq-length", str(SEQ), "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "1",
              "--train-iters", "5", "--old-policy-interval", "2", "--lr", "1e-3", "--lr-warmup-iters", "0",
              "--pipeline-model-parallel-size", "2"]
    evaluation = ["--eval-data-prefix", f"code={paths['sets']['code']}", f"untrained={paths['sets']['untrained']}",
                  "--eval-interval", "2"]
    runs = {"straight": evaluation + ["--metrics-file", f"{root}/straight.jsonl"],
            "stopped": evaluation + ["--save", f"{root}/resumed", "--exit-interval", "2"],
            "resumed": evaluation + ["--save", f"{root}/resumed", "--load", f"{root}/resumed"],
            "without": ["--metrics-file", f"{root}/without.jsonl"]}
    for argv in runs.values():
        Trainer(parse_launch(common + argv)).run()
        parallel.destroy()


def _all(paths, root):
    results = {name: _evaluate_layout(name, paths) for name in LAYOUTS}
    without, with_eval = _train_two_steps(paths, False), _train_two_steps(paths, True)
    results["training"] = dict(without=without["steps"], with_eval=with_eval["steps"],
                               same_weights=_same(without["weights"], with_eval["weights"]),
                               evaluations=with_eval["evaluations"], untouched=with_eval["untouched"])
    _trainer_runs(paths, root)
    dist.barrier()
    return results


# --- the oracle and the launch ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from checkpoint_convert import hf_to_megatron

    root = tmp_path_factory.mktemp("evaluation")
    paths = {"hf": str(root / "hf"), "megatron": str(root / "megatron"), "sets": {}}
    oracle.save_random_model(paths["hf"])
    hf_to_megatron.convert(paths["hf"], paths["megatron"])
    vocab_size = oracle.hf_config().vocab_size
    samples = {name: make_samples(name, count, vocab_size) for name, count in SETS.items()}
    for name in SETS:
        paths["sets"][name] = write_set(str(root / name), samples[name], vocab_size)

    model = oracle.load_float64(paths["hf"])
    want = {name: expected(model, samples[name]) for name in SETS}
    want_first = expected(model, samples["chat"], EVAL_ITERS)
    per_rank = run_distributed(4, _all, paths, str(root))
    return dict(want=want, want_first=want_first, per_rank=per_rank, samples=samples, root=root)


def _close(got, want):
    assert got["tokens"] == want["tokens"], (got, want)
    if want["tokens"] == 0:
        assert got["nll"] is None and got["entropy"] is None, got
        return
    for key in ("nll", "entropy"):
        assert got[key] == pytest.approx(want[key], rel=RTOL), (key, got, want)


# --- tests -----------------------------------------------------------------------------------------

def test_the_case_is_informative(work):
    """Short last batches, full and short rows, a sample and a set without response tokens, and an
    --eval-iters that leaves samples out."""
    assert all(count % GLOBAL_BATCH for count in SETS.values())
    lengths = [len(ids) for ids, _ in work["samples"]["chat"]]
    assert max(lengths) == SEQ + 1 and min(lengths) < SEQ // 2
    assert not work["samples"]["chat"][UNTRAINED_SAMPLE][1].any()
    assert work["want"]["untrained"]["tokens"] == 0
    assert 0 < work["want_first"]["tokens"] < work["want"]["chat"]["tokens"]
    assert work["want_first"]["nll"] != pytest.approx(work["want"]["chat"]["nll"], rel=1e-3)


@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_is_the_float64_token_mean(work, name):
    got = work["per_rank"][-1][name]
    for set_name in SETS:
        print(name, set_name, got["whole"][set_name], work["want"][set_name])
        _close(got["whole"][set_name], work["want"][set_name])
    _close(got["first"]["chat"], work["want_first"])  # --eval-iters: the first batches, in stored order
    for set_name in SETS if name in FUSED_LAYOUTS else ():
        _close(got["fused"][set_name], work["want"][set_name])


@pytest.mark.parametrize("name", [*LAYOUTS, "training"])
def test_every_rank_returns_the_same_numbers(work, name):
    first = work["per_rank"][0][name]
    if name == "training":
        first = first["evaluations"]
    assert all((r[name]["evaluations"] if name == "training" else r[name]) == first for r in work["per_rank"])


def test_evaluation_changes_nothing_in_training(work):
    """The steps after an evaluation are bit-identical to those of a run without one: loss, grad norm,
    MoE load balance (its tracker untouched) and the final weights; each evaluation left weights,
    gradient buffers and RNG states as it found them."""
    for results in work["per_rank"]:
        training = results["training"]
        assert training["untouched"] == [True, True]
        assert training["with_eval"] == training["without"]
        assert training["same_weights"]
    training = work["per_rank"][-1]["training"]
    assert training["without"][0]["loss"] != training["without"][1]["loss"]
    assert "moe_load_balance_max" in training["without"][0]
    # The evaluation before the second step saw the weights the first one trained.
    before, after = (evaluation["chat"]["nll"] for evaluation in training["evaluations"])
    assert before == pytest.approx(work["want"]["chat"]["nll"], rel=RTOL) and after != pytest.approx(before, rel=1e-4)


def _records(path):
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/code/nll" in r]


def test_trainer_evaluates_at_0_every_interval_and_the_end_and_resumes_exactly(work):
    """The trainer's wiring: evaluation at step 0, every --eval-interval steps and after the last
    step; a run stopped at an evaluated step and resumed logs the same lines as the straight run,
    which trains exactly as the run without evaluation."""
    root = work["root"]
    steps, evals = _records(root / "straight.jsonl")
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert evals[0]["eval/code/nll"] == pytest.approx(work["want"]["code"]["nll"], rel=RTOL)
    assert evals[0]["eval/code/tokens"] == work["want"]["code"]["tokens"] and evals[0]["eval/untrained/tokens"] == 0
    assert evals[-1]["eval/code/nll"] != pytest.approx(evals[0]["eval/code/nll"], rel=1e-4)
    resumed_steps, resumed_evals = _records(root / "resumed" / "metrics.jsonl")
    assert resumed_evals == evals
    without, no_evals = _records(root / "without.jsonl")
    assert no_evals == []
    for straight, resumed, plain in zip(steps, resumed_steps, without, strict=True):
        for key in ("loss", "grad_norm", "entropy", "clip_fraction"):
            assert straight[key] == plain[key], (key, straight["step"])
            assert resumed[key] == pytest.approx(straight[key], rel=0, abs=1e-6), (key, straight["step"])


# --- flags, batches and the logger (no launch) -------------------------------------------------------

def test_eval_data_prefix_names_and_refusals():
    from megatron_psft.config import parse_eval_data_prefix

    assert parse_eval_data_prefix(["chat=/data/a", "code-v2=/data/b=c"]) == {"chat": "/data/a", "code-v2": "/data/b=c"}
    for bad, why in (("/data/a", "expected NAME=PREFIX"), ("chat=", "expected NAME=PREFIX"),
                     ("a/b=/data/a", "letters, digits"), ("=/data/a", "letters, digits")):
        with pytest.raises(ValueError, match=why) as error:
            parse_eval_data_prefix([bad])
        assert "--eval-data-prefix" in str(error.value)
    with pytest.raises(ValueError, match="names the set 'chat' twice"):
        parse_eval_data_prefix(["chat=/a", "chat=/b"])


def test_eval_batches_are_the_set_in_order():
    from megatron_psft.engine.evaluation import EvalSettings, eval_batches

    assert eval_batches(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert eval_batches(10, 4, eval_iters=2) == [range(0, 4), range(4, 8)]
    assert eval_batches(10, 4, eval_iters=5) == eval_batches(10, 4)
    with pytest.raises(ValueError, match="--eval-iters must be at least 1"):
        EvalSettings(SEQ, 1, GLOBAL_BATCH, eval_iters=0)


def _eval_results(step):
    from megatron_psft.engine.evaluation import EvalResult

    return {"chat": EvalResult(2.0 - step / 10, 1.5 + step / 100, 120), "untrained": EvalResult(None, None, 0)}


def _log_run(jsonl, tensorboard_dir, train_steps, first_step=0, last_step=None, resumed_step=None, eval_interval=2):
    """Steps first_step..last_step (0-based) as the trainer logs them: an evaluation at step 0 on a
    fresh run, then after every eval_interval-th step and after the last one."""
    from megatron_psft.observability.logger import MetricsLogger

    logger = MetricsLogger(str(jsonl), tensorboard_dir, train_steps, resumed_step=resumed_step)
    if resumed_step is None:
        logger.log_eval(0, _eval_results(0))
    for step in range(first_step, train_steps if last_step is None else last_step + 1):
        logger.log(step, {"phase": "psft", "loss": float(step)})
        if (step + 1) % eval_interval == 0 or step + 1 == train_steps:
            logger.log_eval(step + 1, _eval_results(step + 1), seconds=0.25)
    logger.close()


def test_eval_records_in_the_jsonl_console_and_tensorboard(tmp_path, capsys):
    _log_run(tmp_path / "metrics.jsonl", str(tmp_path / "tb"), train_steps=5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/chat/nll" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert evals[1] == {"step": 2, "eval/chat/nll": 1.8, "eval/chat/entropy": 1.52, "eval/chat/tokens": 120,
                        "eval/untrained/nll": None, "eval/untrained/entropy": None, "eval/untrained/tokens": 0}
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" evaluation")]
    assert len(lines) == 4 and "step      2/     5" in lines[1]
    assert "chat: nll 1.80000, entropy 1.5200, tokens 120" in lines[1] and "untrained: no response tokens" in lines[1]
    assert "0.25 s" in lines[1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("eval/chat/nll")] == [0, 2, 4, 5]
    assert events.Scalars("eval/chat/tokens")[0].value == 120
    assert "eval/untrained/nll" not in events.Tags()["scalars"] and "eval/untrained/tokens" in events.Tags()["scalars"]


def test_eval_records_survive_a_resume_like_training_records(tmp_path):
    """Killed after step 4 was logged (and half a line written), resumed from the checkpoint of step 2:
    the JSONL equals the uninterrupted run's, eval lines included."""
    _log_run(tmp_path / "straight.jsonl", None, train_steps=5)
    resumed = tmp_path / "resumed.jsonl"
    _log_run(resumed, None, train_steps=5, last_step=3)
    with open(resumed, "a") as f:
        f.write('{"step": 5, "lo')
    with pytest.warns(UserWarning, match="dropping an unreadable"):
        _log_run(resumed, None, train_steps=5, first_step=2, resumed_step=2)
    assert resumed.read_text() == (tmp_path / "straight.jsonl").read_text()
