"""Command-line flags, named as in Megatron-LM, and their validation.

Every check here raises ArgumentError naming the flag and what would fix it, before any model,
dataset or process group exists.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING

from megatron_lsh.data.tokenizer import TOKENIZER_TYPES, VOCAB_FILE_TYPES
from megatron_lsh.models.architectures import ARCHITECTURES, ArchitectureFlagError, apply_architecture
from megatron_lsh.moe.config import WithAndWithoutLSH, added_settings, flag_of
from megatron_lsh.training.batch_schedule import BatchScheduleError, batch_calculator, iterations_for_samples


class ArgumentError(ValueError):
    """A flag combination that cannot run; the message names the flag and the fix."""


_OFF = ("off", "none")


class _ResidualCompensationAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, "none" if option_string.startswith("--no-") else "residual")


def _number_or_off(flag: str, value_type: type = float, off: str = "off"):
    """A number, or None for 'off'; the range is checked with the model config (one error line)."""
    def parse(text: str):
        if text.lower() in _OFF:
            return None
        try:
            return value_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number or '{off}', not {text!r}") from None
    return parse


def add_setting_flag(group, config_field, default=MISSING, help_suffix: str = "") -> None:
    """The flag of one LSHTransformerConfig setting, everything taken from its field: name,
    type, choices, the word for None, default (``default`` overrides it) and help."""
    meta, flag = config_field.metadata, flag_of(config_field)
    if default is MISSING:
        default = config_field.default if meta["flag_default"] is MISSING else meta["flag_default"]
    text = meta["doc"] + help_suffix
    if meta["value_type"] is bool:
        group.add_argument(flag, dest=config_field.name, action=argparse.BooleanOptionalAction,
                           default=default, help=text)
        return
    value_type = meta["value_type"]
    if meta["off"] is not None:
        value_type = _number_or_off(flag, value_type, meta["off"])
    shown = meta["off"] if default is None and meta["off"] else default
    if default is not argparse.SUPPRESS and (default is not None or meta["off"]):
        text += f" Default: {shown}."
    if isinstance(default, WithAndWithoutLSH):
        default = None  # chosen once --lsh/--no-lsh is known (set_defaults)
    group.add_argument(flag, dest=config_field.name, type=value_type, choices=meta["choices"], default=default,
                       help=text)


def add_lsh_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per LSHTransformerConfig setting (moe/config.py), plus the paper's name for the
    residual compensation."""
    group = parser.add_argument_group("LSH-MoE")
    for config_field in added_settings():
        if flag_of(config_field) is not None:
            add_setting_flag(group, config_field)
    group.add_argument(
        "--lsh-error-compensation",
        dest="lsh_compensation",
        action=_ResidualCompensationAction,
        nargs=0,
        help="Same as --lsh-compensation residual (--no-lsh-error-compensation: none).",
    )
    group.add_argument("--no-lsh-error-compensation", dest="lsh_compensation",
                       action=_ResidualCompensationAction, nargs=0, help=argparse.SUPPRESS)
    return parser


def lsh_config_kwargs(args: argparse.Namespace) -> dict:
    """The LSHTransformerConfig settings the --lsh-* flags give."""
    return {f.name: getattr(args, f.name) for f in added_settings() if hasattr(args, f.name)}


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None, help="T5: both stacks, unless set apart.")
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 x hidden size.")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None, help="GPT sequence length (T5: encoder's).")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Default: seq length.")
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope", "relative"],
        default=None,
        help="Default: learned_absolute for GPT (Megatron-LM's), relative (T5 buckets) for T5.",
    )
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0, help="Share of each head's dimensions rotated (RoPE).")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Megatron-LM's older name for --position-embedding-type rope.")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="Norm weights stored as offsets from 1 (megatron-core's layernorm_zero_centered_gamma).")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default=None, help="Default: LayerNorm.")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLPs (gated, SiLU).")
    g.add_argument("--activation", choices=["gelu", "relu", "silu"], default=None,
                   help="MLP activation (default gelu; SiLU gating with --swiglu).")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--attention-softmax-scale", type=float, default=None,
                   help="Scale of q.k (default 1/sqrt(head size); T5/Switch use 1.0).")
    g.add_argument("--hf-architecture", choices=ARCHITECTURES, default=None,
                   help="Set every flag the Hugging Face architecture needs, so that "
                        "megatron_lsh.tools.convert can export the checkpoint: mixtral (GPT, MoE in "
                        "every layer), qwen3_moe (GPT, any --moe-layer-freq), switch_transformers (T5).")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="Normalise each head's queries and keys (GPT; Qwen3's q_norm / k_norm).")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only.")
    return parser


