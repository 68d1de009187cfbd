"""Per-rank bodies of the multi-rank MoE tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import build_module

import megatron_lsh  # noqa: F401  (CPU workarounds)
from megatron_lsh.moe import LSHTransformerConfig, get_lsh_moe_module_spec
from megatron_lsh.training.initialize import initialize_distributed


def moe_config(ep_size: int, lsh_enabled: bool = True, **overrides) -> LSHTransformerConfig:
    settings = dict(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        moe_ffn_hidden_size=128,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=ep_size,
        add_bias_linear=False,
        lsh_enabled=lsh_enabled,
    )
    settings.update(overrides)
    return LSHTransformerConfig(**settings)


def build_moe_layer(config: LSHTransformerConfig):
    spec = get_lsh_moe_module_spec(config.num_moe_experts,
                                   gradient_study=getattr(config, "lsh_gradient_study", None) is not None)
    layer = build_module(spec, config=config)
    layer.set_layer_number(1)
    return layer


def stock_vs_lsh_unclustered(rank, world_size, cases, tensor_parallel=1, expert_parallel=None,
                             expert_tensor_parallel=1):
    """Per case: outputs and gradients of the stock layer and of LSH when every row is its own
    cluster, on the same weights and hence the same router output. With tensor parallelism the
    layer runs sequence-parallel, as megatron-core requires for MoE: each rank feeds its own
    sequence shard. Expert parallel defaults to the world size."""
    expert_parallel = expert_parallel or world_size
    initialize_distributed(
        expert_model_parallel_size=expert_parallel, tensor_model_parallel_size=tensor_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel, seed=7,
    )
    layout = dict(
        tensor_model_parallel_size=tensor_parallel, sequence_parallel=tensor_parallel > 1,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    results = []
    for overrides in cases:
        # Many fine hashes: random Gaussian tokens never share all 16 codes.
        settings = dict(lsh_num_hashes=16, lsh_num_buckets=8, **layout, **overrides)
        stock_settings = {k: v for k, v in settings.items() if not k.startswith("lsh_gradient")}
        stock = build_moe_layer(moe_config(expert_parallel, lsh_enabled=False, **stock_settings))
        lsh = build_moe_layer(moe_config(expert_parallel, lsh_enabled=True, **settings))
        lsh.load_state_dict(stock.state_dict())
        generator = torch.Generator().manual_seed(100 + rank)
        dtype = overrides.get("params_dtype", torch.float32)
        hidden = torch.randn(16, 2, 64, generator=generator).to(dtype)
        grad = torch.randn(16, 2, 64, generator=generator).to(dtype)
        result = {"stats": None}
        for name, layer in (("stock", stock), ("lsh", lsh)):
            x = hidden.clone().requires_grad_(True)
            out, _ = layer(x)
            out.backward(grad)
            result[name] = {
                "out": out.detach(),
                "grad_in": x.grad,
                "grad_params": {n: p.grad for n, p in layer.named_parameters()},
            }
        result["stats"] = lsh.token_dispatcher.last_stats
        dispatcher = lsh.token_dispatcher
        rows_per_expert = dispatcher.routing_map.sum(dim=0)
        own = slice(dispatcher.ep_rank * dispatcher.num_local_experts,
                    (dispatcher.ep_rank + 1) * dispatcher.num_local_experts)
        result["remote_rows"] = int(rows_per_expert.sum() - rows_per_expert[own].sum())
        result["expert_tensor_parallel"] = expert_tensor_parallel
        result["params"] = {n: p.detach() for n, p in stock.named_parameters()}
        results.append(result)
    return results


def hand_routed_tokens(rank, world_size, num_experts, topk, distinct_tokens, num_tokens=48):
    """Tokens drawn from `distinct_tokens` prototypes (all, when None, distinct) and a routing map
    with exactly `topk` experts per token. Rank 0 routes only to its own experts (and its
    neighbour's, when it has fewer than top-k), so it sends nothing to some other ranks."""
    generator = torch.Generator().manual_seed(200 + rank)
    if distinct_tokens is None:
        prototype_of_token = torch.arange(num_tokens)
    else:
        prototype_of_token = torch.randint(0, distinct_tokens, (num_tokens,), generator=generator)
    prototypes = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(300))
    tokens = prototypes[prototype_of_token]
    local_experts = num_experts // world_size
    allowed = max(local_experts, topk) if rank == 0 else num_experts
    scores = torch.rand(num_tokens, allowed, generator=generator)
    chosen = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map.scatter_(1, chosen, True)
    return tokens, prototype_of_token, routing_map


