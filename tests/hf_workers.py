"""Bodies of the Hugging Face export checks, run in a fresh process (they build a process group)."""

from __future__ import annotations

import json

import torch


def command_line(rank, world_size, module, argv):
    """``python -m module argv`` in a forked process that has torch and megatron-core imported
    already: (exit code, stdout, stderr). The one-line error contract itself is checked on real
    subprocesses elsewhere; this runs the same main() for the cases around it."""
    import contextlib
    import importlib
    import io
    import logging

    from tests.launch import exit_status

    out, err = io.StringIO(), io.StringIO()
    # main() may find the root logger configured already; its warnings are the user's output too.
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module(module).main(argv)
        except SystemExit as stop:
            code = exit_status(stop)
    logging.getLogger().removeHandler(handler)
    return code, out.getvalue(), err.getvalue()


def convert_then_compare(rank, world_size, load_dir, hf_dir, jsonl_path):
    """The convert command line, then ``compare_with_transformers`` on what it wrote."""
    code, out, err = command_line(rank, world_size, "megatron_lsh.tools.convert",
                                  ["--load", load_dir, "--output", hf_dir])
    assert code == 0, err[-3000:]
    return dict(compare_with_transformers(rank, world_size, load_dir, hf_dir, jsonl_path), convert_output=out)


def compare_with_transformers(rank, world_size, load_dir, hf_dir, jsonl_path):
    """Logits of the megatron model (every expert, LSH off) and of the exported transformers model
    on the same tokens, the loading report, and the tokenizer round trip."""
    from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    import megatron_lsh  # noqa: F401
    from megatron_lsh.tools.loading import load_for_inference

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
    from megatron_lsh.tools.loading import load_for_inference

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


def evaluation_against_plain_forwards(rank, world_size, load_dir, work_dir, windows=3):
    """tools.evaluate's loss on a held-out document of windows x seq-length + 1 tokens,
    and the same loss computed apart: the loaded model's logits on each window (megatron's GPT
    samples are consecutive windows of seq-length + 1 tokens that overlap by one), float64
    cross-entropies summed over every predicted token and divided once. (Megatron's softmax
    spans the padded vocabulary, so this is the megatron model's own forward, not the export's.)"""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    import megatron_lsh  # noqa: F401
    from megatron_lsh.tools.evaluate import evaluate
    from megatron_lsh.tools.loading import load_for_inference, saved_run

    saved, _, _ = saved_run(load_dir)
    length = saved["seq_length"]
    generator = torch.Generator().manual_seed(5)
    # Ordinary pieces only: no end-of-document token, so every position counts.
    document = torch.randint(3, 200, (windows * length + 1,), generator=generator, dtype=torch.int32)
    prefix = f"{work_dir}/held_out"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    builder.add_document(document, [document.numel()])
    builder.finalize(f"{prefix}.idx")
    result = evaluate(load_dir, data_path=prefix, micro_batch_size=1)

    model = load_for_inference(load_dir).model
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows * length, length):
            window = document[start:start + length + 1].long().unsqueeze(0)
            logits = model(window[:, :-1], torch.arange(length).unsqueeze(0), None)
            total += torch.nn.functional.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum").item()
            count += length
    return {"evaluate": result, "reference_loss": total / count, "reference_tokens": count}


def one_process_runs(rank, world_size, gpt_flags, t5_flags, work_dir, valid_jsonl):
    """The whole path on one process, as the fast tier's check of every layer: GPT-MoE
    (Qwen3-MoE layout) and T5-MoE train a few steps with LSH, log, save, resume; then
    evaluation with LSH and the conversion to Hugging Face read the GPT checkpoint back."""
    import megatron_lsh  # noqa: F401
    from megatron_lsh.tools.convert import main as convert
    from megatron_lsh.tools.evaluate import evaluate
    from megatron_lsh.training.arguments import parse_args
    from megatron_lsh.training.gpt_task import GPT_TASK
    from megatron_lsh.training.initialize import destroy_distributed
    from megatron_lsh.training.loop import Trainer
    from megatron_lsh.training.t5_task import T5_TASK, add_t5_args

    histories = {}
    for name, task, flags, extra in (("gpt", GPT_TASK, gpt_flags, None), ("t5", T5_TASK, t5_flags, add_t5_args)):
        for attempt in ("first", "resumed"):
            trainer = Trainer(task, parse_args("test", flags, extra_args=extra))
            trainer.train()
            histories[f"{name} {attempt}"] = trainer.history
            destroy_distributed()
    save = gpt_flags[gpt_flags.index("--save") + 1]
    evaluated = evaluate(save, input_jsonl=valid_jsonl, micro_batch_size=4, max_samples=8, lsh=True)
    destroy_distributed()
    convert(["--load", save, "--output", f"{work_dir}/hf"])
    return {"histories": histories, "evaluated": evaluated}