def add_moe_args(parser):
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=None, help="Default: 2.")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="Default: ffn hidden size.")
    g.add_argument(
        "--moe-layer-freq",
        type=_layer_freq,
        default=1,
        help="N for an MoE layer every N layers, or a pattern like '[1,0,1,0]'.",
    )
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument(
        "--moe-router-load-balancing-type",
        choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"],
        default="aux_loss",
    )
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default="alltoall")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="Each rank's local experts as one grouped GEMM per projection (torch's grouped_mm; the "
                        "parameters and checkpoints stay those of the sequential experts).")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="DeepSeek-V3's aux-loss-free balancing: a per-expert bias on the routing scores "
                        "(needs --moe-router-score-function sigmoid).")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
                   help="Routing computed in this precision (default: the model's).")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="A shared expert of this FFN width beside the routed ones (its output added).")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="Accepted: the shared expert runs after the routed ones here (same values).")
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs",
                   help="With --moe-expert-capacity-factor: which tokens an expert over capacity drops.")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--sequence-parallel", action="store_true",
        help="Split the sequence over tensor-parallel ranks outside attention and MLP (megatron-core "
        "requires it for MoE with tensor parallelism).",
    )
    g.add_argument(
        "--expert-tensor-parallel-size", type=int, default=None,
        help="Tensor parallelism inside each expert (default: --tensor-model-parallel-size; 1 keeps "
        "experts whole and spends the tensor-parallel ranks on expert parallelism).",
    )
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None,
        help="Interleaved pipeline: layers per model chunk (each rank holds several chunks).",
    )
    return parser


def _layer_freq(value: str):
    value = value.strip()
    if value.startswith("["):
        try:
            pattern = [int(v) for v in value.strip("[]").split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--moe-layer-freq {value!r}: expected like '[1,0,1,0]'")
        if any(v not in (0, 1) for v in pattern):
            raise argparse.ArgumentTypeError(f"--moe-layer-freq {value!r}: entries must be 0 or 1")
        return pattern
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--moe-layer-freq {value!r}: an integer or '[1,0,...]'")


def add_training_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="Default: micro x data parallel.")
    g.add_argument("--train-iters", type=int, default=None,
                   help="Iterations to train; or --train-samples (one of them is required).")
    g.add_argument("--train-samples", type=int, default=None,
                   help="Samples to train (Megatron-LM's sample-based schedule): iterations are --train-samples / "
                        "--global-batch-size, and the learning-rate schedule counts samples (--lr-warmup-samples, "
                        "--lr-decay-samples, --lr-wsd-decay-samples).")
    g.add_argument("--exit-interval", type=int, default=None, help="Stop after this iteration.")
    g.add_argument(
        "--exit-duration-in-mins", type=float, default=None,
        help="Save and stop once the run has taken this many minutes (every rank, after a whole step).",
    )
    g.add_argument(
        "--exit-signal-handler", action="store_true",
        help="On SIGTERM (SLURM's warning before its time limit, preemption), finish the step, save and exit 0.",
    )
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        default="linear",  # Megatron-LM's
    )
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default: train iters.")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="Warmup as a fraction of the decay (Megatron-LM's), instead of --lr-warmup-iters/-samples.")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="With --train-samples.")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="With --train-samples. Default: train samples.")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="With --train-samples.")
    g.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"], default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping.")
    g.add_argument(
        "--use-distributed-optimizer", action="store_true",
        help="Shard the optimizer state (Adam moments, fp32 master weights) over data-parallel ranks.",
    )
    g.add_argument(
        "--overlap-grad-reduce", action="store_true",
        help="Start each gradient bucket's data-parallel reduction during the last micro-batch's backward.",
    )
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations, fp32 master weights.")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 parameters and activations, fp32 master weights, the loss scaled (dynamically unless "
                        "--loss-scale); a step whose gradients overflow is skipped and the scale lowered.")
    g.add_argument("--loss-scale", type=float, default=None, help="A constant loss scale (fp16); default: dynamic.")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000,
                   help="Steps without overflow before the dynamic scale doubles.")
    g.add_argument("--hysteresis", type=int, default=2, help="Overflows tolerated before the dynamic scale halves.")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="Grow the global batch from START by INCREMENT over SAMPLES samples (Megatron-LM's, "
                        "megatron-core's micro-batch calculator).")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's older name for --recompute-granularity selective.")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="Recompute activations in the backward instead of keeping them: full (whole layers, see "
                        "--recompute-method) or selective (--recompute-modules, default the attention core).")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="With full: uniform (groups of --recompute-num-layers layers) or block (the first "
                        "--recompute-num-layers layers of each stage).")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None,
                   help="With selective: core_attn, mlp, moe, layernorm, moe_act, ... (megatron-core's names).")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    return parser


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, help="Prefixes, optionally weighted: [w1] p1 [w2] p2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    g.add_argument("--train-data-path", nargs="+", default=None)
    g.add_argument("--valid-data-path", nargs="+", default=None)
    g.add_argument("--test-data-path", nargs="+", default=None)
    g.add_argument("--mock-data", action="store_true", help="Random tokens; no files needed.")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2, help="Data loader processes per rank.")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer's vocab.json, BertWordPiece*'s vocab.txt.")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges.")
    g.add_argument("--vocab-extra-ids", type=int, default=0,
                   help="T5 sentinels <extra_id_N>: appended to BertWordPiece* vocabularies; other tokenizers must "
                        "hold them (T5's default: 100).")
    g.add_argument("--tiktoken-pattern", choices=("v1", "v2"), default=None, help="TikTokenizer's split pattern.")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    g.add_argument("--tokenizer-special-tokens", nargs="+", default=None, help="TikTokenizer's special tokens.")
    return parser


