"""Hugging Face Qwen3 / Qwen3-MoE weights <-> Megatron-Core's layout-free checkpoint tensors, as data.

Megatron's ``dist_checkpointing`` stores every weight as one *global* tensor per sharded key, with the
layers stacked on a leading axis and, for experts, the experts on a second one::

    decoder.layers.self_attention.linear_qkv.weight        [layers, qkv_rows, hidden]
    decoder.layers.mlp.experts.experts.linear_fc1.weight   [layers, experts, 2 * moe_ffn, hidden]

That per-layer (per-expert) slice is the unit of conversion. Each :class:`Rule` below says which HF
tensors make up one slice and where their rows go in it: every transform is a list of *row
placements* (HF tensor, its rows -> the slice's rows), so the one table drives both directions and
both directions are exact copies (no arithmetic). Import writes each placement as its own checkpoint
chunk; export reads a slice back and gathers each HF tensor's rows.

Transforms:
  identity   the HF tensor is the slice.
  concat     the HF tensors stacked along rows (``linear_fc1`` = [gate; up]).
  qkv        rows grouped by query group: for each KV head, [its query heads..., key, value].
  vocab      the HF rows, then zero rows up to the padded vocabulary (stripped on export).
"""

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_psft.models.qwen3_moe.args import Qwen3MoeArgs
from megatron_psft.models.qwen3_moe.model import padded_vocab_size

IDENTITY, CONCAT, QKV, VOCAB = "identity", "concat", "qkv", "vocab"
ALWAYS, MOE, DENSE, UNTIED = "always", "moe", "dense", "untied"
LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class HFWeight:
    name: str  # "{layer}" / "{expert}" are filled in
    shape: Tuple[str, ...]  # dimension names, sized by `dims`


@dataclass(frozen=True)
class Rule:
    megatron_key: str
    hf: Tuple[HFWeight, ...]
    transform: str = IDENTITY
    when: str = ALWAYS

    @property
    def per_layer(self) -> bool:
        return self.megatron_key.startswith(LAYER_PREFIX)

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf[0].name


def _layer(name):
    return f"model.layers.{{layer}}.{name}"


RULES: Tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", (HFWeight("model.embed_tokens.weight", ("vocab", "hidden")),), VOCAB),
    # The local spec names the input norm after TE's fused norm+linear, so both specs share this key.
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
         (HFWeight(_layer("input_layernorm.weight"), ("hidden",)),)),
    Rule("decoder.layers.self_attention.linear_qkv.weight",
         (HFWeight(_layer("self_attn.q_proj.weight"), ("q", "hidden")),
          HFWeight(_layer("self_attn.k_proj.weight"), ("kv", "hidden")),
          HFWeight(_layer("self_attn.v_proj.weight"), ("kv", "hidden"))), QKV),
    Rule("decoder.layers.self_attention.linear_proj.weight",
         (HFWeight(_layer("self_attn.o_proj.weight"), ("hidden", "q")),)),
    Rule("decoder.layers.self_attention.q_layernorm.weight",
         (HFWeight(_layer("self_attn.q_norm.weight"), ("head_dim",)),)),
    Rule("decoder.layers.self_attention.k_layernorm.weight",
         (HFWeight(_layer("self_attn.k_norm.weight"), ("head_dim",)),)),
    # MoE layers: a separate pre-MLP norm (experts have no fused norm); the local spec is built to
    # save it under the TE spec's name too (models/qwen3_moe/model.py: layer_spec).
    Rule("decoder.layers.pre_mlp_layernorm.weight", (HFWeight(_layer("post_attention_layernorm.weight"), ("hidden",)),),
         when=MOE),
    Rule("decoder.layers.mlp.router.weight", (HFWeight(_layer("mlp.gate.weight"), ("experts", "hidden")),), when=MOE),
    Rule("decoder.layers.mlp.experts.experts.linear_fc1.weight",
         (HFWeight(_layer("mlp.experts.{expert}.gate_proj.weight"), ("moe_ffn", "hidden")),
          HFWeight(_layer("mlp.experts.{expert}.up_proj.weight"), ("moe_ffn", "hidden"))), CONCAT, when=MOE),
    Rule("decoder.layers.mlp.experts.experts.linear_fc2.weight",
         (HFWeight(_layer("mlp.experts.{expert}.down_proj.weight"), ("hidden", "moe_ffn")),), when=MOE),
    # Dense layers: both specs fuse the pre-MLP norm into linear_fc1.
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight",
         (HFWeight(_layer("post_attention_layernorm.weight"), ("hidden",)),), when=DENSE),
    Rule("decoder.layers.mlp.linear_fc1.weight",
         (HFWeight(_layer("mlp.gate_proj.weight"), ("ffn", "hidden")),
          HFWeight(_layer("mlp.up_proj.weight"), ("ffn", "hidden"))), CONCAT, when=DENSE),
    Rule("decoder.layers.mlp.linear_fc2.weight", (HFWeight(_layer("mlp.down_proj.weight"), ("hidden", "ffn")),),
         when=DENSE),
    Rule("decoder.final_layernorm.weight", (HFWeight("model.norm.weight", ("hidden",)),)),
    Rule("output_layer.weight", (HFWeight("lm_head.weight", ("vocab", "hidden")),), VOCAB, when=UNTIED),
)

