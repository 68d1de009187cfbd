"""A checkpoint in Megatron-LM's layout, written and read as Megatron-LM's
``megatron/training/checkpointing.py`` (core_v0.16.1) does, with megatron-core alone: a plain
megatron-core GPTModel of the local layer spec (not our model code), dist_checkpointing, an
argparse Namespace for the arguments. Runs as a script in a one-process gloo group:

    python -m tests.megatron_lm_checkpoint write DIR ITERATION CONSUMED_SAMPLES
    python -m tests.megatron_lm_checkpoint read DIR OUT.json

The model is that of ``FLAGS`` (Megatron-LM's defaults for what they leave out: SwiGLU's ffn
size 2/3 of 4 x hidden rounded down to 64, the vocabulary padded to 128 x tensor-parallel size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--num-experts", "4", "--moe-router-topk", "2", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--bf16", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--mock-data", "--num-workers", "0",
         "--eval-iters", "0", "--log-interval", "1", "--lr-warmup-iters", "0", "--lr", "1e-3"]
PADDED_VOCAB = 1024  # NullTokenizer's 1000 (+1 for its end of document) padded to 128
FFN = 128  # int(4 * 64 * 2 / 3 / 64) * 64


def _process_group():
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import megatron_lsh  # noqa: F401  (megatron-core's CPU workarounds)

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)


def _model():
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=FFN,
                               num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=FFN, normalization="RMSNorm",
                               gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, bf16=True,
                               params_dtype=torch.bfloat16, use_cpu_initialization=True)
    return GPTModel(config, get_gpt_layer_local_spec(num_experts=4), vocab_size=PADDED_VOCAB, max_sequence_length=32,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _sharding_metadata() -> dict:
    from megatron.core import parallel_state

    # What Megatron-LM passes to sharded_state_dict (its _build_sharded_state_dict_metadata).
    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _rng_object(data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # One (pipeline, tensor) shard per model-parallel rank, replicated over data parallelism.
    return ShardedObject("rng_state", data, (1, 1), (0, 0), replica_id=0)


def write(directory: str, iteration: int, consumed: int) -> None:
    import numpy as np
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.enums import AttnBackend

    _process_group()
    model = _model()
    with torch.no_grad():  # weights no fresh model of ours would have
        generator = torch.Generator().manual_seed(5)
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02 + 0.01)
    args = argparse.Namespace(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_experts=4, moe_router_topk=2,
        seq_length=32, max_position_embeddings=32, add_position_embedding=True, position_embedding_type="rope",
        make_vocab_size_divisible_by=128, padded_vocab_size=PADDED_VOCAB, tokenizer_type="NullTokenizer",
        vocab_size=1000, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, world_size=1,
        data_parallel_size=1, consumed_train_samples=consumed, consumed_valid_samples=0, skipped_train_samples=0,
        ckpt_format="torch_dist", use_distributed_optimizer=True, bf16=True, lr=1e-3, no_save_rng=False,
        no_save_optim=False, normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=True,
        group_query_attention=False, num_query_groups=1, qk_layernorm=False, kv_channels=16, moe_layer_freq=1,
        rotary_base=10000, rotary_percent=1.0, encoder_num_layers=2, decoder_num_layers=None,
        # Megatron-LM's destinations for flags ours name differently, and an enum where it keeps one.
        add_bias_linear=False, layernorm_epsilon=1e-5, layernorm_zero_centered_gamma=False,
        attention_backend=AttnBackend.auto,
    )
    random.seed(11)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
           "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    state = {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration,
        "model": model.sharded_state_dict(prefix="", metadata=_sharding_metadata()),
        "opt_param_scheduler": {"max_lr": 1e-3, "lr_warmup_steps": 2, "num_steps": iteration * 4,
                                "lr_decay_style": "cosine", "lr_decay_steps": 40, "min_lr": 0.0, "start_wd": 0.01,
                                "end_wd": 0.01, "wd_incr_style": "constant", "wd_incr_steps": 40},
        "num_floating_point_operations_so_far": 1.0e9, "rng_state": _rng_object([rng]),
    }
    path = os.path.join(directory, f"iter_{iteration:07d}")
    os.makedirs(path)
    dist_checkpointing.save(state, path, content_metadata={"singleton_local_shards": False,
                                                           "chained_optim_avoid_prefix": True})
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def read(directory: str, out: str) -> None:
    """What Megatron-LM's load_checkpoint reads of the checkpoint its tracker names, with
    --no-load-optim: arguments, iteration, the model (strictly, into megatron-core's own GPTModel),
    the RNG streams; their values go to ``out``."""
    import torch
    from megatron.core import dist_checkpointing

    _process_group()
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt")) as f:
        path = os.path.join(directory, f"iter_{int(f.read().strip()):07d}")
    common = dist_checkpointing.load_common_state_dict(path)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    model = _model()
    request = {"model": model.sharded_state_dict(prefix="", metadata={**(metadata or {}), **_sharding_metadata()}),
               "rng_state": _rng_object(None)}
    loaded = dist_checkpointing.load(request, path)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=True)
    rng = loaded["rng_state"][0]
    args = common["args"]
    result = {
        "args_type": type(args).__name__, "checkpoint_version": common["checkpoint_version"],
        "iteration": common["iteration"], "consumed_train_samples": args.consumed_train_samples,
        "scheduler_steps": common["opt_param_scheduler"]["num_steps"],
        "flops": common["num_floating_point_operations_so_far"], "content_metadata": metadata,
        "rng_keys": sorted(rng), "torch_rng_state_bytes": int(rng["torch_rng_state"].numel()),
        "weights": {name: value.float().sum().item() for name, value in model.state_dict().items()
                    if isinstance(value, torch.Tensor) and not name.endswith("_extra_state")},
        "missing": list(missing), "unexpected": list(unexpected),
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        read(sys.argv[2], sys.argv[3])
