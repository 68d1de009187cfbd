"""Command-line flags, named as in Megatron-LM."""

from __future__ import annotations

import argparse

from megatron_lsh.lsh import HASH_TYPES


def add_lsh_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("LSH-MoE")
    group.add_argument(
        "--lsh",
        dest="lsh_enabled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Compress the MoE all-to-all with LSH (--no-lsh: stock megatron-core dispatch).",
    )
    group.add_argument("--lsh-hash-type", choices=HASH_TYPES, default="cross_polytope")
    group.add_argument(
        "--lsh-num-hashes", type=int, default=6, help="Hash functions per token (paper: 6)."
    )
    group.add_argument(
        "--lsh-num-buckets", type=int, default=4, help="Buckets per hash function."
    )
    group.add_argument(
        "--lsh-error-compensation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Give each token E(c) + (x - c) rather than E(c).",
    )
    group.add_argument("--lsh-seed", type=int, default=1234, help="Seed of the projections.")
    group.add_argument(
        "--lsh-redraw-interval",
        type=int,
        default=0,
        help="Draw new projections every N iterations (0: never).",
    )
    return parser


def lsh_config_kwargs(args: argparse.Namespace) -> dict:
    """The LSHTransformerConfig settings the --lsh-* flags give."""
    return dict(
        lsh_enabled=args.lsh_enabled,
        lsh_hash_type=args.lsh_hash_type,
        lsh_num_hashes=args.lsh_num_hashes,
        lsh_num_buckets=args.lsh_num_buckets,
        lsh_error_compensation=args.lsh_error_compensation,
        lsh_seed=args.lsh_seed,
        lsh_redraw_interval=args.lsh_redraw_interval,
    )