def add_megatron_lm_args(parser):
    """Megatron-LM flags its example scripts pass that concern how the model is built and run:
    implemented, accepted as what this build already does (said once at start-up), or refused in
    one line (check_megatron_lm_flags)."""
    g = parser.add_argument_group("Megatron-LM compatibility")
    g.add_argument("--use-mcore-models", action="store_true",
                   help="Accepted: megatron-core's models are the only ones here.")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false",
                   help="Accepted: megatron-core's local layers run unfused softmax here.")
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false",
                   help="Megatron-LM's deprecated flag: accepted with rotary or relative positions (no learned "
                        "table), refused otherwise, as there.")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine", "inference_optimized"],
                   default="local",
                   help="local (megatron-core's local layers, the only ones built here; Megatron-LM's default is "
                        "transformer_engine).")
    g.add_argument("--attention-backend", choices=["auto", "local", "unfused", "flash", "fused"], default="auto",
                   help="flash, fused: causal attention through torch's scaled_dot_product_attention (its fused "
                        "kernels on a GPU); local, unfused: megatron-core's unfused attention; auto: fused on a GPU, "
                        "unfused on CPU. Masked or biased attention (T5) runs unfused whatever this says.")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="Default: nccl with CUDA GPUs, gloo without (Megatron-LM's default is nccl).")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="Accepted: with --use-distributed-optimizer the updated parameters are all-gathered right "
                        "after the step here (the same values; the overlap with the next forward is not built).")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   help="Accepted: rotary embeddings run unfused here.")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="Accepted: activations run unfused here.")
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                   help="Accepted: activations run unfused here.")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false",
                   help="Accepted: bias and dropout run unfused here.")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="Accepted: the loss is megatron-core's unfused vocab-parallel cross entropy (same values).")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="Run the attention softmax in fp32 with --fp16/--bf16 (megatron-core's setting).")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="torch_dist (megatron-core's distributed checkpoint), the only format written here.")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="Read .bin files without memory mapping (megatron-core's IndexedDataset).")
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0,
                   help="Accepted: releases CUDA's cached memory in Megatron-LM; nothing to release on CPU, and "
                        "on a GPU megatron-lsh leaves the cache to torch.")
    g.add_argument("--manual-gc", action="store_true",
                   help="Python's garbage collector off, run every --manual-gc-interval steps (Megatron-LM's).")
    g.add_argument("--manual-gc-interval", type=int, default=0)
    g.add_argument("--no-create-attention-mask-in-dataloader", dest="create_attention_mask_in_dataloader",
                   action="store_false", help="Accepted: the data loader never builds attention masks here.")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="All-reduce gradients in bf16 instead of fp32 (megatron-core DDP's grad_reduce_in_fp32 off).")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (AdamW), the only one built here.")
    g.add_argument("--context-parallel-size", type=int, default=1, help="1: context parallelism is not built here.")
    # Flags that cannot apply here, parsed to be refused in one line (check_megatron_lm_flags).
    for flag in ("--multi-latent-attention", "--fp8-param-gather", "--calculate-per-token-loss", "--profile",
                 "--te-rng-tracker", "--use-pytorch-profiler"):
        g.add_argument(flag, action="store_true", help="Refused here: see the error it gives.")
    for flag, kind in (("--kv-lora-rank", int), ("--q-lora-rank", int), ("--qk-head-dim", int),
                       ("--qk-pos-emb-head-dim", int), ("--v-head-dim", int), ("--rotary-scaling-factor", float),
                       ("--mscale", float), ("--mscale-all-dim", float), ("--fp8-format", str),
                       ("--fp8-amax-history-len", int), ("--fp8-amax-compute-algo", str), ("--fp8-recipe", str),
                       ("--decoupled-lr", float), ("--decoupled-min-lr", float), ("--profile-step-start", int),
                       ("--profile-step-end", int)):
        g.add_argument(flag, type=kind, default=None, help="Refused here (with the flag that needs it), or unused.")
    return parser


# Megatron-LM flags accepted because this build already does what they ask: (dest, value when given, note).
SATISFIED_FLAGS = (
    ("use_mcore_models", True, "--use-mcore-models: megatron-core's models are the only ones here"),
    ("masked_softmax_fusion", False, "--no-masked-softmax-fusion: softmax runs unfused here"),
    ("add_position_embedding", False, "--no-position-embedding: the positions are rotary or relative, no learned "
                                      "table"),
    ("overlap_param_gather", True, "--overlap-param-gather: the distributed optimizer all-gathers the updated "
                                   "parameters right after its step (same values, not overlapped with the forward)"),
    ("apply_rope_fusion", False, "--no-rope-fusion: rotary embeddings run unfused here"),
    ("bias_swiglu_fusion", False, "--no-bias-swiglu-fusion: activations run unfused here"),
    ("bias_gelu_fusion", False, "--no-bias-gelu-fusion: activations run unfused here"),
    ("bias_dropout_fusion", False, "--no-bias-dropout-fusion: bias and dropout run unfused here"),
    ("cross_entropy_loss_fusion", True, "--cross-entropy-loss-fusion: megatron-core's unfused cross entropy "
                                        "(same values)"),
    ("create_attention_mask_in_dataloader", False, "--no-create-attention-mask-in-dataloader: the data loader "
                                                   "never builds attention masks here"),
    ("moe_shared_expert_overlap", True, "--moe-shared-expert-overlap: the shared expert runs after the routed ones "
                                        "(same values)"),
    ("empty_unused_memory_level", 1, "--empty-unused-memory-level: torch keeps its allocator cache here"),
    ("empty_unused_memory_level", 2, "--empty-unused-memory-level: torch keeps its allocator cache here"),
)


