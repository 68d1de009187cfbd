"""LSHTransformerConfig: megatron-core's TransformerConfig plus the LSH-MoE settings.

Each setting is one field here, documented once: the training flags, the evaluation CLI's
overrides, the dispatcher's check and what checkpoints of older runs lack are all derived from
these fields (``added_settings``). Adding a setting is a field and its check.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lsh.lsh.clustering import SPLITS
from megatron_lsh.lsh.hashing import HASH_TYPES, MAX_TOTAL_BUCKETS
from megatron_lsh.moe.payload import PAYLOAD_FORMATS, ROUNDINGS, PayloadFormatError, check_payload_format
from megatron_lsh.moe.topology import LSH_SCOPES


class LSHConfigError(ValueError):
    """A configuration that LSH-MoE cannot run; the message names the setting to change, in the
    config's terms (``name=value``, ``None`` for unset): the training scripts reword it in flags.

    setting: the setting whose value is refused: the one a message starts with as ``name=value``
    (None when the message is about several).
    """

    def __init__(self, message: str):
        super().__init__(message)
        named = re.match(r"(\w+)=", message)
        self.setting = named.group(1) if named else None


COMPENSATIONS = ("none", "residual", "expert_gain")
GRADIENT_STUDIES = ("exact_gradients", "exact_values", "lsh_input_gradients", "lsh_expert_gradients")

# What training runs with plain --lsh (the config's own defaults are the paper's fixed hashing):
# every token within the bound of its centroid, as few centroids as that allows found over 16
# levels of hashes, sent as 8-bit payloads; --no-lsh keeps megatron-core's bf16 dispatch.
# docs/quality_study.md measures why (and why not bisection, docs/speed_study.md).
TRAINING_DEFAULT_BOUND = 0.3
TRAINING_DEFAULT_HASHES = 16

# Dispatcher types whose all-to-all LSH compresses.
LSH_DISPATCHER_TYPES = ("alltoall",)


@dataclass(frozen=True)
class WithAndWithoutLSH:
    """A training flag's default that depends on --lsh/--no-lsh (the LSH default's payloads are
    8-bit; stock dispatch stays megatron-core's)."""

    with_lsh: Any
    without_lsh: Any

    def __str__(self) -> str:
        return f"{self.with_lsh} with --lsh, {self.without_lsh} with --no-lsh"

    def value(self, lsh_enabled: bool) -> Any:
        return self.with_lsh if lsh_enabled else self.without_lsh


LSH_PAYLOADS = WithAndWithoutLSH("mxfp8", "bf16")


def setting(default, doc: str, *, value_type: Optional[type] = None, choices: Optional[Tuple] = None,
            flag: Optional[str] = "", off: Optional[str] = None, flag_default: Any = MISSING,
            evaluation_override: bool = False, before_it_existed: Any = MISSING) -> Field:
    """A config field with what the command line, the evaluation CLI and checkpoint loading
    need to know about it.

    value_type: int, float, str or bool (default: the type of ``default``).
    flag: the flag's name; "" derives it (``lsh_num_hashes`` -> ``--lsh-num-hashes``), None: no flag.
    off: the word the flag takes for None ('off'), for settings that None switches off.
    flag_default: the flag's default where it differs from the config's (a WithAndWithoutLSH:
        one for each of --lsh and --no-lsh).
    evaluation_override: ``tools.evaluate`` may replace the run's value with ``--lsh``.
    before_it_existed: what a checkpoint saved before the setting existed ran with: a value, or
        a callable of the saved arguments.
    """
    return field(default=default, metadata={
        "doc": " ".join(doc.split()), "value_type": value_type or type(default), "choices": choices,
        "flag": flag, "off": off, "flag_default": flag_default,
        "evaluation_override": evaluation_override, "before_it_existed": before_it_existed,
    })


def payload_setting(direction: str, evaluation_override: bool = False) -> Field:
    """The payload format setting of one all-to-all direction."""
    return setting(
        "bf16", f"Payload format of {direction}: 'bf16' as computed (counted at 2 bytes an element); "
        "'mxfp8' e4m3 elements with one power-of-two scale per 32 (1.03 bytes an element); 'mxfp4' e2m1 "
        "elements, two a byte, with one power-of-two scale per 32 (0.56 bytes an element); 'nvfp4' e2m1 "
        "elements with one e4m3 scale per 16 under an fp32 scale per row (0.56 bytes an element and 4 a row).",
        choices=PAYLOAD_FORMATS, evaluation_override=evaluation_override, before_it_existed="bf16",
        flag_default=LSH_PAYLOADS)


