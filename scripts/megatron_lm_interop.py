"""Checkpoints both ways with Megatron-LM's own checkpointing code, on CPU, one process each.

    python scripts/megatron_lm_interop.py --megatron-lm PATH [--work DIR]

PATH is a Megatron-LM checkout at the release that goes with our megatron-core (core_v0.16.1); its
``megatron/training`` is imported beside the installed megatron-core. The round trip:

1. Megatron-LM's ``save_checkpoint`` writes iteration 7 (28 samples consumed) of a small GPT-MoE
   (megatron-core's local layer spec, bf16) with weights no fresh model has;
2. our trainer resumes from it as Megatron-LM's Mixtral script resumes (``--load`` equal to
   ``--save``, ``--no-load-optim``) and trains two steps at learning rate 0, saving iteration 9;
3. Megatron-LM's ``load_checkpoint`` loads our iteration 9.

It passes when Megatron-LM finds iteration 9, 36 consumed samples, the same state-dict keys, and
every weight equal to what it saved at step 1 (a learning rate of 0 changes none). Not in CI: CI
has no Megatron-LM checkout; tests/test_megatron_lm_checkpoints.py checks the same layout with
megatron-core alone. What this script patches in Megatron-LM for a CUDA-less process (its RNG
calls, the CUDA all-reduce in its tracker read) is below, each with why.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--num-experts", "4", "--moe-router-topk", "2", "--transformer-impl", "local",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--bf16", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
# GPU-only fusions Megatron-LM turns on by default, off for a CPU process (the values do not change).
MEGATRON_LM_CPU = ["--no-persist-layer-norm", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                   "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--distributed-backend", "gloo",
                   "--ckpt-format", "torch_dist", "--lr", "1e-3", "--train-iters", "10", "--save-interval", "5",
                   "--no-load-optim"]
SAVED_AT, CONSUMED, STEPS = 7, 28, 2


def _import_megatron_lm(checkout: str):
    """Megatron-LM's training package from the checkout, megatron-core from the installed package."""
    import torch

    # megatron-core's batch-invariant kernels need Triton, which a CPU machine lacks; Megatron-LM's
    # initialize.py imports them without using them here.
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *args, **kwargs: None
    stub.is_batch_invariant_mode_enabled = lambda: False
    sys.modules[stub.__name__] = stub
    sys.path.append(checkout)  # after site-packages: megatron.core stays the installed one
    import megatron_lsh  # noqa: F401  (megatron-core's CPU workarounds)

    # Megatron-LM saves and restores the CUDA generator's state unconditionally.
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *args, **kwargs: None
    from megatron.training import checkpointing

    def read_metadata(tracker_filename):  # Megatron-LM's, without the CUDA all-reduce (one process)
        text = Path(tracker_filename).read_text().strip()
        return (0, True) if text == "release" else (int(text), False)

    checkpointing.read_metadata = read_metadata
    return checkpointing


def _megatron_lm_model(checkout: str, work: str):
    import torch

    checkpointing = _import_megatron_lm(checkout)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.global_vars import set_args

    sys.argv = ["pretrain_gpt.py", *MODEL, *MEGATRON_LM_CPU, "--save", work, "--load", work]
    args = parse_args()
    validate_args(args)
    args.padded_vocab_size = 1024  # Megatron-LM's padding of NullTokenizer's 1001 ids to 128
    set_args(args)
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size, 1)
    config = core_transformer_config_from_args(args)
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=args.num_experts), vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.seq_length, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    scheduler = OptimizerParamScheduler(
        torch.optim.SGD(model.parameters(), lr=args.lr), init_lr=0.0, max_lr=args.lr, min_lr=0.0, lr_warmup_steps=2,
        lr_decay_steps=args.train_iters, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=args.train_iters, wd_incr_style="constant")
    return checkpointing, args, model, scheduler


def _weights(model) -> dict:
    return {name: value.float().clone() for name, value in model.state_dict().items()
            if not name.endswith("_extra_state")}


def megatron_lm_saves(checkout: str, work: str) -> None:
    import torch

    from megatron_lsh.training.checkpointing import _write_results_in_process

    checkpointing, args, model, scheduler = _megatron_lm_model(checkout, work)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    for _ in range(SAVED_AT):
        scheduler.step(1)
    args.consumed_train_samples = CONSUMED
    _write_results_in_process()  # the writer's helper process cannot start from this script's stdin
    checkpointing.save_checkpoint(SAVED_AT, [model], None, scheduler, 0.0)
    torch.save(_weights(model), os.path.join(work, "megatron_lm_weights.pt"))


def megatron_lm_loads(checkout: str, work: str) -> bool:
    import torch

    checkpointing, args, model, scheduler = _megatron_lm_model(checkout, work)
    model.float()  # bf16 and fp32 checkpoint values alike load exactly
    iteration, _ = checkpointing.load_checkpoint([model], None, scheduler)
    saved, loaded = torch.load(os.path.join(work, "megatron_lm_weights.pt")), _weights(model)
    differing = sorted(set(saved) ^ set(loaded))
    largest = max((saved[name] - loaded[name]).abs().max().item() for name in saved if name in loaded)
    expected = (SAVED_AT + STEPS, CONSUMED + STEPS * args.global_batch_size)
    print(f"Megatron-LM loaded iteration {iteration}, {args.consumed_train_samples} consumed samples "
          f"(expected {expected[0]}, {expected[1]}); state-dict keys differing: {differing or 'none'}; "
          f"largest weight difference: {largest:.3g}")
    return (iteration, args.consumed_train_samples) == expected and not differing and largest == 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", required=True, help="a Megatron-LM checkout at core_v0.16.1")
    parser.add_argument("--work", default=str(REPO / "runs" / "megatron_lm_interop"))
    parser.add_argument("--role", choices=["save", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (Path(args.megatron_lm) / "megatron" / "training" / "checkpointing.py").is_file():
        parser.error(f"--megatron-lm {args.megatron_lm}: no megatron/training/checkpointing.py there")
    if args.role == "save":
        return megatron_lm_saves(args.megatron_lm, args.work)
    if args.role == "load":
        sys.exit(0 if megatron_lm_loads(args.megatron_lm, args.work) else 1)

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29931", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    this = [sys.executable, __file__, "--megatron-lm", args.megatron_lm, "--work", args.work]
    print(f"1. Megatron-LM saves iteration {SAVED_AT} into {args.work}", flush=True)
    subprocess.run([*this, "--role", "save"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"2. megatron-lsh resumes it (--no-load-optim, learning rate 0) to iteration {SAVED_AT + STEPS}", flush=True)
    subprocess.run([sys.executable, str(REPO / "pretrain_gpt_moe.py"), *MODEL, "--mock-data", "--num-workers", "0",
                    "--eval-iters", "0", "--load", args.work, "--save", args.work, "--no-load-optim",
                    "--train-iters", str(SAVED_AT + STEPS), "--lr", "0", "--min-lr", "0", "--weight-decay", "0",
                    "--lr-warmup-iters", "0"], env=env, check=True, cwd=REPO)
    print("3. Megatron-LM loads megatron-lsh's checkpoint", flush=True)
    result = subprocess.run([*this, "--role", "load"], env=env, capture_output=True, text=True)
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("Megatron-LM loaded")))
    if result.returncode:
        print(result.stderr[-3000:])
        sys.exit("FAILED: the round trip changed what Megatron-LM saved")
    print("PASSED: Megatron-LM -> megatron-lsh -> Megatron-LM, weights bit for bit, iteration and samples carried")


if __name__ == "__main__":
    main()