def satisfied_flag_notes(args) -> list:
    """One line per Megatron-LM flag given that asks for what this build already does."""
    notes = [f"accepted {note}" for dest, value, note in SATISFIED_FLAGS if getattr(args, dest, None) == value]
    if getattr(args, "tokenizer_type_inferred", False):
        notes.append("no --tokenizer-type: --vocab-file with --merge-file is GPT-2's BPE, so GPT2BPETokenizer")
    if args.rampup_batch_size is not None and args.train_samples is None:
        notes.append("--rampup-batch-size with --train-iters (Megatron-LM refuses the pair): the batch ramps up "
                     "over the samples consumed; the learning-rate schedule counts iterations")
    return notes


def check_megatron_lm_flags(args) -> None:
    """Megatron-LM flags whose request cannot apply here: one ArgumentError naming the flag and
    what to pass instead. Runs after the model's own checks (position embeddings are known)."""
    if not args.add_position_embedding and args.position_embedding_type not in ("rope", "relative"):
        raise ArgumentError("--no-position-embedding is deprecated (as in Megatron-LM): use --position-embedding-type "
                            f"instead of --position-embedding-type {args.position_embedding_type} with it")
    if args.transformer_impl != "local":
        try:
            import transformer_engine  # noqa: F401
            why = "megatron-lsh builds megatron-core's local layers only"
        except ImportError:
            why = "Transformer Engine is not installed, and megatron-lsh builds megatron-core's local layers only"
        raise ArgumentError(f"--transformer-impl {args.transformer_impl}: {why}; pass --transformer-impl local")
    refused = {
        "multi_latent_attention": "--multi-latent-attention (DeepSeek's MLA) is not built here: megatron-lsh builds "
                                  "megatron-core's standard attention; use --group-query-attention",
        "fp8_format": "--fp8-format: fp8 compute needs Transformer Engine, which megatron-lsh does not build; use "
                      "--bf16 (the MoE all-to-alls still carry 8-bit payloads: --moe-dispatch-fwd-dtype mxfp8 ...)",
        "fp8_recipe": "--fp8-recipe: fp8 compute needs Transformer Engine; use --bf16",
        "fp8_param_gather": "--fp8-param-gather: fp8 parameters need Transformer Engine; use --bf16",
        "calculate_per_token_loss": "--calculate-per-token-loss is not built here: the loss is each micro-batch's mean "
                                    "over its tokens, averaged over micro-batches (Megatron-LM's default); drop it",
        "decoupled_lr": "--decoupled-lr (a learning rate of its own for the embeddings) is not built here; drop it",
        "profile": "--profile marks Nsight/torch-profiler ranges in Megatron-LM; megatron-lsh has no profiler hook: "
                   "drop it and run the job under nsys or py-spy",
        "use_pytorch_profiler": "--use-pytorch-profiler: megatron-lsh has no profiler hook; drop it",
        "te_rng_tracker": "--te-rng-tracker is Transformer Engine's; drop it",
    }
    for dest, message in refused.items():
        if getattr(args, dest, None):
            raise ArgumentError(message)
    for dest in ("kv_lora_rank", "q_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "mscale",
                 "mscale_all_dim", "rotary_scaling_factor"):
        if getattr(args, dest, None) is not None:
            raise ArgumentError(f"--{dest.replace('_', '-')} sizes DeepSeek's multi-latent attention or YaRN rotary "
                                "scaling, neither built here; drop it")
    if args.context_parallel_size != 1:
        raise ArgumentError(f"--context-parallel-size {args.context_parallel_size}: context parallelism is not built "
                            "here; pass 1 (or leave it out)")
    if args.optimizer != "adam":
        raise ArgumentError(f"--optimizer {args.optimizer}: megatron-lsh trains with AdamW only; pass --optimizer adam")
    if args.use_rotary_position_embeddings:  # Megatron-LM's older flag
        if args.position_embedding_type not in (None, "rope"):
            raise ArgumentError("--use-rotary-position-embeddings means --position-embedding-type rope; pass one")
        args.position_embedding_type = "rope"
    if args.distributed_backend == "nccl" and not torch_cuda_available():
        raise ArgumentError("--distributed-backend nccl needs CUDA GPUs, and this machine has none: pass "
                            "--distributed-backend gloo (or leave it out)")


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_checkpoint_args(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="Checkpoint directory.")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="Resume from the newest complete checkpoint here.")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="Load the complete checkpoint of this iteration instead of the newest.")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="Load the weights of --load only; start at iteration 0 with a fresh optimizer. A job whose "
                        "--save already holds its own checkpoint resumes from that instead (a resubmitted job).")
    g.add_argument("--ckpt-keep-last", type=int, default=None,
                   help="After each save, delete all but the newest N complete checkpoints under --save "
                        "(default: keep all, as Megatron-LM).")
    g.add_argument("--override-opt_param-scheduler", dest="override_opt_param_scheduler", action="store_true",
                   help="On resume, train with the learning-rate and weight-decay schedule the flags give, not "
                        "the checkpoint's (Megatron-LM's flag).")
    g.add_argument("--use-checkpoint-opt_param-scheduler", dest="use_checkpoint_opt_param_scheduler",
                   action="store_true",
                   help="On resume, keep the checkpoint's schedule whatever the flags say (Megatron-LM's flag). "
                        "Without either, a resume whose schedule flags differ from the checkpoint's is refused.")
    return parser