@dataclass
class LSHTransformerConfig(TransformerConfig):
    """TransformerConfig with LSH-compressed expert-parallel dispatch.

    LSH needs the all-to-all dispatcher, so that is the default here (megatron-core's default
    is 'allgather').
    """

    moe_token_dispatcher_type: str = "alltoall"

    lsh_enabled: bool = setting(
        True, "Compress the MoE all-to-all with LSH. False (--no-lsh): stock megatron-core dispatch.",
        flag="--lsh")

    lsh_hash_type: str = setting(
        "cross_polytope", "Hash family: 'cross_polytope' or 'spherical' (nearest of b random unit vectors).",
        choices=HASH_TYPES, evaluation_override=True)

    lsh_num_hashes: int = setting(
        6, "Hash functions per token; a token's bucket is the tuple of all their codes. More hashes: "
        "finer buckets, more centroids, less error (the paper's default is 6). With an error bound or "
        "a target, the levels of the coarse-to-fine clustering: a cluster splits only as far as it must, "
        "so more levels find the near neighbours that more tokens per rank bring (training's default, 16).",
        evaluation_override=True, flag_default=TRAINING_DEFAULT_HASHES)

    lsh_num_buckets: int = setting(
        4, "Buckets per hash function (even for cross-polytope: b/2 projections and their signs).",
        evaluation_override=True)

    lsh_compensation: str = setting(
        "none", "What a merged token gets back, c its cluster's centroid: 'none' E(c); 'residual' the "
        "paper's E(c) + (x - c); 'expert_gain' E(c) + g_e (x - c), g_e fitted per expert on its own "
        "(c, E(c)) pairs. The other two measured no better than 'none' (docs/quality_study.md).",
        choices=COMPENSATIONS, evaluation_override=True,
        before_it_existed=lambda saved: "residual" if saved.get("lsh_error_compensation") else "none")

    lsh_error_bound: Optional[float] = setting(
        None, "Bound on ||x - c|| / ||x||: a token merges only into a cluster whose centroid is this "
        "close to it, relative to its own norm; clusters that break it are split by further hash "
        "functions, and tokens that still break it travel as themselves. None ('off'): no bound. "
        "Training's default: no token's error beyond it, and bytes as low as it allows.",
        value_type=float, off="off", evaluation_override=True, before_it_existed=None,
        flag_default=TRAINING_DEFAULT_BOUND)

    lsh_split: str = setting(
        "hash", "How a cluster that breaks lsh_error_bound splits: 'hash' by the next hash function (the "
        "levels of coarse-to-fine LSH); 'bisect' in two at its centroid, across its widest spread (one "
        "power-iteration step), up to lsh_num_hashes times: data-dependent cuts that keep clusters as "
        "coarse as the bound allows (fewer rows at the same bound, docs/quality_study.md). 'bisect' needs "
        "lsh_error_bound and no lsh_target_compression.",
        choices=SPLITS, evaluation_override=True, before_it_existed="hash")

    lsh_target_compression: Optional[float] = setting(
        None, "Hold this compression rate (centroids / rows, in (0, 1]) per layer through training: a "
        "controller steers each layer's merge threshold (how much error a cluster may hold before the "
        "next hash splits it) from the rate all-reduced over every rank; lsh_error_bound still holds. "
        "None ('off'): the rate goes where the data (and lsh_error_bound) take it. A layer that cannot "
        "reach the target within the bound is named in the log.",
        value_type=float, off="off", before_it_existed=None)

    lsh_gradient_study: Optional[str] = setting(
        None, "Study only (runs the experts twice): 'exact_gradients' trains with LSH forward values "
        "and the exact MoE's gradients; 'exact_values' the other way round. Separates the two errors. "
        "'lsh_input_gradients': exact values, LSH's gradients on the layer's input only; "
        "'lsh_expert_gradients': exact values, LSH's gradients on the experts' weights only.",
        value_type=str, choices=GRADIENT_STUDIES)

    lsh_scope: str = setting(
        "all", "Which rows LSH may merge: 'all' every row of the all-to-all; 'inter-node' only rows "
        "bound for experts on other nodes, so rows that stay on fast intra-node links travel exact "
        "(nodes as torchrun numbers them, LOCAL_WORLD_SIZE processes each).",
        choices=LSH_SCOPES)

    lsh_ranks_per_node: Optional[int] = setting(
        None, "Processes per node, which tells the dispatcher which peers share its node (scope and "
        "per-link statistics). None: torchrun's LOCAL_WORLD_SIZE.", value_type=int, flag=None)

    moe_dispatch_fwd_dtype: str = payload_setting(
        "the dispatch all-to-all's forward (token rows to their experts; Megatron-LM's name)", evaluation_override=True)

    moe_dispatch_bwd_dtype: str = payload_setting("the dispatch all-to-all's backward (the rows' gradients back to "
                                                  "their tokens)")

    moe_combine_fwd_dtype: str = payload_setting(
        "the combine all-to-all's forward (expert outputs back to their tokens)", evaluation_override=True)

    moe_combine_bwd_dtype: str = payload_setting("the combine all-to-all's backward (the outputs' gradients to the "
                                                 "experts; Megatron-LM's name)")

    moe_payload_bwd_rounding: str = setting(
        "nearest", "How the backward directions' 4-bit payloads (mxfp4, nvfp4) round the gradients they carry: "
        "'nearest' (ties to even) or 'stochastic' (up or down at random, with the probability that keeps the "
        "expected value: the NVFP4 training recipe's choice for gradients). Forward payloads and mxfp8 always "
        "round to nearest.", choices=ROUNDINGS, before_it_existed="nearest")

    lsh_seed: int = setting(1234, "Seed of the hash projections; every rank derives the same projections from it.")

    lsh_redraw_interval: int = setting(0, "Draw new projections every this many training iterations (0: never).")

    def __post_init__(self):
        self._check_lsh_settings()
        super().__post_init__()

    def _check_lsh_settings(self) -> None:
        experts = self.num_moe_experts
        ep_size = self.expert_model_parallel_size
        if experts is not None and ep_size > 0 and experts % ep_size != 0:
            raise LSHConfigError(
                f"num_moe_experts={experts} is not divisible by expert_model_parallel_size="
                f"{ep_size}; every expert-parallel rank must hold the same number of experts"
            )
        self._check_hashing()
        self._check_clustering()
        self._check_payload_formats()
        if not self.lsh_enabled:
            if self.lsh_gradient_study is not None:
                raise LSHConfigError(
                    "lsh_gradient_study compares LSH with the exact MoE, so it needs lsh_enabled=True"
                )
            return
        if self.lsh_compensation == "expert_gain" and (self.expert_tensor_parallel_size or 1) > 1:
            raise LSHConfigError(
                "lsh_compensation='expert_gain' fits gains on whole expert outputs, which expert "
                "tensor parallelism splits; use expert_tensor_parallel_size=1 or another compensation"
            )
        if experts is None:
            raise LSHConfigError(
                "lsh_enabled=True needs an MoE model: set num_moe_experts, or lsh_enabled=False"
            )
        if self.moe_token_dispatcher_type not in LSH_DISPATCHER_TYPES:
            raise LSHConfigError(
                f"lsh_enabled=True compresses the all-to-all dispatcher, but "
                f"moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}; set "
                "moe_token_dispatcher_type='alltoall' or lsh_enabled=False"
            )
        if self.moe_pad_expert_input_to_capacity:
            raise LSHConfigError(
                "lsh_enabled=True cannot be combined with moe_pad_expert_input_to_capacity=True: "
                "padding fixes every expert's row count, which LSH changes; unset one of them"
            )
        if self.moe_router_padding_for_quantization:
            raise LSHConfigError(
                "lsh_enabled=True cannot be combined with moe_router_padding_for_quantization: "
                "unset one of them"
            )

    def _check_hashing(self) -> None:
        """The hash functions: their type, how many, how many buckets, and when they are redrawn."""
        experts = self.num_moe_experts
        if self.lsh_hash_type not in HASH_TYPES:
            raise LSHConfigError(
                f"lsh_hash_type={self.lsh_hash_type!r} is not supported; "
                f"use one of {', '.join(repr(t) for t in HASH_TYPES)}"
            )
        if not isinstance(self.lsh_num_hashes, int) or self.lsh_num_hashes < 1:
            raise LSHConfigError(
                f"lsh_num_hashes={self.lsh_num_hashes!r} must be an integer of at least 1"
            )
        if not isinstance(self.lsh_num_buckets, int) or self.lsh_num_buckets < 2:
            raise LSHConfigError(
                f"lsh_num_buckets={self.lsh_num_buckets!r} must be an integer of at least 2"
            )
        if self.lsh_hash_type == "cross_polytope" and self.lsh_num_buckets % 2:
            raise LSHConfigError(
                f"lsh_num_buckets={self.lsh_num_buckets} must be even for "
                "lsh_hash_type='cross_polytope' (each projection gives two buckets, one per sign)"
            )
        if self.lsh_num_buckets**self.lsh_num_hashes * max(experts or 1, 1) > MAX_TOTAL_BUCKETS:
            raise LSHConfigError(
                f"lsh_num_buckets={self.lsh_num_buckets} and lsh_num_hashes="
                f"{self.lsh_num_hashes} give more bucket ids per expert than int64 cluster keys "
                "hold; lower lsh_num_hashes or lsh_num_buckets"
            )
        if not isinstance(self.lsh_redraw_interval, int) or self.lsh_redraw_interval < 0:
            raise LSHConfigError(
                f"lsh_redraw_interval={self.lsh_redraw_interval!r} must be 0 (never) or a "
                "positive number of iterations"
            )

    def _check_clustering(self) -> None:
        """What merges rows: the bound, the target, the split, the scope, the compensation."""
        if self.lsh_compensation not in COMPENSATIONS:
            raise LSHConfigError(
                f"lsh_compensation={self.lsh_compensation!r} is not supported; "
                f"use one of {', '.join(repr(c) for c in COMPENSATIONS)}"
            )
        bound, target = self.lsh_error_bound, self.lsh_target_compression
        if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise LSHConfigError(
                f"lsh_error_bound={bound!r} must be a positive number (a relative distance "
                "||x - c|| / ||x||, e.g. 0.5), or None for no bound"
            )
        if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise LSHConfigError(
                f"lsh_target_compression={target!r} must be in (0, 1] (centroids per token row, "
                "e.g. 0.2), or None for fixed hashing"
            )
        if self.lsh_scope not in LSH_SCOPES:
            raise LSHConfigError(
                f"lsh_scope={self.lsh_scope!r} is not supported; use one of "
                f"{', '.join(repr(s) for s in LSH_SCOPES)}"
            )
        per_node = self.lsh_ranks_per_node
        if per_node is not None and not (isinstance(per_node, int) and per_node >= 1):
            raise LSHConfigError(f"lsh_ranks_per_node={per_node!r} must be a positive integer or None")
        if self.lsh_gradient_study not in (None, *GRADIENT_STUDIES):
            raise LSHConfigError(
                f"lsh_gradient_study={self.lsh_gradient_study!r} is not supported; use one of "
                f"{', '.join(repr(s) for s in GRADIENT_STUDIES)} or None"
            )
        if self.lsh_split not in SPLITS:
            raise LSHConfigError(
                f"lsh_split={self.lsh_split!r} is not supported; use one of {', '.join(repr(s) for s in SPLITS)}")
        if self.lsh_split == "bisect" and bound is None:
            raise LSHConfigError(
                "lsh_split='bisect' halves clusters until every member is within lsh_error_bound=None: set "
                "lsh_error_bound (e.g. 0.3), or use lsh_split='hash'")
        if self.lsh_split == "bisect" and target is not None:
            raise LSHConfigError(
                f"lsh_split='bisect' cannot hold lsh_target_compression={target} (the controller steers how far "
                "hashes split): set lsh_target_compression=None, or use lsh_split='hash'")

    def payload_formats(self) -> Dict[str, str]:
        """The all-to-alls' payload formats by direction."""
        return {name: getattr(self, name) for name in PAYLOAD_SETTINGS}

    def sends_low_precision(self) -> bool:
        return any(f != "bf16" for f in self.payload_formats().values())

    def _check_payload_formats(self) -> None:
        for name, payload_format in self.payload_formats().items():
            try:
                check_payload_format(payload_format, self.hidden_size)
            except PayloadFormatError as error:
                raise LSHConfigError(f"{name}={payload_format!r}: {error}") from None
        if self.sends_low_precision():
            if self.num_moe_experts is None:
                raise LSHConfigError(
                    "moe_dispatch_fwd_dtype and the other payload formats are formats of the MoE "
                    "all-to-alls; a model without experts has none: leave them 'bf16'")
            if self.moe_token_dispatcher_type not in LSH_DISPATCHER_TYPES:
                raise LSHConfigError(
                    f"low-precision payloads are sent by the all-to-all dispatcher, but "
                    f"moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}; set "
                    "moe_token_dispatcher_type='alltoall' or leave the payload formats 'bf16'")


