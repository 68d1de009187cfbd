"""Bodies of the Hugging Face export checks, run in a fresh process (they build a process group)."""

from __future__ import annotations

import json

import torch


def compare_with_transformers(rank, world_size, load_dir, hf_dir, jsonl_path):
    """Logits of the megatron model (every expert, LSH off) and of the exported transformers model
    on the same tokens, the loading report, and the tokenizer round trip."""
    import megatron_lsh  # noqa: F401
    from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from megatron_lsh.checkpoint.loading import load_for_inference

    loaded = load_for_inference(load_dir)
    vocab = loaded.tokenizer.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    documents = [json.loads(line)["text"] for line in open(jsonl_path)]
    ids = torch.tensor([tokenizer(documents[0], add_special_tokens=False).input_ids[:48]])
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        if loaded.task_name == "GPT-MoE":
            hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
            megatron_logits = loaded.model(ids, torch.arange(ids.size(1)).unsqueeze(0), None)
            hf_logits = hf.eval()(ids).logits
        else:
            hf, info = AutoModelForSeq2SeqLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
            sentinel = tokenizer.convert_tokens_to_ids("<extra_id_0>")
            encoder = torch.cat([ids[:, :20], torch.tensor([[sentinel]]), ids[:, 30:]], dim=1)
            decoder = torch.cat([torch.tensor([[loaded.tokenizer.bos, sentinel]]), ids[:, 20:30]], dim=1)
            masks = T5MaskedWordPieceDataset.config_attention_mask(
                encoder, decoder, torch.ones_like(encoder), torch.ones_like(decoder), use_local=True
            )
            megatron_logits = loaded.model(encoder, decoder, *masks)
            hf_logits = hf.eval()(input_ids=encoder, decoder_input_ids=decoder).logits
    del generator
    sentencepiece_ids = [loaded.tokenizer.tokenize(d) for d in documents]
    hf_ids = [tokenizer(d, add_special_tokens=False).input_ids for d in documents]
    config = hf.config
    return {
        "mlp_only_layers": list(getattr(config, "mlp_only_layers", []) or []),
        "dense_mlp_width": getattr(config, "intermediate_size", None),
        "expert_width": getattr(config, "moe_intermediate_size", None),
        "architecture": type(hf).__name__,
        "max_logit_difference": (megatron_logits[..., :vocab] - hf_logits).abs().max().item(),
        "logit_scale": hf_logits.abs().max().item(),
        "missing_keys": list(info["missing_keys"]),
        "unexpected_keys": list(info["unexpected_keys"]),
        "round_trips": all(tokenizer.decode(i) == d for i, d in zip(hf_ids, documents)),
        "same_ids": sum(a == b for a, b in zip(sentencepiece_ids, hf_ids)) / len(documents),
        "special": (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id),
    }


def continuation_log_likelihoods(rank, world_size, load_dir, pairs):
    """log P(continuation | context) from the megatron model (every expert, LSH off), with the
    token split lm-evaluation-harness makes: the whole text encoded, the context's ids first."""
    import megatron_lsh  # noqa: F401

    from megatron_lsh.checkpoint.loading import load_for_inference

    loaded = load_for_inference(load_dir)
    vocab = loaded.tokenizer.vocab_size
    results = []
    with torch.no_grad():
        for context, continuation in pairs:
            whole = loaded.tokenizer.tokenize(context + continuation)
            start = len(loaded.tokenizer.tokenize(context))
            ids = torch.tensor([whole])
            logits = loaded.model(ids, torch.arange(ids.size(1)).unsqueeze(0), None)[0, :, :vocab]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            targets = torch.tensor(whole[start:])
            results.append(log_probs[start - 1:-1].gather(1, targets.unsqueeze(1)).sum().item())
    return results