def add_logging_args(parser):
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-entity", default=None, help="wandb team or user the run is logged under.")
    g.add_argument("--log-throughput", action="store_true",
                   help="Log model TFLOP/s per GPU (Megatron-LM's count: megatron_lsh/training/flops.py); "
                        "also to tensorboard/wandb as 'throughput' with --log-timers-to-tensorboard.")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="Also write Megatron-LM's 'iteration-time' (seconds) and 'throughput' to tensorboard and "
                        "wandb.")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="Also write Megatron-LM's 'lm loss validation ppl' (ours, 'validation lm loss PPL', always "
                        "is).")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true",
                   help="Also write Megatron-LM's 'world-size'.")
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument(
        "--timing-log-level", type=int, choices=[0, 1, 2], default=0,
        help="As Megatron-LM's: 0 (default) times whole steps only; 1 or more also times the MoE "
             "all-to-alls for the logged 'a2a share of step time', synchronising the device around each "
             "one, which removes the overlap of communication and compute a GPU run relies on.",
    )
    return parser


def build_parser(description: str, extra_args=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for add in (add_model_args, add_moe_args, add_training_args, add_data_args,
                add_checkpoint_args, add_logging_args, add_megatron_lm_args, add_lsh_args):
        add(parser)
    if extra_args is not None:
        extra_args(parser)
    return parser


def flag_defaults(extra_args=None) -> dict:
    """Every flag's default, to complete the arguments saved by an older run."""
    parser = build_parser("defaults", extra_args)
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def parse_args(description: str, argv=None, extra_args=None) -> argparse.Namespace:
    args = build_parser(description, extra_args).parse_args(argv)
    set_defaults(args)
    return args


def set_lsh_defaults(args) -> None:
    """The LSH settings whose default depends on --lsh/--no-lsh, once parsed."""
    for config_field in added_settings():
        default = config_field.metadata["flag_default"]
        if isinstance(default, WithAndWithoutLSH) and getattr(args, config_field.name, MISSING) is None:
            setattr(args, config_field.name, default.value(args.lsh_enabled))


def lsh_settings_of_flags(flags) -> dict:
    """The LSH and payload settings a training command line gives (its other flags ignored), with
    today's defaults for the rest: what a run with these flags would run now."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_lsh_args(parser)
    args, _ = parser.parse_known_args(list(flags))
    set_lsh_defaults(args)
    return lsh_config_kwargs(args)


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's: 4 x hidden, or with SwiGLU's three projections two thirds of it, rounded
    down to a multiple of 64 (about the same parameters; at least 64, where Megatron-LM's rule
    gives none below hidden 24)."""
    return max(int(4 * hidden_size * 2 / 3 / 64) * 64, 64) if swiglu else 4 * hidden_size


def set_defaults(args) -> None:
    if getattr(args, "num_experts", 0) is None:  # a dense model: no all-to-all for LSH to compress
        args.lsh_enabled = False
    set_lsh_defaults(args)
    args.ffn_hidden_size = args.ffn_hidden_size or default_ffn_hidden_size(args.hidden_size, args.swiglu)
    if args.num_experts is not None:
        args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters


def apply_hf_architecture(args, model: str) -> None:
    """--hf-architecture: the flags it needs, or an ArgumentError naming the one that contradicts it."""
    try:
        apply_architecture(args, args.hf_architecture, model)
    except ArchitectureFlagError as error:
        raise ArgumentError(str(error)) from None


def validate_gpt_args(args) -> None:
    if args.num_layers is None or args.seq_length is None:
        raise ArgumentError("GPT needs --num-layers and --seq-length")
    if args.hf_architecture:
        apply_hf_architecture(args, "gpt")
    args.position_embedding_type = args.position_embedding_type or "learned_absolute"  # Megatron-LM's default
    if args.position_embedding_type == "relative":
        raise ArgumentError("--position-embedding-type relative is T5's; GPT takes rope or learned_absolute")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.seq_length > args.max_position_embeddings and args.position_embedding_type == "learned_absolute":
        raise ArgumentError(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}"
        )


def _require_files(flag, prefixes):
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ArgumentError(
                    f"{flag}: {prefix}{suffix} does not exist; pass the prefix that "
                    "data_tools/preprocess_data.py printed (without .bin/.idx)"
                )


def data_prefixes(paths):
    """Prefixes of a Megatron blend '[w1] p1 [w2] p2 ...' (weights optional)."""
    if paths is None:
        return []
    try:
        float(paths[0])
    except ValueError:
        return list(paths)
    return list(paths[1::2])