# The payload format of each all-to-all and direction (dispatch: tokens to experts).
PAYLOAD_SETTINGS = ("moe_dispatch_fwd_dtype", "moe_dispatch_bwd_dtype", "moe_combine_fwd_dtype",
                    "moe_combine_bwd_dtype")


def added_settings() -> List[Field]:
    """The settings LSHTransformerConfig adds to TransformerConfig (LSH and payload formats), in
    declaration order."""
    return [f for f in fields(LSHTransformerConfig) if "doc" in f.metadata]


def flag_named_after(setting_name: str) -> str:
    """Megatron-LM's flag for a config field of that name: ``lsh_num_hashes`` -> ``--lsh-num-hashes``."""
    return "--" + setting_name.replace("_", "-")


def flag_of(config_field: Field) -> Optional[str]:
    """The command-line flag of a setting (None: it has none)."""
    flag = config_field.metadata["flag"]
    return flag_named_after(config_field.name) if flag == "" else flag


def settings_before_they_existed(saved: Dict[str, Any]) -> Dict[str, Any]:
    """What a run saved (as a dict of its arguments) before some settings existed ran with."""
    older = {}
    for config_field in added_settings():
        value = config_field.metadata["before_it_existed"]
        if config_field.name not in saved and value is not MISSING:
            older[config_field.name] = value(saved) if callable(value) else value
    return older
