"""The speedup projection: its arithmetic on cases small enough to work out by hand, and its
command line."""

import subprocess
import sys

import pytest

from megatron_lsh.projection import Cluster, ModelShape, ProjectionError, project, step_time
from megatron_lsh.projection.cli import main


def model(**overrides):
    settings = dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_experts=8, topk=2, seq_length=128,
                    global_batch_size=32, micro_batch_size=8, vocab_size=1000, bytes_per_value=4)
    settings.update(overrides)
    return ModelShape(**settings)


def cluster(**overrides):
    settings = dict(nodes=2, gpus_per_node=1, intra_node_gbps=100.0, inter_node_gbps=1.0, gpu_tflops=1.0,
                    latency_us=0.0)
    settings.update(overrides)
    return Cluster(**settings)


def test_inter_node_bytes_are_the_rows_bound_for_the_other_node():
    # 2 nodes x 1 GPU: 16 sequences x 128 tokens per GPU, top-2 rows, half to the other node's
    # experts; each row 64 fp32 values forward (dispatch with its fp32 prob, combine) and back.
    stock = step_time(model(), cluster())
    rows_to_other_node = 16 * 128 * 2 / 2
    per_layer = 2 * rows_to_other_node * (2 * 64 * 4 + 4)
    assert stock.a2a_inter_bytes == pytest.approx(2 * per_layer)
    assert stock.a2a_intra_bytes == 0
    assert stock.a2a_s == pytest.approx(2 * per_layer / (1e9 / 8))


def test_gpus_of_a_node_share_its_link():
    one_gpu = step_time(model(global_batch_size=32), cluster(nodes=2, gpus_per_node=1))
    two_gpus = step_time(model(global_batch_size=64, num_experts=8), cluster(nodes=2, gpus_per_node=2))
    # Same tokens per GPU; with 4 GPUs half of each GPU's rows still leave the node, and two GPUs
    # send them through one link.
    assert two_gpus.a2a_inter_bytes == pytest.approx(2 * one_gpu.a2a_inter_bytes)
    assert two_gpus.a2a_intra_bytes > 0


def test_lsh_sends_the_compressed_share_and_experts_compute_on_centroids():
    projection = project(model(), cluster(), 0.25, lsh_overhead=0.0)
    stock, lsh = projection.stock, projection.projected
    prob_share = 4 / (2 * 64 * 4 + 4)  # LSH sends no probabilities
    assert lsh.a2a_inter_bytes == pytest.approx(0.25 * stock.a2a_inter_bytes * (1 - prob_share))
    assert lsh.compute_s < stock.compute_s
    assert projection.speedup > 1
    assert lsh.grad_reduce_s == stock.grad_reduce_s


def test_slower_links_raise_the_all_to_all_share_and_the_speedup():
    fast = project(model(), cluster(inter_node_gbps=100.0), 0.25)
    slow = project(model(), cluster(inter_node_gbps=0.1), 0.25)
    assert slow.stock.a2a_share > fast.stock.a2a_share
    assert slow.speedup > fast.speedup


def test_inter_node_scope_leaves_intra_node_rows_exact():
    layout = cluster(nodes=2, gpus_per_node=2)
    shape = model(global_batch_size=64)
    every_row = project(shape, layout, 0.25, scope="all").projected
    inter_only = project(shape, layout, 0.25, scope="inter-node").projected
    stock = step_time(shape, layout)
    assert inter_only.a2a_inter_bytes == pytest.approx(every_row.a2a_inter_bytes)
    assert inter_only.a2a_intra_bytes == pytest.approx(stock.a2a_intra_bytes * (2 * 64 * 4) / (2 * 64 * 4 + 4))
    assert every_row.a2a_intra_bytes < inter_only.a2a_intra_bytes


def test_one_node_has_no_inter_node_traffic():
    step = step_time(model(global_batch_size=64), cluster(nodes=1, gpus_per_node=2))
    assert step.a2a_inter_bytes == 0 and step.grad_inter_bytes == 0


