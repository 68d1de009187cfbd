"""--attention-backend flash|fused: causal (or unmasked) attention through torch's
scaled_dot_product_attention computes what megatron-core's unfused attention computes, outputs
and gradients, with grouped queries too; masked attention keeps the unfused path; the flag picks
the module for every layer of a GPT model, and auto picks it only on a GPU."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.moe_workers import attention_modules_of, fused_vs_unfused_attention

# (query groups of 4 heads, mask type, padding mask)
CASES = [(4, "causal", False), (2, "causal", False), (1, "no_mask", False), (4, "padding", True)]


@pytest.mark.slow
def test_fused_attention_equals_megatron_cores_unfused_attention():
    (results,) = run_distributed(fused_vs_unfused_attention, 1, CASES)
    for (groups, mask_type, padded), (unfused, fused) in zip(CASES, results):
        assert not unfused["fused"]
        assert fused["fused"] == (not padded), (groups, mask_type)  # a padding mask stays unfused
        for name in ("output", "query grad", "key grad", "value grad"):
            torch.testing.assert_close(fused[name], unfused[name], rtol=1e-5, atol=1e-5, msg=f"{name} {groups}")


MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--micro-batch-size", "2", "--num-experts", "4", "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--lr", "1e-3", "--train-iters", "1"]


@pytest.mark.slow
def test_the_backend_flag_picks_the_attention_of_every_layer():
    backends = ["flash", "fused", "unfused", "local", "auto"]
    (found,) = run_distributed(attention_modules_of, 1, [[*MODEL, "--attention-backend", b] for b in backends])
    on_cpu_auto = "FusedDotProductAttention" if torch.cuda.is_available() else "DotProductAttention"
    assert dict(zip(backends, found)) == {
        "flash": {"FusedDotProductAttention"}, "fused": {"FusedDotProductAttention"},
        "unfused": {"DotProductAttention"}, "local": {"DotProductAttention"}, "auto": {on_cpu_auto}}


def test_auto_means_fused_kernels_on_a_gpu_only(monkeypatch):
    from megatron.core.transformer.enums import AttnBackend

    from megatron_lsh.models.attention import fused_attention_wanted

    assert fused_attention_wanted(AttnBackend.flash) and not fused_attention_wanted(AttnBackend.unfused)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not fused_attention_wanted(AttnBackend.auto)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_attention_wanted(AttnBackend.auto)


@pytest.mark.slow
def test_training_with_fused_attention_follows_the_unfused_losses():
    from tests.launch import losses, run_ranks

    flags = [*MODEL, "--train-iters", "4", "--global-batch-size", "4", "--attention-dropout", "0", "--hidden-dropout",
             "0", "--num-workers", "0", "--eval-iters", "0", "--log-interval", "1", "--no-lsh",
             "--position-embedding-type", "rope"]
    unfused = losses(run_ranks([*flags, "--attention-backend", "unfused"], nproc=1))
    fused = losses(run_ranks([*flags, "--attention-backend", "flash"], nproc=1))
    assert sorted(fused) == [1, 2, 3, 4]
    for iteration, loss in unfused.items():
        assert fused[iteration] == pytest.approx(loss, rel=1e-4), iteration
