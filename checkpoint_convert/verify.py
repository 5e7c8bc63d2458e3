"""Check a Megatron checkpoint against its Hugging Face model: same prompts, compare the logits.

    torchrun --nproc-per-node N -m checkpoint_convert.verify --hf-dir HF --megatron-dir CKPT \\
        [--tensor-model-parallel-size 2 --expert-model-parallel-size 2 ...] [--prompts "..." ...]

Both sides run in float32 by default: transformers' Qwen3MoeForCausalLM (on the last rank only) and
the Megatron model loaded from the checkpoint at the layout given. Prompts are tokenized with the HF
tokenizer when the HF directory has one, else random token ids are used. Prints the max |logit diff|
per prompt (Megatron's logits sliced to the real vocabulary) and exits 1 above ``--tolerance``.
"""

import argparse
import math
import os
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_psft import checkpoint
from megatron_psft.platform import parallel
from megatron_psft.models.qwen3_moe import Qwen3MoeArgs, build_model_chunks, transformer_config
from megatron_psft.platform.precision import parse_dtype
from megatron_psft.engine.step import model_forward, run_schedule

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
                   "Proximal supervised fine-tuning keeps the policy close to")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_megatron(megatron_dir: str, layout: parallel.ParallelLayout, iteration: Optional[int] = None,
                  params_dtype: torch.dtype = torch.float32):
    """(args, model chunks) of this rank, weights loaded from the checkpoint. Needs
    ``parallel.initialize(layout)`` first."""
    source = checkpoint.resolve(megatron_dir, iteration)
    args = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(source))
    config = transformer_config(args, layout, params_dtype=params_dtype)
    chunks = build_model_chunks(args, config)
    checkpoint.load_model(source, chunks)
    for chunk in chunks:
        chunk.eval()
    return args, chunks


def megatron_logits(chunks, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """float32 logits ``[batch, seq, vocab_size]`` on last-stage ranks, None on the others (collective).

    With sequence parallelism the sequence is right-padded to a multiple of TP; causal attention
    keeps padding out of the real positions, which are the ones returned."""
    from megatron.core import parallel_state, tensor_parallel

    batch, seq = tokens.shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded_seq = -(-seq // tp) * tp
    device = parallel.device()
    padded = torch.zeros(batch, padded_seq, dtype=torch.long)
    padded[:, :seq] = tokens
    segment_ids = torch.full((batch, padded_seq), -1, dtype=torch.long)
    segment_ids[:, :seq] = torch.arange(batch)[:, None]
    micro_batch = {"tokens": padded.to(device), "segment_ids": segment_ids.to(device),
                   "position_ids": torch.arange(padded_seq, device=device).expand(batch, padded_seq).contiguous()}

    def forward_step(data_iterator, model):
        return model_forward(model, next(data_iterator)), None  # no loss: the schedule keeps outputs

    with torch.no_grad():
        outputs = run_schedule(chunks, [micro_batch], forward_step, forward_only=True)
    if not parallel.is_last_stage():
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0])
    return logits[:, :seq, :vocab_size].float().cpu()


class HFReference:
    """transformers' model for `hf_dir`, loaded once."""

    def __init__(self, hf_dir: str, dtype: torch.dtype = torch.float32):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(tokens).logits.float()


def prompt_tokens(hf_dir: str, prompts: List[str], vocab_size: int, random_length: int = 16) -> List[tuple]:
    """(label, token ids ``[1, seq]``) per prompt: from the HF tokenizer, or fixed random ids without one."""
    if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in TOKENIZER_FILES):
        # (transformers would build an empty tokenizer from the config alone)
        parallel.print_rank_last(f"[verify] no tokenizer in {hf_dir}: random token ids instead of the prompts")
        generator = torch.Generator().manual_seed(0)
        return [(f"random ids #{i}", torch.randint(0, vocab_size, (1, random_length), generator=generator))
                for i in range(len(prompts))]
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    result = [(text, torch.tensor([tokenizer(text)["input_ids"]])) for text in prompts]
    for text, tokens in result:
        if tokens.numel() == 0 or int(tokens.max()) >= vocab_size:
            raise ValueError(f"the tokenizer in {hf_dir} gives no ids or ids past the vocabulary for {text!r}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (the reference)")
    parser.add_argument("--megatron-dir", required=True, help="checkpoint root (or one iter_* directory)")
    parser.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest acceptable max |logit diff|")
    parser.add_argument("--dtype", default="float32", help="dtype of both models (bfloat16 needs a looser tolerance)")
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", "--ep", type=int, default=1)
    parser.add_argument("--expert-tensor-parallel-size", "--etp", type=int, default=None)
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="(switched on by itself for MoE with TP > 1, which requires it)")
    options = parser.parse_args(argv)
    dtype = parse_dtype(options.dtype)

    source = checkpoint.resolve(options.megatron_dir, options.iteration)
    args = Qwen3MoeArgs.from_hf_config(checkpoint.read_hf_config(source))
    tp = options.tensor_model_parallel_size
    layout = parallel.ParallelLayout(
        tensor=tp, pipeline=options.pipeline_model_parallel_size, expert=options.expert_model_parallel_size,
        expert_tensor=options.expert_tensor_parallel_size,
        sequence_parallel=options.sequence_parallel or (tp > 1 and args.is_moe))
    parallel.initialize(layout)
    _, chunks = load_megatron(source, layout, params_dtype=dtype)
    is_reporter = parallel.is_reporting_rank()  # on the last pipeline stage
    reference = HFReference(options.hf_dir, dtype) if is_reporter else None
    worst = 0.0
    for label, tokens in prompt_tokens(options.hf_dir, options.prompts, args.vocab_size):
        logits = megatron_logits(chunks, tokens, args.vocab_size)
        if is_reporter:
            diff = float((logits - reference.logits(tokens)).abs().max())
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
            print(f"[verify] {tokens.shape[1]:4d} tokens  max |logit diff| {diff:.3e}  {label[:40]!r}", flush=True)
    verdict = torch.tensor([worst], device=parallel.device())
    dist.broadcast(verdict, src=dist.get_world_size() - 1)
    worst = float(verdict)
    passed = worst <= options.tolerance
    parallel.print_rank_last(f"[verify] {'PASS' if passed else 'FAIL'}: max |logit diff| {worst:.3e} "
                             f"(tolerance {options.tolerance:g}) at {layout}")
    parallel.destroy()
    dist.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