def round_trip(dispatcher, tokens, routing_map, probs):
    """megatron-core's dispatcher round-trip check: dispatch, multiply by probs, combine."""
    hidden, row_probs = dispatcher.dispatch_preprocess(tokens.view(-1, 1, 64), routing_map, probs)
    hidden, row_probs = dispatcher.token_dispatch(hidden, row_probs)
    hidden, tokens_per_expert, row_probs = dispatcher.dispatch_postprocess(hidden, row_probs)
    assert int(tokens_per_expert.sum()) == hidden.size(0)
    hidden = hidden * row_probs.unsqueeze(-1)
    hidden = dispatcher.combine_preprocess(hidden)
    hidden = dispatcher.token_combine(hidden)
    return dispatcher.combine_postprocess(hidden).view(-1, 64)


def round_trip_errors(rank, world_size, cases):
    """Per case (lsh_enabled, compensation, num_experts, topk, distinct tokens, hashes): the
    largest deviation of the round trip from its input, and the compression rate."""
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    results = []
    for lsh_enabled, compensation, num_experts, topk, distinct, hashes in cases:
        layer = build_moe_layer(
            moe_config(
                world_size,
                lsh_enabled=lsh_enabled,
                num_moe_experts=num_experts,
                moe_router_topk=topk,
                moe_router_pre_softmax=topk == 1,
                lsh_compensation=compensation if isinstance(compensation, str)
                else ("residual" if compensation else "none"),
                lsh_num_hashes=hashes,
            )
        )
        tokens, _, routing_map = hand_routed_tokens(rank, world_size, num_experts, topk, distinct)
        probs = routing_map.float() / topk
        restored = round_trip(layer.token_dispatcher, tokens, routing_map, probs)
        stats = getattr(layer.token_dispatcher, "last_stats", None)
        results.append(
            {
                "error": (restored - tokens).abs().max().item(),
                "rate": stats.compression_rate if stats else 1.0,
            }
        )
    return results


class WireCounter:
    """Counts the bytes every all_to_all_single hands to ranks other than the caller."""

    def __init__(self, rank):
        self.rank, self.bytes, self._original = rank, 0, None

    def __enter__(self):
        self._original = torch.distributed.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
            row_bytes = input[0].numel() * input.element_size() if input.numel() else 0
            splits = list(input_split_sizes) if input_split_sizes is not None else None
            if splits is not None:
                self.bytes += (sum(splits) - splits[self.rank]) * row_bytes
            return self._original(output, input, output_split_sizes, input_split_sizes, **kw)

        torch.distributed.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        torch.distributed.all_to_all_single = self._original