def validate_parallel_layout(args, world_size: int) -> int:
    """Check the tensor / sequence / pipeline / expert layout against the model and the number
    of processes, up front and naming the flag; returns the data-parallel size."""
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    if args.expert_tensor_parallel_size is None:
        # Megatron-LM's default; a dense model has no experts to split.
        args.expert_tensor_parallel_size = tp if args.num_experts is not None else 1
    etp = args.expert_tensor_parallel_size
    for flag, size in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                       ("--expert-tensor-parallel-size", etp)):
        if size < 1:
            raise ArgumentError(f"{flag} {size} must be at least 1")
    if tp > 1 and not args.sequence_parallel and args.num_experts is not None:
        raise ArgumentError(
            f"--tensor-model-parallel-size {tp} with MoE layers needs --sequence-parallel "
            "(megatron-core's MoE layers take sequence-parallel input under tensor parallelism)"
        )

    def product(*sizes):  # the flags of a product of sizes, leaving out the 1s
        named = [f"{flag} {size}" for flag, size in sizes if size > 1] or [f"{sizes[0][0]} 1"]
        return " x ".join(named)

    if world_size % (tp * pp):
        raise ArgumentError(
            f"{product(('--tensor-model-parallel-size', tp), ('--pipeline-model-parallel-size', pp))} "
            f"must divide the number of processes ({world_size})"
        )
    if world_size % (etp * ep * pp):
        sizes = product(("--expert-model-parallel-size", ep), ("--expert-tensor-parallel-size", etp),
                        ("--pipeline-model-parallel-size", pp))
        raise ArgumentError(
            f"{sizes} "
            f"must divide the number of processes ({world_size})"
        )
    if tp == 1:
        args.sequence_parallel = False  # nothing to split, as Megatron-LM does
    for flag, value in (("--num-attention-heads", args.num_attention_heads),
                        ("--num-query-groups", args.num_query_groups if args.group_query_attention else None),
                        ("--ffn-hidden-size", args.ffn_hidden_size)):
        if value is not None and value % tp:
            raise ArgumentError(f"{flag} {value} must be divisible by --tensor-model-parallel-size {tp}")
    moe_ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    if moe_ffn is not None and moe_ffn % etp:
        raise ArgumentError(
            f"--moe-ffn-hidden-size {moe_ffn} must be divisible by --expert-tensor-parallel-size {etp}"
        )
    if etp > 1 and not args.disable_bias_linear and args.num_experts is not None:
        raise ArgumentError(
            f"--expert-tensor-parallel-size {etp}: megatron-core's experts take biases only when "
            "whole; pass --disable-bias-linear or --expert-tensor-parallel-size 1"
        )
    if args.sequence_parallel:
        for flag in ("--seq-length", "--encoder-seq-length", "--decoder-seq-length"):
            length = getattr(args, flag[2:].replace("-", "_"), None)
            if length is not None and length % tp:
                raise ArgumentError(
                    f"{flag} {length} must be divisible by --tensor-model-parallel-size {tp} under "
                    "--sequence-parallel"
                )
    layers_per_chunk = args.num_layers_per_virtual_pipeline_stage
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers is not None and args.num_layers % pp:
        raise ArgumentError(
            f"--num-layers {args.num_layers} must be divisible by --pipeline-model-parallel-size {pp}"
        )
    if layers_per_chunk is not None:
        if pp < 2:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        per_stage = args.num_layers // pp
        if layers_per_chunk < 1 or per_stage % layers_per_chunk:
            raise ArgumentError(
                f"--num-layers-per-virtual-pipeline-stage {layers_per_chunk} must divide the "
                f"{per_stage} layers of each of the {pp} pipeline stages"
            )
        if per_stage // layers_per_chunk > 1:
            args.virtual_pipeline_model_parallel_size = per_stage // layers_per_chunk
    return world_size // (tp * pp)


def _batch_calculator(args):
    try:
        return batch_calculator(args, getattr(args, "data_parallel_size", 1))
    except BatchScheduleError as error:
        raise ArgumentError(str(error)) from None