def import_and_compare(rank, world_size, cases):
    """Per case (hf_dir, save_dir, back_dir, upcycle), in one process: ``import_one``."""
    return [import_one(*case) for case in cases]


def import_one(hf_dir, save_dir, back_dir, upcycle):
    """Import a Hugging Face model (upcycling a dense one when ``upcycle``), and compare logits:
    megatron-lsh's of the import against transformers' of the original, and (no upcycling)
    transformers' of the import converted back against the original's."""
    from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    import megatron_lsh  # noqa: F401
    from megatron_lsh.tools.convert import convert
    from megatron_lsh.tools.import_hf import import_hf
    from megatron_lsh.tools.loading import load_for_inference

    flags = import_hf(hf_dir, save_dir, upcycle=upcycle)
    loaded = load_for_inference(save_dir)
    seq2seq = loaded.task_name == "T5-MoE"
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    original = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab = original.config.vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    decoder_ids = ids[:, :10]

    def hf_logits(model):
        return model(input_ids=ids, decoder_input_ids=decoder_ids).logits if seq2seq else model(ids).logits

    result = {"flags": flags, "tokenizer": type(loaded.tokenizer).__name__}
    with torch.no_grad():
        theirs = hf_logits(original)
        if seq2seq:
            masks = T5MaskedWordPieceDataset.config_attention_mask(
                ids, decoder_ids, torch.ones_like(ids), torch.ones_like(decoder_ids), use_local=True)
            ours = loaded.model(ids, decoder_ids, *masks)
        else:
            ours = loaded.model(ids, torch.arange(ids.size(1)).unsqueeze(0).expand(2, -1), None)
        result["import_difference"] = (ours[..., :vocab] - theirs).abs().max().item()
        result["logit_scale"] = theirs.abs().max().item()
        if not upcycle:
            convert(save_dir, back_dir)
            back = auto.from_pretrained(back_dir, dtype=torch.float32).eval()
            result["round_trip_difference"] = (hf_logits(back) - theirs).abs().max().item()
            result["back_architecture"] = type(back).__name__
    text = "The king speaks of the crown.\nA fool dreams of the sea!"
    result["same_ids"] = loaded.tokenizer.tokenize(text) == AutoTokenizer.from_pretrained(hf_dir)(
        text, add_special_tokens=False).input_ids
    return result


def logits_on_random_ids(rank, world_size, load_dir, hf_dir):
    """The megatron model's (every expert, LSH off) and the exported model's logits on the same
    random token ids (a checkpoint without a tokenizer to export): the largest difference, the
    logits' scale and the loading report."""
    from transformers import AutoModelForCausalLM

    import megatron_lsh  # noqa: F401
    from megatron_lsh.tools.loading import load_for_inference

    loaded = load_for_inference(load_dir)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        megatron_logits = loaded.model(ids, torch.arange(ids.size(1)).expand_as(ids), None)
        hf_logits = hf.eval()(ids).logits
    vocab = hf_logits.size(-1)
    return {"architecture": type(hf).__name__, "missing_keys": list(info["missing_keys"]),
            "unexpected_keys": list(info["unexpected_keys"]),
            "max_logit_difference": (megatron_logits[..., :vocab] - hf_logits).abs().max().item(),
            "logit_scale": hf_logits.abs().max().item()}
