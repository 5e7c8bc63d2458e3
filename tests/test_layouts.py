"""Two PSFT steps on a tiny Qwen3-shaped GPT-MoE give the same loss and gradient norm at every layout.

Layout against layout, over a real optimizer step too; the absolute float64 oracle for a step (the
loss and every gradient, every objective) is tests/test_oracle.py. All layouts run in one 4-rank
launch. The weights are saved once with dist_checkpointing and loaded at each layout. The MoE
load-balancing loss is switched off here: Megatron defines it per micro-batch, so it legitimately
changes with the micro-batch split.
"""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

SEQ, GLOBAL_BATCH = 16, 8
LAYOUTS = {
    # name: (layout kwargs, micro-batch size)
    "tp1_dp4": (dict(), 1),
    "tp2_sp_dp2": (dict(tensor=2, sequence_parallel=True), 2),
    "tp2_ep2_sp_dp2": (dict(tensor=2, expert=2, sequence_parallel=True), 1),
    "pp2_dp2_4mb": (dict(pipeline=2), 1),
    "tp2_sp_ep4_etp1": (dict(tensor=2, expert=4, expert_tensor=1, sequence_parallel=True), 2),
}


def global_batch(vocab):
    """Fixed tokens; response spans of very different lengths, so DP ranks hold different token counts."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    prompt_lengths = [2, 3, 1, 4, 14, 15, 12, 13]  # first half: long responses; second half: short ones
    for i, start in enumerate(prompt_lengths):
        loss_mask[i, start:] = 1
    loss_mask[5, :] = 0  # a sample with no response tokens at all
    old_shift = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) - 0.5)  # old = logp - shift: ratios in [0.6, 1.65]
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask,
                position_ids=torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).contiguous(),
                segment_ids=torch.arange(GLOBAL_BATCH)[:, None].expand(GLOBAL_BATCH, SEQ).contiguous()), old_shift


def _micro_batches(batch, rows, micro_batch_size):
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(rows.start, rows.stop, micro_batch_size)]


def _run_layout(name, checkpoint_root, args, hf_config):
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_psft.psft.objectives import ObjectiveConfig
    from megatron_psft.engine.optimizer import OptimConfig, build_optimizer, wrap_with_ddp
    from megatron_psft.engine.step import policy_logprobs, train_step

    layout_kwargs, micro_batch_size = LAYOUTS[name]
    layout = parallel.ParallelLayout(**layout_kwargs)
    parallel.initialize(layout, seed=5)
    config = transformer_config(args, layout, moe_aux_loss_coeff=0.0)
    chunks = build_model_chunks(args, config)
    checkpoint.load_model(checkpoint_root, chunks)
    optim = OptimConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1, clip_grad=1.0)
    chunks = wrap_with_ddp(chunks, config, optim)
    optimizer, scheduler = build_optimizer(chunks, optim, torch.float32, train_steps=2)

    dp_rank, dp_size = parallel.data_rank(), parallel.data_size()
    per_rank = GLOBAL_BATCH // dp_size
    rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    batch, old_shift = global_batch(args.vocab_size)
    micro_batches = _micro_batches(batch, rows, micro_batch_size)
    current = policy_logprobs(chunks, micro_batches, args.vocab_size)
    if current is not None:
        for micro_batch, logprobs, start in zip(micro_batches, current, range(rows.start, rows.stop, micro_batch_size)):
            micro_batch["old_logprobs"] = logprobs - old_shift[start:start + micro_batch_size]
    steps = []
    for _ in range(2):
        result = train_step(chunks, optimizer, scheduler, micro_batches, ObjectiveConfig("psft"), args.vocab_size)
        steps.append(dict(loss=result.metrics["loss"], grad_norm=result.grad_norm,
                          clip_fraction=result.metrics["clip_fraction"], tokens=int(result.metrics["trained_tokens_total"])))
    local_tokens = int(batch["loss_mask"][rows.start:rows.stop].sum())
    parallel.destroy()
    return dict(steps=steps, local_tokens=local_tokens, dp_rank=dp_rank)


def _all_masked_global_batch(checkpoint_root, args):
    """A global batch without a single response token is an error, raised before the optimizer moves."""
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import build_model_chunks, transformer_config
    from megatron_psft.psft.objectives import ObjectiveConfig
    from megatron_psft.engine.optimizer import OptimConfig, build_optimizer, wrap_with_ddp
    from megatron_psft.engine.step import train_step

    layout = parallel.ParallelLayout(tensor=2, sequence_parallel=True)
    parallel.initialize(layout, seed=5)
    config = transformer_config(args, layout, moe_aux_loss_coeff=0.0)
    chunks = build_model_chunks(args, config)
    checkpoint.load_model(checkpoint_root, chunks)
    chunks = wrap_with_ddp(chunks, config, OptimConfig(lr=1e-3, lr_warmup_steps=0))
    optimizer, scheduler = build_optimizer(chunks, OptimConfig(lr=1e-3, lr_warmup_steps=0), torch.float32, 1)
    before = [p.detach().clone() for p in chunks[0].parameters()]
    batch, _ = global_batch(args.vocab_size)
    batch["loss_mask"].zero_()
    try:
        train_step(chunks, optimizer, scheduler, _micro_batches(batch, range(0, 2), 1), ObjectiveConfig("sft"),
                   args.vocab_size)
        outcome = "no error"
    except ValueError as error:
        outcome = str(error)
    unchanged = all(torch.equal(b, p.detach()) for b, p in zip(before, chunks[0].parameters()))
    parallel.destroy()
    return dict(outcome=outcome, unchanged=unchanged)


def _all_layouts(checkpoint_root):
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, load_hf_config, transformer_config

    hf_config = load_hf_config("debug")
    args = Qwen3MoeArgs.from_hf_config(hf_config)
    parallel.initialize(parallel.ParallelLayout(), seed=5)
    chunks = build_model_chunks(args, transformer_config(args, parallel.ParallelLayout()))
    checkpoint.save(checkpoint_root, 0, chunks, hf_config)
    parallel.destroy()

    results = {}
    for name in LAYOUTS:
        results[name] = _run_layout(name, checkpoint_root, args, hf_config)
    results["all_masked"] = _all_masked_global_batch(checkpoint_root, args)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    return run_distributed(4, _all_layouts, str(tmp_path_factory.mktemp("layouts")))


def test_loss_and_grad_norm_agree_across_layouts(per_rank):
    results = per_rank[-1]
    base = results["tp1_dp4"]["steps"]
    for name in LAYOUTS:
        print(name, [(s["loss"], s["grad_norm"]) for s in results[name]["steps"]])
    for name in LAYOUTS:
        for step, (got, want) in enumerate(zip(results[name]["steps"], base)):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (name, step, got, want)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), (name, step, got, want)
            assert got["clip_fraction"] == want["clip_fraction"], (name, step)
            assert got["tokens"] == want["tokens"]


def test_every_rank_reports_the_same_step(per_rank):
    for name in LAYOUTS:
        assert all(r[name]["steps"] == per_rank[0][name]["steps"] for r in per_rank), name


def test_first_step_clips_some_tokens(per_rank):
    first = per_rank[-1]["tp1_dp4"]["steps"][0]
    assert 0 < first["clip_fraction"] < 1


def test_data_parallel_ranks_held_different_token_counts(per_rank):
    counts = {r["pp2_dp2_4mb"]["dp_rank"]: r["pp2_dp2_4mb"]["local_tokens"] for r in per_rank}
    assert len(counts) == 2 and counts[0] != counts[1], counts


def test_the_step_changed_the_loss(per_rank):
    steps = per_rank[-1]["tp1_dp4"]["steps"]
    assert steps[0]["loss"] != pytest.approx(steps[1]["loss"], rel=1e-6)


def test_all_masked_global_batch_is_an_error_and_changes_nothing(per_rank):
    for results in per_rank:
        assert "no response tokens" in results["all_masked"]["outcome"], results["all_masked"]
        assert results["all_masked"]["unchanged"]