def set_schedule_steps(args) -> None:
    """The learning-rate schedule's steps, as Megatron-LM counts them: iterations, or with
    --train-samples samples (the scheduler then advances by the global batch each iteration).
    Sets args.train_iters (from --train-samples), lr_warmup_steps, lr_decay_steps,
    lr_wsd_decay_steps, schedule_total_steps and schedule_increment."""
    by_samples = args.train_samples is not None
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in (
        "--lr-warmup-iters", "--lr-decay-iters", "--lr-wsd-decay-iters",
        "--lr-warmup-samples", "--lr-decay-samples", "--lr-wsd-decay-samples")}
    if by_samples:
        if args.train_iters is not None:
            raise ArgumentError("--train-iters and --train-samples: pass one (iterations or samples)")
        wrong = [flag for flag in given if flag.endswith("-iters") and given[flag]]
        if wrong:
            raise ArgumentError(f"{wrong[0]} counts iterations; with --train-samples pass "
                                f"{wrong[0].replace('-iters', '-samples')}")
        args.train_iters = iterations_for_samples(_batch_calculator(args), args.train_samples)
        if args.train_iters < 1:
            raise ArgumentError(f"--train-samples {args.train_samples} is less than one --global-batch-size "
                                f"{args.global_batch_size}")
        decay, warmup = args.lr_decay_samples or args.train_samples, args.lr_warmup_samples
        wsd, total, increment = args.lr_wsd_decay_samples, args.train_samples, args.global_batch_size
        names = ("--lr-warmup-samples", "--lr-decay-samples", "--lr-wsd-decay-samples", "--train-samples")
    else:
        if args.train_iters is None:
            raise ArgumentError("--train-iters or --train-samples is required")
        wrong = [flag for flag in given if flag.endswith("-samples") and given[flag]]
        if wrong:
            raise ArgumentError(f"{wrong[0]} counts samples; pass --train-samples, or "
                                f"{wrong[0].replace('-samples', '-iters')} with --train-iters")
        decay, warmup = args.lr_decay_iters or args.train_iters, args.lr_warmup_iters
        wsd, total, increment = args.lr_wsd_decay_iters, args.train_iters, 1
        names = ("--lr-warmup-iters", "--lr-decay-iters", "--lr-wsd-decay-iters", "--train-iters")
    if args.lr_warmup_fraction is not None:
        if warmup:
            raise ArgumentError(f"--lr-warmup-fraction and {names[0]}: pass one")
        if not 0 <= args.lr_warmup_fraction < 1:
            raise ArgumentError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be at least 0 and below 1")
        warmup = args.lr_warmup_fraction * decay  # Megatron-LM's: a fraction of the decay
    if warmup >= decay:
        raise ArgumentError(f"{names[0]} {warmup} must be smaller than {names[1]} {decay} (which defaults to "
                            f"{names[3]})")
    if args.lr_decay_style == "WSD" and wsd is None:
        raise ArgumentError(f"--lr-decay-style WSD needs {names[2]}")
    args.lr_warmup_steps, args.lr_decay_steps, args.lr_wsd_decay_steps = warmup, decay, wsd
    args.schedule_total_steps, args.schedule_increment = total, increment


# Flags that count something: (flag, smallest value, what to pass instead of a smaller one).
_COUNT_FLAGS = (
    ("--micro-batch-size", 1, None),
    ("--global-batch-size", 1, None),
    ("--train-iters", 1, None),
    ("--train-samples", 1, None),
    ("--lr-warmup-samples", 0, None),
    ("--log-interval", 1, None),
    ("--eval-interval", 1, "--eval-iters 0 turns evaluation off"),
    ("--eval-iters", 0, None),
    ("--save-interval", 1, "leave it out to save only at the end (and on a stop)"),
    ("--exit-interval", 1, None),
    ("--ckpt-keep-last", 1, "leave it out to keep every checkpoint"),
    ("--lr-warmup-iters", 0, None),
    ("--num-workers", 0, None),
)


def _check_counts(args) -> None:
    for flag, smallest, instead in _COUNT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and value < smallest:
            bound = "positive" if smallest == 1 else "zero or more"
            raise ArgumentError(f"{flag} {value} must be {bound}" + (f"; {instead}" if instead else ""))


