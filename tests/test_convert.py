"""HF <-> Megatron checkpoint conversion on tiny Qwen3 models made by transformers itself.

Kinds: MoE, MoE with tied embeddings, dense Qwen3, a bf16 MoE checkpoint, and a MoE that does not
renormalise its top-k router probabilities (``norm_topk_prob=False``). One 4-rank launch loads the
converted checkpoints at TP1 (DP4), TP2 x EP2 (SP) and PP2, compares logits with transformers,
trains one step at TP2 x EP2 and saves like the trainer, then re-saves that checkpoint at TP1 and
PP2; the exports of all three must agree bit for bit. Conversions themselves run in this process
(a world of one).
"""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distributed import run_distributed

SEQ, BATCH = 12, 2
KINDS = ("moe", "tied", "dense", "moe_bf16", "moe_unnormalized")
LAYOUTS = {  # in run order: the trained checkpoint is saved at the first, re-saved at the others
    "tp2_ep2_sp_dp2": dict(tensor=2, expert=2, sequence_parallel=True),
    "tp1_dp4": dict(),
    "pp2_dp2": dict(pipeline=2),
}
TRAINED_ITERATION = 10


def _kinds_at(layout):
    return [k for k in KINDS if k != "dense" or "ep" not in layout]  # Megatron has no EP without experts
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_hf_model(path, kind):
    """A random model saved by transformers in several shards, fp32 (``moe_bf16``: bf16). Vocab 300
    is padded by Megatron."""
    import transformers

    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=96, max_position_embeddings=256,
                  rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=kind == "tied")
    if kind == "dense":
        config, model_class = transformers.Qwen3Config(**common), transformers.Qwen3ForCausalLM
    else:
        config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8,
                                             num_experts_per_tok=2, norm_topk_prob=kind != "moe_unnormalized")
        model_class = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(KINDS.index(kind))
    model = model_class(config).float()
    with torch.no_grad():  # norms start at 1: make them distinct so a swapped norm cannot go unnoticed
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    if kind == "moe_bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")  # transformers 5 writes `num_local_experts`


