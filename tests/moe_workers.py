"""Per-rank bodies of the multi-rank MoE tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import torch

import megatron_lsh  # noqa: F401  (CPU workarounds)
from megatron.core.transformer.spec_utils import build_module

from megatron_lsh.moe import LSHTransformerConfig, get_lsh_moe_module_spec
from megatron_lsh.training.initialize import initialize_distributed, set_seed


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
    spec = get_lsh_moe_module_spec(config.num_moe_experts)
    layer = build_module(spec, config=config)
    layer.set_layer_number(1)
    return layer


def stock_vs_lsh_unclustered(rank, world_size, num_experts, topk):
    """Outputs and gradients of the stock layer and of LSH when every row is its own cluster."""
    initialize_distributed(expert_model_parallel_size=world_size, seed=7)
    # Many fine hashes: random Gaussian tokens never share all 16 codes.
    lsh_settings = dict(num_moe_experts=num_experts, moe_router_topk=topk, lsh_num_hashes=16,
                        lsh_num_buckets=8)
    stock = build_moe_layer(moe_config(world_size, lsh_enabled=False, **lsh_settings))
    lsh = build_moe_layer(moe_config(world_size, lsh_enabled=True, **lsh_settings))
    lsh.load_state_dict(stock.state_dict())

    generator = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(16, 2, 64, generator=generator)
    grad = torch.randn(16, 2, 64, generator=generator)
    results = {}
    for name, layer in (("stock", stock), ("lsh", lsh)):
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x)
        out.backward(grad)
        results[name] = {
            "out": out.detach(),
            "grad_in": x.grad.detach(),
            "grad_w": {n: p.main_grad if hasattr(p, "main_grad") else p.grad for n, p in layer.named_parameters()},
        }
    results["stats"] = lsh.token_dispatcher.last_stats
    return results


def train_gpt_moe(rank, world_size, lsh_enabled, steps):
    """Train a 2-layer GPT-MoE on a learnable synthetic language; return the global losses."""
    from megatron_lsh.models import build_gpt_moe_model
    from megatron_lsh.moe import get_compression_tracker
    from megatron_lsh.training.gradients import allreduce_gradients

    initialize_distributed(expert_model_parallel_size=world_size, seed=1234)
    config = moe_config(world_size, lsh_enabled=lsh_enabled, num_layers=2, moe_aux_loss_coeff=1e-2)
    vocab, seq, batch = 64, 32, 4
    model = build_gpt_moe_model(config, vocab_size=vocab, max_sequence_length=seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Sequences that count up from a random start in random steps of 1-3: easy to learn.
    generator = torch.Generator().manual_seed(10 + rank)
    positions = torch.arange(seq).expand(batch, seq)
    losses, rates = [], []
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        stride = torch.randint(1, 4, (batch, 1), generator=generator)
        tokens = (start + stride * torch.arange(seq + 1)) % vocab
        loss = model(tokens[:, :-1], positions, attention_mask=None, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        allreduce_gradients(model.parameters())
        optimizer.step()
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
        stats = get_compression_tracker().take(group=torch.distributed.group.WORLD)
        rates.append({name: s.compression_rate for name, s in stats.items()})
    return {"losses": losses, "rates": rates}