def check_writable_directory(flag: str, path: str) -> None:
    """``path`` exists or can be made, and a file can be written in it: found before the first
    step, not at the first save."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ArgumentError(f"{flag} {path} is not a writable directory ({error.strerror or error}); "
                            "pass a directory this job can write") from None


def _check_precision_and_recompute(args) -> None:
    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16: pass one (16-bit format of the parameters and activations)")
    if args.loss_scale is not None and not args.fp16:
        raise ArgumentError("--loss-scale scales fp16's loss: pass --fp16 with it, or leave it out")
    if args.recompute_activations:  # Megatron-LM's older flag
        if args.recompute_granularity not in (None, "selective"):
            raise ArgumentError("--recompute-activations means --recompute-granularity selective; pass one of them")
        args.recompute_granularity = "selective"
    if args.recompute_granularity == "full":
        if args.recompute_method is None or not args.recompute_num_layers:
            raise ArgumentError("--recompute-granularity full needs --recompute-method uniform|block and "
                                "--recompute-num-layers N (as in Megatron-LM)")
    elif args.recompute_method is not None or args.recompute_num_layers:
        raise ArgumentError("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only")
    if args.recompute_modules and args.recompute_granularity != "selective":
        raise ArgumentError("--recompute-modules lists what --recompute-granularity selective recomputes; pass it")
    if args.moe_grouped_gemm and (args.expert_tensor_parallel_size or args.tensor_model_parallel_size) > 1:
        raise ArgumentError("--moe-grouped-gemm runs each expert whole on its rank: pass "
                            "--expert-tensor-parallel-size 1 with it")
    if args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
        raise ArgumentError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (DeepSeek-V3's "
                            "routing, as megatron-core requires)")


def validate_args(args, world_size: int) -> None:
    """Everything checkable before start-up; raises ArgumentError naming the flag."""
    _check_counts(args)
    check_megatron_lm_flags(args)
    _check_precision_and_recompute(args)
    ep = args.expert_model_parallel_size
    args.moe_router_topk = args.moe_router_topk or 2
    args.normalization = args.normalization or "LayerNorm"
    if args.group_query_attention and not args.num_query_groups:
        raise ArgumentError("--group-query-attention needs --num-query-groups")
    if args.num_query_groups and args.num_attention_heads % args.num_query_groups:
        raise ArgumentError(
            f"--num-query-groups {args.num_query_groups} must divide --num-attention-heads {args.num_attention_heads}"
        )
    if args.swiglu and args.activation not in (None, "silu"):
        raise ArgumentError(f"--swiglu gates with SiLU; drop --activation {args.activation}")
    if args.num_experts is None:  # a dense model (Megatron-LM's GPT-3 example): nothing for LSH to compress
        if ep != 1:
            raise ArgumentError(f"--expert-model-parallel-size {ep} needs --num-experts (a Mixture-of-Experts model)")
        args.moe_router_topk = None
    elif ep < 1 or args.num_experts % ep:
        raise ArgumentError(
            f"--expert-model-parallel-size {ep} must divide --num-experts {args.num_experts}"
        )
    data_parallel = validate_parallel_layout(args, world_size)
    if args.num_experts is not None and not 1 <= args.moe_router_topk <= args.num_experts:
        raise ArgumentError(
            f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts"
        )
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel
    per_step = args.micro_batch_size * data_parallel
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel} = {per_step}"
        )
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size and args.global_batch_size // per_step < pp:
        raise ArgumentError(
            f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs at least "
            f"--pipeline-model-parallel-size {pp} micro-batches per step; raise --global-batch-size "
            f"{args.global_batch_size} to {pp * per_step} or more"
        )
    if args.hidden_size % args.num_attention_heads:
        raise ArgumentError(
            f"--hidden-size {args.hidden_size} must be divisible by --num-attention-heads "
            f"{args.num_attention_heads}"
        )
    args.data_parallel_size = data_parallel
    _batch_calculator(args)  # a ramp-up the layout cannot follow is refused here, samples or iterations
    set_schedule_steps(args)
    _check_schedule_and_checkpoint_flags(args)
    _check_data_flags(args)
    _check_tokenizer_files(args)


def _check_schedule_and_checkpoint_flags(args) -> None:
    if not 0 <= args.min_lr <= args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler contradict "
                            "each other: pass the one saying whose schedule a resume takes")
    if args.save is not None:
        check_writable_directory("--save", args.save)
    if args.ckpt_step is not None and args.load is None:
        raise ArgumentError("--ckpt-step needs --load DIR")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ArgumentError(f"--exit-duration-in-mins {args.exit_duration_in_mins} must be positive")


def _check_data_flags(args) -> None:
    """--mock-data, or data files that exist and a tokenizer type for them."""
    if args.mock_data:
        if args.tokenizer_type is None:
            args.tokenizer_type = "NullTokenizer"
        if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
            raise ArgumentError("--mock-data with the NullTokenizer needs --vocab-size")
    else:
        per_split = any([args.train_data_path, args.valid_data_path, args.test_data_path])
        if per_split and args.data_path:
            raise ArgumentError("pass either --data-path (with --split) or --train/valid/test-data-path, not both")
        if not per_split and not args.data_path:
            raise ArgumentError("no data: pass --data-path (or --train-data-path ...), or --mock-data")
        if per_split and not args.train_data_path:
            raise ArgumentError("--valid-data-path / --test-data-path need --train-data-path as well")
        for flag, paths in (("--data-path", args.data_path), ("--train-data-path", args.train_data_path),
                            ("--valid-data-path", args.valid_data_path), ("--test-data-path", args.test_data_path)):
            _require_files(flag, data_prefixes(paths))
        if args.tokenizer_type is None and args.vocab_file and args.merge_file:
            # Megatron-LM's GPT-3 example names the files only; they are GPT-2's BPE.
            args.tokenizer_type, args.tokenizer_type_inferred = "GPT2BPETokenizer", True
        if args.tokenizer_type is None:
            raise ArgumentError("--tokenizer-type is required with data files")


def _check_tokenizer_files(args) -> None:
    """The files --tokenizer-type needs, named by their flag (made absolute: saved with the run)."""
    if args.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                               "TikTokenizer"):
        if not args.tokenizer_model:
            raise ArgumentError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
        if not os.path.isfile(args.tokenizer_model):
            raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.tokenizer_type in VOCAB_FILE_TYPES:
        for flag, path in (("--vocab-file", args.vocab_file),
                           ("--merge-file", args.merge_file if args.tokenizer_type == "GPT2BPETokenizer" else "")):
            if path is None:
                raise ArgumentError(f"--tokenizer-type {args.tokenizer_type} needs {flag}")
            if path and not os.path.isfile(path):
                raise ArgumentError(f"{flag} {path}: no such file")
        # Saved with the run: the post-training tools read them from any directory.
        args.vocab_file = os.path.abspath(args.vocab_file)
        args.merge_file = os.path.abspath(args.merge_file) if args.merge_file else None
    if args.tokenizer_type == "HuggingFaceTokenizer":
        if not args.tokenizer_model or not os.path.isdir(args.tokenizer_model):
            raise ArgumentError(f"--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR, a Hugging Face "
                                f"model or tokenizer directory (got {args.tokenizer_model})")