def clustered_traffic(rank, world_size, num_experts, topk, distinct, payload_format="bf16"):
    """Bytes on the wire for stock and LSH dispatch of bf16 tokens drawn from a few prototypes
    (plus tiny noise), both all-to-alls sending ``payload_format``, with the LSH stats, the
    round trip's error and the cluster counts the prototypes imply."""
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    tokens, prototype_of_token, routing_map = hand_routed_tokens(
        rank, world_size, num_experts, topk, distinct, num_tokens=256
    )
    tokens = tokens + 1e-4 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(9))
    tokens = tokens.bfloat16()
    probs = routing_map.float() * torch.rand(routing_map.shape, generator=torch.Generator().manual_seed(rank))
    probs = probs.bfloat16()
    formats = dict(moe_dispatch_fwd_dtype=payload_format, moe_combine_fwd_dtype=payload_format)
    wire, stock_stats = {}, None
    for lsh_enabled in (False, True):
        layer = build_moe_layer(
            moe_config(world_size, lsh_enabled=lsh_enabled, num_moe_experts=num_experts,
                       moe_router_topk=topk, lsh_num_hashes=8, **formats)
        )
        with WireCounter(rank) as counter:
            restored = round_trip(layer.token_dispatcher, tokens, routing_map, probs)
        wire["lsh" if lsh_enabled else "stock"] = counter.bytes
        if not lsh_enabled and payload_format != "bf16":
            stock_stats = layer.token_dispatcher.last_stats
            # Each token comes back as the sum of its routed copies weighted by their probs.
            expected = tokens.float() * probs.float().sum(dim=1, keepdim=True)
            stock_error = ((restored.float() - expected).norm() / expected.norm()).item()
    local = num_experts // world_size
    pairs = {(p, e) for t, p in enumerate(prototype_of_token.tolist())
             for e in routing_map[t].nonzero().flatten().tolist()}
    remote_pairs = [pe for pe in pairs if pe[1] // local != rank]
    remote_rows = int(sum(routing_map[:, e].sum() for e in range(num_experts) if e // local != rank))
    return {
        "wire": wire,
        "stats": layer.token_dispatcher.last_stats,
        "stock_stats": stock_stats,
        "stock_round_trip_error": stock_error if stock_stats is not None else None,
        "expected_centroids": len(pairs),
        "expected_remote_centroids": len(remote_pairs),
        "expected_remote_rows": remote_rows,
    }


def train_gpt_moe(rank, world_size, lsh_enabled, steps):
    """The GPT-MoE pretraining loop (pretrain_gpt_moe.py's) on mock data: the logged losses and
    per-layer compression rates."""
    from megatron_lsh.training.arguments import parse_args
    from megatron_lsh.training.gpt_task import GPT_TASK
    from megatron_lsh.training.loop import Trainer

    argv = [
        "--mock-data", "--vocab-size", "64", "--seq-length", "32", "--num-layers", "2",
        "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "4",
        "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2",
        "--expert-model-parallel-size", str(world_size), "--micro-batch-size", "4",
        "--train-iters", str(steps), "--lr", "3e-3", "--lr-decay-style", "constant",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
        "--lsh" if lsh_enabled else "--no-lsh",
    ]
    trainer = Trainer(GPT_TASK, parse_args("test", argv))
    trainer.train()
    rows = [row for row in trainer.history if "lm loss" in row]
    prefix = "lsh compression rate/"
    return {
        "losses": [row["lm loss"] for row in rows],
        "rates": [{k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)} for row in rows],
    }


def scoped_traffic(rank, world_size, scope, ranks_per_node):
    """Tokens from a few prototypes dispatched with ``lsh_scope`` on nodes of ``ranks_per_node``
    ranks: the stats, the bytes the all-to-alls carried, and what the prototypes imply."""
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    num_experts, topk = 8, 2
    tokens, prototype_of_token, routing_map = hand_routed_tokens(
        rank, world_size, num_experts, topk, 6, num_tokens=256
    )
    tokens = tokens + 1e-4 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(9))
    tokens = tokens.bfloat16()
    probs = (routing_map.float() / topk).bfloat16()
    layer = build_moe_layer(
        moe_config(world_size, num_moe_experts=num_experts, moe_router_topk=topk, lsh_num_hashes=8,
                   lsh_scope=scope, lsh_ranks_per_node=ranks_per_node)
    )
    with WireCounter(rank) as counter:
        restored = round_trip(layer.token_dispatcher, tokens, routing_map, probs)
    local = num_experts // world_size
    node_of_expert = [e // local // ranks_per_node for e in range(num_experts)]
    my_node = rank // ranks_per_node
    pairs = {(p, e) for t, p in enumerate(prototype_of_token.tolist())
             for e in routing_map[t].nonzero().flatten().tolist()}
    rows_per_expert = routing_map.sum(dim=0).tolist()
    off_node = [e for e in range(num_experts) if node_of_expert[e] != my_node]
    only_same_node = ~routing_map[:, off_node].any(dim=1)
    return {
        "stats": layer.token_dispatcher.last_stats,
        "wire": counter.bytes,
        "off_node_pairs": sum(1 for _, e in pairs if e in off_node),
        "off_node_rows": sum(rows_per_expert[e] for e in off_node),
        "same_node_rows": sum(rows_per_expert[e] for e in range(num_experts) if e not in off_node),
        "rows_to_other_ranks": sum(rows_per_expert[e] for e in range(num_experts) if e // local != rank),
        "same_node_pairs_to_other_ranks": sum(
            1 for _, e in pairs if e not in off_node and e // local != rank),
        # Tokens routed only within the node came back exactly as they went.
        "same_node_round_trip_error": (restored - tokens)[only_same_node].abs().max().item()
        if bool(only_same_node.any()) else 0.0,
    }


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the calls that make the host wait for the device on a GPU: reading values
    (.item(), .tolist(), int(), float(), bool(), .numpy(), .cpu()) and ops whose output size
    depends on the data (nonzero, unique, masked_select, bincount, boolean-mask indexing,
    repeat_interleave without output_size)."""

    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"}
    DATA_SIZED = {"nonzero", "argwhere", "unique", "unique_consecutive", "_unique2", "masked_select", "bincount"}
    MARKER = "# NOTE: device-to-host sync"

    def __init__(self):
        super().__init__()
        self.calls = []
        self.our_sites = []  # (file, line, source) of each call made from megatron_lsh's own code

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        counted = None
        if name in self.READS or name in self.DATA_SIZED:
            counted = name
        elif name in ("__getitem__", "__setitem__") and self._has_mask(args[1]):
            counted = f"{name}[mask]"
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            counted = "repeat_interleave"
        elif name == "to" and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device"))):
            counted = "to(cpu)"
        if counted is not None:
            self.calls.append(counted)
            self._note_site()
        return func(*args, **kwargs)

    def _note_site(self):
        import linecache
        import sys

        frame = sys._getframe(2)
        while frame is not None and "/torch/" in frame.f_code.co_filename:  # torch's own wrappers
            frame = frame.f_back
        if frame is not None and "/megatron_lsh/" in frame.f_code.co_filename:  # not megatron-core's
            path, line = frame.f_code.co_filename, frame.f_lineno
            self.our_sites.append((path, line, linecache.getline(path, line).strip()))

    def unmarked_sites(self):
        """Our syncs whose line lacks the marker every host sync on the training path carries."""
        return sorted({site for site in self.our_sites if self.MARKER not in site[2]})

    @staticmethod
    def _has_mask(index):
        indices = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def host_syncs_per_layer_step(rank, world_size, cases):
    """Per case (config overrides, merge threshold or None): the host syncs of one MoE layer's
    forward and backward, stock and LSH on the same weights, after one warm-up step (projections
    drawn, buffers made). Clustering runs as on a GPU (no rows gathered: COMPACT_ROWS_ON_CPU)."""
    from megatron_lsh.lsh import clustering

    clustering.COMPACT_ROWS_ON_CPU = False
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    results = []
    for overrides, threshold in cases:
        counts = {}
        for name, lsh_enabled in (("stock", False), ("lsh", True)):
            layer = build_moe_layer(moe_config(world_size, lsh_enabled=lsh_enabled, **overrides))
            if lsh_enabled and threshold is not None:
                layer.token_dispatcher.merge_threshold = threshold
            hidden = torch.randn(32, 2, 64, generator=torch.Generator().manual_seed(rank))
            for step in range(2):
                x = hidden.clone().requires_grad_(True)
                counter = HostSyncCounter()
                with counter:
                    out, _ = layer(x)
                    out.sum().backward()
            counts[name] = counter.calls
            counts[f"{name} unmarked"] = counter.unmarked_sites()
        results.append(counts)
    return results


def merged_clusters_against_reference(rank, world_size):
    """An LSH layer whose clusters really merge (1 hash of 2 buckets: about two clusters per
    expert), against a reference written apart: route with the layer's router, group each
    expert's rows by the dispatcher's hash buckets, average each group, run that expert's MLP
    (weights gathered from every rank) on the average, and give each token the sum over its
    top-k experts of its own prob times its group's output."""
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    config = moe_config(world_size, lsh_num_hashes=1, lsh_num_buckets=2)
    layer = build_moe_layer(config)
    hidden = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(11 + rank))
    with torch.no_grad():
        out, _ = layer(hidden)
        probs, routing_map = layer.router(hidden.view(-1, 64))
    # Every expert's fc1/fc2 weights, in global expert order.
    local = [(e.linear_fc1.weight.detach(), e.linear_fc2.weight.detach()) for e in layer.experts.local_experts]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    weights = [pair for rank_experts in gathered for pair in rank_experts]

    tokens = hidden.view(-1, 64)
    family = layer.token_dispatcher.hash_family(64)
    reference = torch.zeros_like(tokens)
    clusters_seen = 0
    for expert, (fc1, fc2) in enumerate(weights):
        rows = routing_map[:, expert].nonzero().squeeze(1)
        buckets = family.bucket_ids(tokens[rows])
        for bucket in buckets.unique():
            members = rows[buckets == bucket]
            centroid = tokens[members].mean(dim=0)
            output = torch.nn.functional.gelu(centroid @ fc1.T) @ fc2.T
            reference[members] += probs[members, expert].unsqueeze(1) * output
            clusters_seen += 1
    stats = layer.token_dispatcher.last_stats
    return {"max_difference": (out.view(-1, 64) - reference).abs().max().item(),
            "scale": reference.abs().max().item(), "rows": int(routing_map.sum()),
            "clusters_seen": clusters_seen, "stats_centroids": stats.centroids, "stats_rows": stats.tokens}


def _coarse_layers_on_one_input(world_size, settings_by_key):
    """Per key: outputs, input and parameter gradients of one layer (the same weights and input
    for all) built with its settings over coarse hashing (many rows merge)."""
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    generator = torch.Generator().manual_seed(100 + torch.distributed.get_rank())
    hidden = torch.randn(16, 2, 64, generator=generator)
    grad = torch.randn(16, 2, 64, generator=generator)
    results, weights = {}, None
    for key, settings in settings_by_key.items():
        layer = build_moe_layer(moe_config(world_size, lsh_num_hashes=1, lsh_num_buckets=2, **settings))
        if weights is None:
            weights = layer.state_dict()
        layer.load_state_dict(weights)
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x)
        out.backward(grad)
        stats = getattr(layer.token_dispatcher, "last_stats", None)
        results[key] = dict(out=out.detach(), grad_in=x.grad, rate=stats.compression_rate if stats else None,
                            grad_params={n: p.grad for n, p in layer.named_parameters()})
    return results


def gradient_study_modes(rank, world_size, studies):
    """Per study mode, and None for the stock layer, outputs and gradients."""
    return _coarse_layers_on_one_input(world_size, {None: dict(lsh_enabled=False), **{
        study: dict(lsh_gradient_study=study) for study in studies}})


def grouped_gemm_vs_sequential_experts(rank, world_size, cases):
    """Per case: outputs and gradients (input, router weights, every expert parameter) of
    megatron-core's SequentialMLP and of GroupedGemmExperts holding the same weights, on rows
    with the given counts per local expert."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_lsh.moe.experts import GroupedGemmExperts

    initialize_distributed(expert_model_parallel_size=world_size, seed=3)
    results = []
    for counts, overrides in cases:
        config = moe_config(world_size, lsh_enabled=False, **overrides)
        experts_spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts).submodules.experts
        local = config.num_moe_experts // world_size
        groups = get_default_pg_collection()
        sequential = build_module(experts_spec, local, config, pg_collection=groups)
        grouped = GroupedGemmExperts(local, config, experts_spec.submodules, pg_collection=groups)
        grouped.load_state_dict(sequential.state_dict())
        counts = torch.tensor(counts[:local])
        generator = torch.Generator().manual_seed(11)
        rows = torch.randn(int(counts.sum()), config.hidden_size, generator=generator)
        probs = torch.rand(int(counts.sum()), generator=generator)
        measured = []
        for module in (sequential, grouped):
            module.zero_grad()
            inputs, weights = rows.clone().requires_grad_(), probs.clone().requires_grad_()
            output, bias = module(inputs, counts, weights)
            assert bias is None
            (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
            measured.append({"output": output.detach(), "input grad": inputs.grad, "probs grad": weights.grad,
                             **{f"grad {name}": p.grad.clone() for name, p in module.named_parameters()}})
        results.append(measured)
    return results


def fused_vs_unfused_attention(rank, world_size, cases):
    """Per case (query groups, attention mask type, with a padding mask): outputs and the
    gradients of query, key and value of megatron-core's DotProductAttention and of
    FusedDotProductAttention, and whether the fused path ran (torch's SDPA called)."""
    from unittest import mock

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_lsh.models import attention

    initialize_distributed(seed=3)
    results = []
    for groups, mask_type, padded in cases:
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups,
                                   attention_dropout=0.0, use_cpu_initialization=True)
        kind = AttnMaskType[mask_type]
        generator = torch.Generator().manual_seed(5)
        query = torch.randn(12, 2, 4, 16, generator=generator)
        key, value = (torch.randn(12, 2, groups, 16, generator=generator) for _ in range(2))
        mask = None
        if padded:  # [b, 1, sq, sk], True where masked: the last 3 keys of the second sequence
            mask = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
            mask[1, :, :, -3:] = True
        measured = []
        for module_class in (DotProductAttention, attention.FusedDotProductAttention):
            module = module_class(config, layer_number=1, attn_mask_type=kind, attention_type="self")
            inputs = [t.clone().requires_grad_() for t in (query, key, value)]
            with mock.patch.object(attention.F, "scaled_dot_product_attention",
                                   wraps=attention.F.scaled_dot_product_attention) as sdpa:
                output = module(*inputs, attention_mask=mask)
            (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
            measured.append({"output": output.detach(), "fused": sdpa.called,
                             **{f"{name} grad": t.grad for name, t in zip(("query", "key", "value"), inputs)}})
        results.append(measured)
    return results


def attention_modules_of(rank, world_size, flag_sets):
    """For each set of training flags, the core-attention classes of a GPT model's layers."""
    from megatron_lsh.models.gpt import gpt_moe_block_spec
    from megatron_lsh.training.arguments import parse_args, validate_args
    from megatron_lsh.training.config import transformer_config_from_args

    initialize_distributed(seed=3)
    found = []
    for flags in flag_sets:
        args = parse_args("test", flags)
        validate_args(args, 1)
        spec = gpt_moe_block_spec(transformer_config_from_args(args))
        found.append({layer.submodules.self_attention.submodules.core_attention.__name__
                      for layer in spec.layer_specs})
    return found