def test_per_layer_rates_must_match_the_moe_layers():
    with pytest.raises(ProjectionError, match="2 MoE layers"):
        project(model(), cluster(), [0.2, 0.3, 0.4])
    with pytest.raises(ProjectionError, match=r"\(0, 1\]"):
        project(model(), cluster(), 1.5)


def test_moe_layer_freq_counts_only_moe_layers_for_the_all_to_all():
    every = step_time(model(num_layers=4), cluster())
    alternate = step_time(model(num_layers=4, moe_layer_pattern=[1, 0, 1, 0]), cluster())
    assert alternate.a2a_inter_bytes == pytest.approx(every.a2a_inter_bytes / 2)


def test_command_line_prints_both_step_times_the_share_the_speedup_and_its_assumptions(capsys):
    code = main(["--num-layers", "4", "--hidden-size", "1024", "--num-experts", "16", "--moe-layer-freq", "2",
                 "--seq-length", "1024", "--global-batch-size", "128", "--nodes", "2", "--gpus-per-node", "8",
                 "--intra-node-gbps", "3600", "--inter-node-gbps", "200", "--gpu-tflops", "300",
                 "--compression", "0.25"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("step time (ms)", "all-to-all share", "speedup with LSH at compression 0.250", "assumptions:",
                 "16 GPUs (2 nodes x 8)"):
        assert text in out


def printed_row(out: str, label: str):
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return [float(value.rstrip("%x")) for value in line[len(label) + line.index(label):].split()]


def test_command_line_values_are_the_hand_worked_ones(capsys):
    """2 nodes x 1 GPU at 1 Gbit/s, bf16, no latency: per MoE layer and step each GPU sends half
    its 16 x 128 x top-2 = 4096 rows to the other node, in four all-to-alls (dispatch and combine,
    forward and backward; the dispatch carries a 4-byte prob both ways), 2 x 2048 x (2 x 128 + 4)
    bytes: 1.065 MB, so two layers take 2.130 MB / (1e9 / 8 B/s) = 17.04 ms. LSH at 0.25 sends a quarter of the rows,
    no probs, and (training's default with --lsh) 8-bit rows: 64 elements and 2 scales in each of the four
    all-to-alls, 2048 x 0.25 x 4 x 66 x 2 layers = 0.270 MB, 2.16 ms."""
    assert main(["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-experts", "8",
                 "--moe-router-topk", "2", "--seq-length", "128", "--global-batch-size", "32",
                 "--micro-batch-size", "8", "--vocab-size", "1000", "--nodes", "2", "--gpus-per-node", "1",
                 "--intra-node-gbps", "100", "--inter-node-gbps", "1", "--gpu-tflops", "1", "--latency-us", "0",
                 "--compression", "0.25"]) == 0
    out = capsys.readouterr().out
    stock_a2a, lsh_a2a = printed_row(out, "all-to-all (ms)")
    assert stock_a2a == pytest.approx(2 * 2 * 2048 * (2 * 128 + 4) / 1.25e8 * 1e3, abs=0.05)
    hand_worked_lsh_a2a = 2 * 2048 * 0.25 * 4 * 66 / 1.25e8 * 1e3
    assert lsh_a2a == pytest.approx(hand_worked_lsh_a2a, abs=0.05)
    steps, computes, grads = (printed_row(out, label) for label in
                              ("step time (ms)", "compute (ms)", "gradient reduce (ms)"))
    assert grads[0] == grads[1]  # LSH leaves the gradient all-reduce alone
    for run in (0, 1):
        assert steps[run] == pytest.approx(computes[run] + [stock_a2a, lsh_a2a][run] + grads[run], abs=0.15)
    shares = printed_row(out, "all-to-all share")
    assert shares[0] == pytest.approx(100 * stock_a2a / steps[0], abs=0.3)
    assert shares[1] == pytest.approx(100 * hand_worked_lsh_a2a / steps[1], abs=0.3)
    speedup = float(out.split("speedup with LSH at compression 0.250 with mxfp8 payloads: ")[1].split("x")[0])
    assert speedup == pytest.approx(steps[0] / steps[1], rel=0.01)
    # Over the one link each node has: the all-to-all bytes and the dense gradients.
    link_mb = printed_row(out, "inter-node MB/node/step")
    assert link_mb[0] == pytest.approx(2 * 2 * 2048 * (2 * 128 + 4) / 1e6 + grads[0] * 1.25e8 / 1e3 / 1e6, abs=0.1)


SMALL_RUN = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-experts", "8",
             "--seq-length", "128", "--global-batch-size", "32", "--micro-batch-size", "8", "--vocab-size", "1000",
             "--nodes", "2", "--gpus-per-node", "1", "--intra-node-gbps", "100", "--inter-node-gbps", "1",
             "--gpu-tflops", "1", "--latency-us", "0"]
MXFP8_ALL = [arg for name in ("dispatch-fwd", "dispatch-bwd", "combine-fwd", "combine-bwd")
             for arg in (f"--moe-{name}-dtype", "mxfp8")]
BF16_ALL = [arg if arg != "mxfp8" else "bf16" for arg in MXFP8_ALL]


def test_each_direction_travels_in_its_payload_format():
    # Per row over the four all-to-alls: 4 x 64 x 2 bytes in bf16, 4 x (64 + 64 / 32) in mxfp8.
    bf16 = project(model(bytes_per_value=2), cluster(), 0.5)
    mxfp8 = project(model(bytes_per_value=2), cluster(), 0.5, payloads={
        "moe_dispatch_fwd_dtype": "mxfp8", "moe_dispatch_bwd_dtype": "mxfp8",
        "moe_combine_fwd_dtype": "mxfp8", "moe_combine_bwd_dtype": "mxfp8"})
    dispatch_only = project(model(bytes_per_value=2), cluster(), 0.5, payloads={
        "moe_dispatch_fwd_dtype": "mxfp8", "moe_combine_bwd_dtype": "mxfp8"})
    assert mxfp8.projected.a2a_inter_bytes == pytest.approx(bf16.projected.a2a_inter_bytes * 4 * 66 / (4 * 128))
    assert dispatch_only.projected.a2a_inter_bytes == pytest.approx(
        bf16.projected.a2a_inter_bytes * (2 * 66 + 2 * 128) / (4 * 128))
    assert mxfp8.stock.a2a_inter_bytes == bf16.stock.a2a_inter_bytes  # stock stays megatron-core's bf16
    assert mxfp8.speedup > dispatch_only.speedup > bf16.speedup


def test_payloads_alone_keep_every_row_and_its_probs_and_cost_no_hashing():
    peer = project(model(bytes_per_value=2), cluster(), None, payloads={
        "moe_dispatch_fwd_dtype": "mxfp8", "moe_dispatch_bwd_dtype": "mxfp8",
        "moe_combine_fwd_dtype": "mxfp8", "moe_combine_bwd_dtype": "mxfp8"})
    assert peer.projected.a2a_inter_bytes == pytest.approx(
        peer.stock.a2a_inter_bytes * (4 * 66 + 2 * 4) / (4 * 128 + 2 * 4))
    assert peer.projected.compute_s == peer.stock.compute_s
    assert "no LSH" in " ".join(peer.assumptions)


def test_command_line_payload_flags_lsh_default_and_payloads_alone(capsys):
    assert main([*SMALL_RUN, "--compression", "0.25", *BF16_ALL]) == 0
    bf16_a2a = printed_row(capsys.readouterr().out, "all-to-all (ms)")[1]
    assert bf16_a2a == pytest.approx(2 * 2048 * 0.25 * 4 * 128 / 1.25e8 * 1e3, abs=0.05)
    assert main([*SMALL_RUN, "--no-lsh", *MXFP8_ALL]) == 0
    out = capsys.readouterr().out
    stock_a2a, peer_a2a = printed_row(out, "all-to-all (ms)")
    assert peer_a2a == pytest.approx(stock_a2a * (4 * 66 + 8) / (4 * 128 + 8), rel=0.01)
    assert "speedup with payloads alone with mxfp8 payloads" in out
    assert main([*SMALL_RUN, "--no-lsh"]) == 0  # training's --no-lsh: megatron-core's bf16
    assert "speedup with payloads alone: 1.00x" in capsys.readouterr().out


def test_command_line_payload_errors_name_the_flag(capsys):
    assert main([*SMALL_RUN]) == 2
    assert "--compression, --compression-from or --no-lsh" in capsys.readouterr().err
    odd_width = [a if a != "64" else "72" for a in SMALL_RUN]
    assert main([*odd_width, "--compression", "0.25"]) == 2  # training's default with --lsh is mxfp8
    err = capsys.readouterr().err
    assert "--moe-dispatch-fwd-dtype mxfp8" in err and "--hidden-size 72" in err
    with pytest.raises(SystemExit):
        main([*SMALL_RUN, "--compression", "0.25", "--moe-combine-fwd-dtype", "fp4"])
    assert "--moe-combine-fwd-dtype" in capsys.readouterr().err


def test_command_line_names_what_is_missing_or_wrong(capsys):
    assert main(["--hidden-size", "64", "--nodes", "2", "--gpus-per-node", "1", "--intra-node-gbps", "10",
                 "--inter-node-gbps", "1", "--gpu-tflops", "1", "--compression", "0.2"]) == 2
    assert "--num-layers" in capsys.readouterr().err
    assert main(["--num-layers", "2", "--hidden-size", "64", "--num-experts", "6", "--seq-length", "128",
                 "--global-batch-size", "32", "--nodes", "2", "--gpus-per-node", "2", "--intra-node-gbps", "10",
                 "--inter-node-gbps", "1", "--gpu-tflops", "1", "--compression", "0.2"]) == 2
    assert "--num-experts 6" in capsys.readouterr().err


def test_compression_from_a_directory_without_lsh_logs_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_lsh.projection", "--num-layers", "2", "--hidden-size", "64",
         "--num-experts", "8", "--seq-length", "128", "--global-batch-size", "32", "--nodes", "2",
         "--gpus-per-node", "1", "--intra-node-gbps", "10", "--inter-node-gbps", "1", "--gpu-tflops", "1",
         "--compression-from", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--compression-from" in result.stderr and "lsh compression rate" in result.stderr


def test_per_layer_rates_come_from_a_runs_tensorboard_logs_second_half(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from megatron_lsh.projection.cli import compression_from_tensorboard

    writer = SummaryWriter(str(tmp_path))
    for step, (first, tenth) in enumerate([(0.9, 0.9), (0.9, 0.9), (0.2, 0.4), (0.3, 0.5)]):
        writer.add_scalar("lsh compression rate/layer_1", first, step)
        writer.add_scalar("lsh compression rate/layer_10", tenth, step)
        writer.add_scalar("lsh compression rate/layer_1 vs tokens", 1.0, step)
        writer.add_scalar("validation lsh compression rate/layer_1", 1.0, step)
    writer.close()
    assert compression_from_tensorboard(str(tmp_path)) == pytest.approx([0.25, 0.45])


def test_each_node_link_carries_2_n_minus_1_over_n_of_the_dense_gradients():
    shape = model(global_batch_size=64)
    gradients = shape.dense_params * 4
    two_nodes = step_time(shape, cluster(nodes=2, gpus_per_node=2))
    assert two_nodes.grad_inter_bytes == pytest.approx(gradients)  # expert parallel 4: no expert copies
    four_nodes = step_time(model(global_batch_size=128), cluster(nodes=4, gpus_per_node=2))
    assert four_nodes.grad_inter_bytes == pytest.approx(1.5 * gradients)
    # Expert parallel 2 on 2 x 2: each expert lives on both nodes, one copy per GPU.
    expert_copies = step_time(shape, cluster(nodes=2, gpus_per_node=2, expert_parallel=2))
    assert expert_copies.grad_inter_bytes == pytest.approx(gradients + 2 * shape.expert_params / 2 * 4)
