"""PSFT of Qwen3-MoE in Megatron-LM's own training loop: ``pretrain_gpt.py`` with megatron-psft's forward step.

What differs from ``pretrain_gpt.py``: the forward step (:class:`megatron_psft.megatron_lm.PsftForwardStep`,
with PSFT's flags added through ``extra_args_provider``), the model provider (the Qwen3-MoE layer spec
megatron-psft uses, so checkpoints move between the two trainers), and the dataset provider (data
preprocessed by ``megatron-psft-preprocess``, with its assistant-only loss mask). Everything else is
Megatron-LM's: arguments, initialisation, DDP, the optimizer and its schedule, logging, checkpoints.

    CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_psft.py \\
        $(python examples/megatron_lm/qwen3_moe_flags.py /models/Qwen3-30B-A3B) \\
        --data-path /data/sft --seq-length 4096 --micro-batch-size 1 --global-batch-size 32 \\
        --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 8 \\
        --moe-token-dispatcher-type alltoall --use-distributed-optimizer --bf16 \\
        --lr 1e-6 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 10 \\
        --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --train-iters 1000 \\
        --tokenizer-type NullTokenizer --load /ckpt/qwen3-30b-a3b-mcore --finetune --save /ckpt/psft \\
        --objective psft --old-policy-interval 8

Without a GPU it runs on CPU processes over gloo (examples/megatron_lm/cpu.py). Needs a megatron-core
wheel with ``megatron.training`` and ``pretrain(cfg_container, ...)``: 0.18 or later (Python 3.12).
"""

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.core import parallel_state  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.training import get_args, pretrain, print_rank_0  # noqa: E402
from megatron.training.argument_utils import (core_transformer_config_from_args,  # noqa: E402
                                              pretrain_cfg_container_from_args)
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

from megatron_psft.config.data import parse_data_prefix  # noqa: E402
from megatron_psft.data import SFTDataset, collate  # noqa: E402
from megatron_psft.data.blend import BlendedDataset  # noqa: E402
from megatron_psft.megatron_lm import add_psft_arguments, check_layout, forward_step_from_args  # noqa: E402
from megatron_psft.models.qwen3_moe.model import layer_spec  # noqa: E402


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM's GPT model from its flags (qwen3_moe_flags.py spells a Qwen3-MoE config as flags),
    with megatron-psft's Qwen3-MoE layer spec: Transformer Engine's where it imports, else the local one."""
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(config), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, vp_stage=vp_stage, pg_collection=pg_collection)


class TrainerOrderDataset(torch.utils.data.Dataset):
    """Preprocessed SFT data in the order megatron-psft's trainer trains it, one padded sample per row.

    Global batch `n` is the trainer's (:meth:`BlendedDataset.batch_indices`), each data-parallel
    rank holding a contiguous share. Megatron-LM's sampler gives rank `r`'s micro-batch `m` of step `n`
    the positions ``n*G + m*b*D + r*b + j`` (G global batch, b micro-batch, D data-parallel ranks): each
    such position holds the sample the trainer puts in that place, so the two trainers see the same rows.
    """

    def __init__(self, samples: BlendedDataset, num_steps: int, global_batch_size: int, micro_batch_size: int,
                 data_parallel_size: int, seq_length: int, seed: int):
        self.samples, self.num_steps, self.seq_length, self.seed = samples, num_steps, seq_length, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return self.num_steps * self.global_batch_size

    def sample_of(self, position: int) -> int:
        step, offset = divmod(position, self.global_batch_size)
        micro_batch, within = divmod(offset, self.micro_batch_size * self.data_parallel_size)
        rank, row = divmod(within, self.micro_batch_size)
        share = self.global_batch_size // self.data_parallel_size
        trainer_offset = rank * share + micro_batch * self.micro_batch_size + row
        return self._global_batch(step)[trainer_offset]

    @functools.lru_cache(maxsize=2)  # every row of a global batch reads it: drawn once, not once per row
    def _global_batch(self, step: int) -> list:
        return self.samples.batch_indices(step, self.global_batch_size, self.seed)

    def __getitem__(self, position: int) -> dict:
        rows = collate([self.samples[self.sample_of(position)]], self.seq_length, self.samples.meta["pad_id"])
        return {key: value[0] for key, value in rows.items()}


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """The training set from ``--data-path PREFIX`` or a weighted blend ``--data-path W1 P1 W2 P2 ...`` of data
    preprocessed by megatron-psft-preprocess, drawn as megatron-psft's trainer draws it; no validation or test split."""
    args = get_args()
    if not args.data_path:
        raise ValueError("--data-path takes prefixes of data preprocessed by megatron-psft-preprocess")
    prefixes, weights = parse_data_prefix(args.data_path)
    print_rank_0(f"> PSFT data from {' '.join(args.data_path)}")
    sources = [SFTDataset(prefix, vocab_size=args.vocab_size) for prefix in prefixes]
    train = TrainerOrderDataset(BlendedDataset(prefixes, sources, weights), args.train_iters,
                                args.global_batch_size, args.micro_batch_size,
                                parallel_state.get_data_parallel_world_size(), args.seq_length, args.seed)
    return train, None, None


# Every rank reads its own rows (no broadcast from tensor-parallel rank 0 as in pretrain_gpt.py).
train_valid_test_datasets_provider.is_distributed = True


def use_prebuilt_dataset_helpers() -> None:
    """megatron-core wheels ship Megatron's dataset index helpers compiled, without their Makefile; Megatron-LM's
    start-up runs make on rank 0 and exits when it fails. This example's data needs no helpers."""
    from megatron.core.datasets import utils

    if not os.path.isfile(os.path.join(os.path.dirname(utils.__file__), "Makefile")):
        utils.compile_helpers = lambda: None


def main() -> None:
    use_prebuilt_dataset_helpers()
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        import cpu

        cpu.apply()
    args = parse_and_validate_args(extra_args_provider=add_psft_arguments,
                                   args_defaults={"tokenizer_type": "NullTokenizer"})
    check_layout(core_transformer_config_from_args(args))  # before any weights are built
    forward_step = forward_step_from_args(args)
    if on_cpu:
        cpu.initialize_model_parallel(args)
    pretrain(pretrain_cfg_container_from_args(args, None), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