def _tokens():
    return torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _tensors(model_dir):
    from checkpoint_convert.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(model_dir)
    return {name: reader.read(name) for name in reader.names()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from checkpoint_convert import hf_to_megatron, megatron_to_hf

    root = tmp_path_factory.mktemp("convert")
    paths = SimpleNamespace(root=str(root))
    for kind in KINDS:
        hf, ckpt, back = (str(root / f"{kind}_{what}") for what in ("hf", "megatron", "hf_back"))
        _save_hf_model(hf, kind)
        if kind == "tied":  # one import through the command line, to see its flags and progress output
            result = subprocess.run([sys.executable, "-m", "checkpoint_convert.hf_to_megatron", "--hf-dir", hf,
                                     "--out-dir", ckpt], cwd=REPO, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
            paths.cli_output = result.stdout
        else:
            hf_to_megatron.convert(hf, ckpt)
        megatron_to_hf.convert(ckpt, hf, back, max_shard_size="150KB")
        setattr(paths, kind, SimpleNamespace(hf=hf, megatron=ckpt, back=back))
    paths.trained = {name: str(root / f"trained_{name}") for name in LAYOUTS}
    return paths


def _declared_and_model_keys(ckpt, chunks):
    """{key: global shape} of the converter's declaration and of GPTModel.sharded_state_dict()."""
    from checkpoint_convert import hf_to_megatron
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    from megatron_psft import checkpoint
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs

    def shapes(state):
        apply_factories(state)
        return {v.key: tuple(v.global_shape) for v in nested_values(state)
                if isinstance(v, (ShardedTensor, ShardedObject))}

    args = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(ckpt))
    declared = hf_to_megatron.sharded_state_dict(args, hf_to_megatron.chunks(args), torch.float32)
    return shapes(declared), shapes(chunks[0].sharded_state_dict())


def _train_and_save(chunks, frozen_chunks, config, args, hf_config, root):
    """One SFT step with the project's optimizer, saved as the trainer does: with optimizer state and
    a frozen copy of the initial policy (which export must not pick up)."""
    from megatron_psft import checkpoint
    from megatron_psft.psft.objectives import ObjectiveConfig
    from megatron_psft.engine.optimizer import OptimConfig, build_optimizer, wrap_with_ddp
    from megatron_psft.engine.step import train_step

    checkpoint.save(root, TRAINED_ITERATION // 2, chunks, hf_config)  # before the step
    optim = OptimConfig(lr=1e-2, lr_warmup_steps=0)
    chunks = wrap_with_ddp(chunks, config, optim)
    optimizer, scheduler = build_optimizer(chunks, optim, torch.float32, train_steps=10)  # lr > 0 at step 1
    tokens = _tokens()
    batch = dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(BATCH, SEQ),
                 position_ids=torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
                 segment_ids=torch.arange(BATCH)[:, None].expand(BATCH, SEQ).contiguous())
    train_step(chunks, optimizer, scheduler, [batch], ObjectiveConfig("sft"), args.vocab_size)
    checkpoint.save(root, TRAINED_ITERATION, chunks, hf_config, optimizer=optimizer, scheduler=scheduler,
                    trainer_state={"iteration": TRAINED_ITERATION}, frozen_chunks=frozen_chunks)


def _all_layouts(paths):
    import torch.distributed as dist

    from checkpoint_convert import verify
    from megatron_psft import checkpoint
    from megatron_psft.platform import parallel
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config

    results = {"logit_diff": {}, "keys": {}}
    first = next(iter(LAYOUTS))
    for name, layout_kwargs in LAYOUTS.items():
        layout = parallel.ParallelLayout(**layout_kwargs)
        parallel.initialize(layout)
        for kind in _kinds_at(name):
            ckpt = getattr(paths, kind).megatron
            args, chunks = verify.load_megatron(ckpt, layout)
            logits = verify.megatron_logits(chunks, _tokens(), args.vocab_size)
            if logits is not None:  # last pipeline stage; only small results go back through the queue
                reference = verify.HFReference(getattr(paths, kind).hf).logits(_tokens())
                results["logit_diff"][(name, kind)] = float((logits - reference).abs().max())
            if name == "tp1_dp4" and dist.get_rank() == 0:
                results["keys"][kind] = _declared_and_model_keys(ckpt, chunks)
        # The trainer's checkpoint: trained and saved at the first layout, re-saved at the others.
        hf_config = checkpoint.read_hf_config(paths.moe.megatron)
        args = Qwen3MoeArgs.from_hf_config(hf_config)
        config = transformer_config(args, layout)
        chunks = build_model_chunks(args, config)
        if name == first:
            frozen = build_model_chunks(args, config)
            for model in (chunks, frozen):
                checkpoint.load_model(paths.moe.megatron, model)
            _train_and_save(chunks, frozen, config, args, hf_config, paths.trained[name])
        else:
            checkpoint.load_model(paths.trained[first], chunks)
            checkpoint.save(paths.trained[name], TRAINED_ITERATION, chunks, hf_config)
        parallel.destroy()
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def per_rank(work):
    return run_distributed(4, _all_layouts, work)


# --- round trip -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_identical(work, kind):
    paths = getattr(work, kind)
    original, back = _tensors(paths.hf), _tensors(paths.back)
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    dtypes = {tensor.dtype for tensor in original.values()}
    assert dtypes == {torch.bfloat16 if kind == "moe_bf16" else torch.float32}, dtypes
    with open(os.path.join(paths.hf, "config.json")) as a, open(os.path.join(paths.back, "config.json")) as b:
        assert a.read() == b.read()
    files = sorted(os.listdir(paths.back))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", files
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(files)


def test_export_loads_in_transformers(work):
    import transformers

    tokens = _tokens()
    original = transformers.AutoModelForCausalLM.from_pretrained(work.moe.hf, dtype=torch.float32)
    exported = transformers.AutoModelForCausalLM.from_pretrained(work.moe.back, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, exported(tokens).logits)


def test_cli_prints_progress_per_layer(work):
    lines = work.cli_output.splitlines()
    assert any("layer 3" in line and "MB/s" in line for line in lines), work.cli_output
    assert lines[-1].startswith("[hf->megatron] done"), work.cli_output


# --- Megatron side: keys, logits, checkpoints saved by training --------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_declared_checkpoint_matches_gptmodel(per_rank, kind):
    """The import declares exactly the tensors and objects GPTModel (local spec) checkpoints, with the
    same global shapes, plus what only the TE spec asks for: the TE norms' extra state."""
    declared, model = per_rank[0]["keys"][kind]
    assert {k: declared[k] for k in model} == model
    te_only = {"decoder.layers.self_attention.q_layernorm._extra_state",
               "decoder.layers.self_attention.k_layernorm._extra_state", "decoder.final_layernorm._extra_state"}
    if kind != "dense":
        te_only |= {"decoder.layers.pre_mlp_layernorm._extra_state"}
    assert set(declared) - set(model) == te_only


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(per_rank, layout, kind):
    if kind not in _kinds_at(layout):
        pytest.skip("expert parallelism needs experts")
    diffs = {rank: r["logit_diff"][(layout, kind)]
             for rank, r in enumerate(per_rank) if (layout, kind) in r["logit_diff"]}
    print(f"{layout} {kind}: max |logit diff| per last-stage rank {diffs}")
    assert len(diffs) == (2 if layout.startswith("pp2") else 4)
    assert max(diffs.values()) <= 1e-4, diffs


def test_trained_checkpoint_exports_the_same_from_every_layout(work, per_rank, tmp_path):
    from checkpoint_convert import megatron_to_hf

    exports = {}
    for name, root in work.trained.items():
        exports[name] = _tensors(megatron_to_hf.convert(root, work.moe.hf, str(tmp_path / name)))
    first, *others = exports.values()
    for name, tensors in zip(list(exports)[1:], others):
        assert sorted(tensors) == sorted(first)
        for key in first:
            assert torch.equal(tensors[key], first[key]), (name, key)
    original = _tensors(work.moe.hf)
    changed = [k for k in original if not torch.equal(original[k], first[k])]
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed, changed


def test_export_reads_the_requested_iteration(work, per_rank, tmp_path):
    """The checkpoint saved at TP2 x EP2 before the training step exports to the original weights."""
    from checkpoint_convert import megatron_to_hf

    root = work.trained[next(iter(LAYOUTS))]
    exported = _tensors(megatron_to_hf.convert(root, work.moe.hf, str(tmp_path / "out"),
                                               iteration=TRAINED_ITERATION // 2))
    original = _tensors(work.moe.hf)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_verify_command_passes_on_the_conversion_and_fails_on_the_trained_weights(work, per_rank):
    from distributed import free_port

    def verify(megatron_dir):
        env = dict(os.environ, MASTER_PORT=str(free_port()))
        return subprocess.run([sys.executable, "-m", "checkpoint_convert.verify", "--hf-dir", work.moe.hf,
                               "--megatron-dir", megatron_dir], cwd=REPO, env=env, capture_output=True, text=True)

    converted, trained = verify(work.moe.megatron), verify(work.trained["tp1_dp4"])
    assert converted.returncode == 0 and "PASS" in converted.stdout, converted.stdout + converted.stderr[-2000:]
    assert trained.returncode == 1 and "FAIL" in trained.stdout, trained.stdout + trained.stderr[-2000:]


# --- errors ---------------------------------------------------------------------------------------

def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _copy_with_tensor_edit(src, dst, name, edit):
    """A copy of the HF model where `edit(tensors_of_the_shard)` rewrites the shard holding `name`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        shard = os.path.join(dst, json.load(f)["weight_map"][name])
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MixtralForCausalLM"]), "unsupported architecture"),
    (dict(shared_expert_intermediate_size=64), "shared experts"),
    (dict(attention_bias=True), "attention biases"),
])
def test_unsupported_models_are_refused(work, tmp_path, changes, message):
    from checkpoint_convert import hf_to_megatron

    hf = _copy_with_config(work.moe.hf, str(tmp_path / "hf"), **changes)
    with pytest.raises(ValueError, match=message):
        hf_to_megatron.convert(hf, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_wrong_missing_and_unknown_tensors_are_named(work, tmp_path):
    from checkpoint_convert import hf_to_megatron

    bad = "model.layers.2.self_attn.k_proj.weight"
    hf = _copy_with_tensor_edit(work.moe.hf, str(tmp_path / "shape"), bad, lambda t: t.update({bad: t[bad][:-1]}))
    with pytest.raises(ValueError, match=f"{bad}.*shape"):
        hf_to_megatron.convert(hf, str(tmp_path / "out"))
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    hf = _copy_with_tensor_edit(work.moe.hf, str(tmp_path / "missing"), gone, lambda t: t.pop(gone))
    with pytest.raises(KeyError, match=gone):
        hf_to_megatron.convert(hf, str(tmp_path / "out"))
    extra = "model.layers.0.mlp.shared_expert.up_proj.weight"
    hf = _copy_with_tensor_edit(work.moe.hf, str(tmp_path / "extra"), gone,
                                lambda t: t.update({extra: t[gone].clone()}))
    with pytest.raises(ValueError, match="no conversion rule"):
        hf_to_megatron.convert(hf, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_checkpoint_tensors_are_checked_before_export():
    from checkpoint_convert.megatron_to_hf import check_stored_tensors
    from megatron_psft.models.qwen3_moe import Qwen3MoeArgs
    from megatron_psft.models.qwen3_moe import state_dict_adapter as adapter

    args = Qwen3MoeArgs(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                        head_dim=32, ffn_hidden_size=96, rms_norm_eps=1e-6, rope_theta=1e6,
                        max_position_embeddings=256, tie_word_embeddings=False, num_experts=8,
                        moe_ffn_hidden_size=32, moe_top_k=2)
    metadata = {rule.megatron_key: SimpleNamespace(global_shape=adapter.global_shape(rule, args))
                for rule in adapter.rules(args)}
    metadata["output_layer.weight"] = SimpleNamespace(global_shape=(512, 64))  # saved at TP2: more padding
    metadata["optimizer.state.exp_avg.output_layer.weight"] = SimpleNamespace(global_shape=(7,))
    check_stored_tensors(args, metadata)
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    with pytest.raises(ValueError, match=f"{qkv}.*global shape"):
        check_stored_tensors(args, {**metadata, qkv: SimpleNamespace(global_shape=(2, 255, 64))})
    with pytest.raises(ValueError, match="output_layer.weight.*global shape"):
        check_stored_tensors(args, {**metadata, "output_layer.weight": SimpleNamespace(global_shape=(299, 64))})
    with pytest.raises(KeyError, match="router"):
        check_stored_tensors(args, {k: v for k, v in metadata.items() if "router" not in k})
    with pytest.raises(ValueError, match="no conversion rule"):
        check_stored_tensors(args, {**metadata, "decoder.layers.mlp.shared_experts.linear_fc1.weight": metadata[qkv]})


def test_export_refuses_a_template_of_another_model(work, tmp_path):
    from checkpoint_convert import megatron_to_hf

    with pytest.raises(ValueError, match="different model"):
        megatron_to_hf.convert(work.moe.megatron, work.dense.hf, str(tmp_path / "out"))


def test_existing_output_needs_overwrite(work, tmp_path):
    from checkpoint_convert import hf_to_megatron, megatron_to_hf

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_megatron.convert(work.moe.hf, str(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        megatron_to_hf.convert(work.moe.megatron, work.moe.hf, str(out))
    assert os.listdir(out) == ["keep.txt"]
    megatron_to_hf.convert(work.moe.megatron, work.moe.hf, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors.index.json" in os.listdir(out)


@pytest.mark.parametrize("direction", ["import", "export"])
def test_interrupted_conversion_leaves_no_output(work, tmp_path, monkeypatch, direction):
    from checkpoint_convert import hf_to_megatron, megatron_to_hf
    from checkpoint_convert.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter

    cls, method = (SafetensorsReader, "read") if direction == "import" else (ShardedSafetensorsWriter, "write")
    original, calls = getattr(cls, method), []

    def interrupt_midway(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, interrupt_midway)
    out = tmp_path / "out"
    with pytest.raises(BaseException) as raised:  # torch.distributed.checkpoint wraps it in its own error
        if direction == "import":
            hf_to_megatron.convert(work.moe.hf, str(out))
        else:
            megatron_to_hf.convert(work.moe.megatron, work.moe.hf, str(out))
    assert "KeyboardInterrupt" in str(raised.value) or raised.type is KeyboardInterrupt
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # neither OUT nor its staging directory