# Megatron checkpoints an ``_extra_state`` object per linear layer (FP8 scaling state; None for the
# local spec) and, under the TE spec, per TE norm too. Loading asks for every one the model has, so
# import writes them all as None (per layer, per expert, or one for the model); a spec that does not
# have some simply leaves them unread.
EXTRA_STATES: Tuple[Tuple[str, str], ...] = (
    ("decoder.layers.self_attention.linear_qkv._extra_state", ALWAYS),
    ("decoder.layers.self_attention.linear_proj._extra_state", ALWAYS),
    ("decoder.layers.self_attention.q_layernorm._extra_state", ALWAYS),  # TE spec only
    ("decoder.layers.self_attention.k_layernorm._extra_state", ALWAYS),  # TE spec only
    ("decoder.layers.pre_mlp_layernorm._extra_state", MOE),  # TE spec only
    ("decoder.layers.mlp.experts.experts.linear_fc1._extra_state", MOE),
    ("decoder.layers.mlp.experts.experts.linear_fc2._extra_state", MOE),
    ("decoder.layers.mlp.linear_fc1._extra_state", DENSE),
    ("decoder.layers.mlp.linear_fc2._extra_state", DENSE),
    ("decoder.final_layernorm._extra_state", ALWAYS),  # TE spec only
)


def _applies(when: str, args: Qwen3MoeArgs) -> bool:
    return {ALWAYS: True, MOE: args.is_moe, DENSE: not args.is_moe, UNTIED: not args.tie_word_embeddings}[when]


def rules(args: Qwen3MoeArgs) -> List[Rule]:
    return [rule for rule in RULES if _applies(rule.when, args)]


def extra_state_shapes(args: Qwen3MoeArgs) -> Dict[str, Tuple[int, ...]]:
    """Every ``_extra_state`` object key of this model and its grid: [layers(, experts)], or (1,)."""
    shapes = {}
    for key, when in EXTRA_STATES:
        if _applies(when, args):
            per_layer, per_expert = key.startswith(LAYER_PREFIX), ".experts." in key
            shapes[key] = ((args.num_layers,) + ((args.num_experts,) if per_expert else ())) if per_layer else (1,)
    return shapes


def dims(args: Qwen3MoeArgs) -> Dict[str, int]:
    return dict(
        hidden=args.hidden_size,
        head_dim=args.head_dim,
        q=args.num_attention_heads * args.head_dim,
        kv=args.num_kv_heads * args.head_dim,
        vocab=args.vocab_size,
        ffn=args.ffn_hidden_size,
        experts=args.num_experts or 0,
        moe_ffn=args.moe_ffn_hidden_size or 0,
    )


def hf_shape(weight: HFWeight, args: Qwen3MoeArgs) -> Tuple[int, ...]:
    sizes = dims(args)
    return tuple(sizes[d] for d in weight.shape)


@dataclass(frozen=True)
class Placement:
    """Rows `hf_rows` of HF tensor number `source` are rows `slice_rows` of the Megatron slice.
    `source` None: zero rows (vocabulary padding)."""

    source: Optional[int]
    hf_rows: slice
    slice_rows: slice


def _identity(rows: List[int], args: Qwen3MoeArgs) -> List[Placement]:
    return [Placement(0, slice(0, rows[0]), slice(0, rows[0]))]


def _concat(rows: List[int], args: Qwen3MoeArgs) -> List[Placement]:
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return [Placement(i, slice(0, n), slice(s, s + n)) for i, (s, n) in enumerate(zip(starts, rows))]


def _qkv(rows: List[int], args: Qwen3MoeArgs) -> List[Placement]:
    d, groups = args.head_dim, args.num_kv_heads
    q_rows = args.num_attention_heads // groups * d  # query rows of one group
    group_rows = q_rows + 2 * d
    result = []
    for g in range(groups):
        base = g * group_rows
        result += [
            Placement(0, slice(g * q_rows, (g + 1) * q_rows), slice(base, base + q_rows)),
            Placement(1, slice(g * d, (g + 1) * d), slice(base + q_rows, base + q_rows + d)),
            Placement(2, slice(g * d, (g + 1) * d), slice(base + q_rows + d, base + group_rows)),
        ]
    return result


def _vocab(rows: List[int], args: Qwen3MoeArgs) -> List[Placement]:
    # Padded to Megatron's TP=1 size, as a TP=1 save would store it. Any other TP loads it too:
    # Megatron marks the vocab tensors `allow_shape_mismatch`, zero-fills and reads the overlap.
    vocab, padded = rows[0], padded_vocab_size(rows[0], 1)
    pad = [Placement(None, slice(0, padded - vocab), slice(vocab, padded))] if padded > vocab else []
    return [Placement(0, slice(0, vocab), slice(0, vocab))] + pad


TRANSFORMS = {IDENTITY: _identity, CONCAT: _concat, QKV: _qkv, VOCAB: _vocab}


def placements(rule: Rule, args: Qwen3MoeArgs) -> List[Placement]:
    return TRANSFORMS[rule.transform]([hf_shape(w, args)[0] for w in rule.hf], args)


def slice_shape(rule: Rule, args: Qwen3MoeArgs) -> Tuple[int, ...]:
    """Shape of one layer's (one expert's) part of the Megatron tensor."""
    rows = max(p.slice_rows.stop for p in placements(rule, args))
    return (rows,) + hf_shape(rule.hf[0], args)[1:]


def global_shape(rule: Rule, args: Qwen3MoeArgs) -> Tuple[int, ...]:
    leading = ((args.num_layers,) if rule.per_layer else ()) + ((args.num_experts,) if rule.per_expert else ())
    return leading + slice_shape(rule, args)


@dataclass(frozen=True)
class Slot:
    """One rule applied to one layer (and expert): a single Megatron slice."""

    rule: Rule
    layer: Optional[int] = None
    expert: Optional[int] = None

    def hf_names(self) -> List[str]:
        return [w.name.format(layer=self.layer, expert=self.expert) for w in self.rule.hf]

    @property
    def stage(self) -> str:
        """Progress unit: "layer N" or the tensor itself for embedding, final norm, output layer."""
        return f"layer {self.layer}" if self.layer is not None else self.rule.megatron_key


def slots(args: Qwen3MoeArgs) -> Iterator[Slot]:
    """Every slot in HF checkpoint order: the rules above the layer rules (embedding), each layer,
    then the rules below them (final norm, output layer)."""
    table = rules(args)
    first_layer_rule = next(i for i, r in enumerate(table) if r.per_layer)
    yield from (Slot(r) for r in table[:first_layer_rule])
    for layer in range(args.num_layers):
        for rule in table:
            if rule.per_layer:
                experts = range(args.num_experts) if rule.per_expert else [None]
                yield from (Slot(rule, layer, e) for e in experts)
    yield from (Slot(r) for r in table[first_layer_rule:] if not r.per_layer)


def hf_tensor_shapes(args: Qwen3MoeArgs) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name of this model and its shape, in checkpoint order."""
    return {name: hf_shape(w, args) for slot in slots(args) for name, w in zip(slot.hf_names(), slot.rule.hf)}


def to_hf(rule: Rule, megatron_slice: torch.Tensor, args: Qwen3MoeArgs) -> List[torch.Tensor]:
    """The HF tensors of one Megatron slice (rows past the real vocabulary are dropped)."""
    pieces: List[List[torch.Tensor]] = [[] for _ in rule.hf]
    for p in placements(rule, args):
        if p.source is not None:
            pieces[p.source].append(megatron_slice[p.slice_rows])
    return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in pieces]
