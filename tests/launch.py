"""Launching the pretraining scripts on CPU: torchrun subprocesses as a user starts them, or the
scripts' body on ranks forked from a process that has imported torch and megatron-core once."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from megatron_lsh.training.initialize import free_port

REPO = Path(__file__).resolve().parent.parent
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* lm loss: ([0-9.E+-]+) \|")


def as_flags(defaults: dict, overrides: dict) -> list:
    """Command-line flags from a dict; an override of None drops the flag, True passes it alone."""
    merged = {**defaults, **overrides}
    return [str(item) for flag, value in merged.items() if value is not None
            for item in ((flag,) if value is True else (flag, value))]


def model_flags(corpus, **overrides):
    """A tiny GPT-MoE on the test corpus, 2 ranks, expert parallel 2 (rotary positions and a cosine
    schedule, as the tests' expectations were measured with)."""
    return as_flags({
        "--position-embedding-type": "rope", "--lr-decay-style": "cosine",
        "--num-layers": "2", "--hidden-size": "64", "--num-attention-heads": "4",
        "--seq-length": "64", "--micro-batch-size": "4", "--global-batch-size": "16",
        "--num-experts": "4", "--moe-router-topk": "2", "--moe-aux-loss-coeff": "1e-2",
        "--expert-model-parallel-size": "2", "--lr": "2e-3", "--lr-warmup-iters": "3",
        "--train-data-path": corpus["train"], "--valid-data-path": corpus["valid"],
        "--tokenizer-type": "SentencePieceTokenizer", "--tokenizer-model": corpus["tokenizer"],
        "--num-workers": "0", "--eval-iters": "2",
    }, overrides)


def environment(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def torchrun_command(flags, nproc=2, script="pretrain_gpt_moe.py"):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), str(REPO / script), *flags]


def run_ranks(flags, nproc=2, timeout=600, script="pretrain_gpt_moe.py"):
    """What `script` does under torchrun with these flags, its stdout (rank 0's lines first): the
    script's body, `pretrain`, on nproc ranks that find torchrun's environment (RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_*). The ranks fork from a server that has imported torch
    and megatron-core once, instead of paying a fresh interpreter's start for every rank of every run
    (through torchrun, a 2-rank run of one iteration took 9.5 s on 2 cores, of nine iterations 10.5 s).
    What torchrun itself adds (the launch, signals to every worker, exit codes, the launchers in
    scripts/) is tested through `torchrun_command`."""
    import tempfile

    from tests.distributed import run_distributed

    with tempfile.TemporaryDirectory() as logs:
        codes = run_distributed(pretrain_on_rank, nproc, script, [str(f) for f in flags], logs, timeout=timeout)
        stdout = "".join(Path(logs, f"rank{rank}.out").read_text() for rank in range(nproc))
        stderr = "".join(Path(logs, f"rank{rank}.err").read_text() for rank in range(nproc))
    assert codes == [0] * nproc, f"exit codes {codes}\n" + stdout[-3000:] + stderr[-5000:]
    return stdout


def pretrain_on_rank(rank, world_size, script, flags, logs):
    """One rank of `run_ranks`: the entry script's body with this rank's stdout and stderr (file
    descriptors, so C-level and child-process output too) in logs/rank{rank}.out and .err."""
    import traceback

    from megatron_lsh.training.arguments import parse_args
    from megatron_lsh.training.gpt_task import GPT_TASK
    from megatron_lsh.training.loop import pretrain
    from megatron_lsh.training.t5_task import T5_TASK, add_t5_args

    task, extra = {"pretrain_gpt_moe.py": (GPT_TASK, None), "pretrain_t5_moe.py": (T5_TASK, add_t5_args)}[script]
    os.environ.update(LOCAL_WORLD_SIZE=str(world_size), WANDB_MODE="offline")
    os.environ.pop("WANDB_API_KEY", None)
    os.chdir(REPO)
    code = 0
    with open(Path(logs, f"rank{rank}.out"), "w") as out, open(Path(logs, f"rank{rank}.err"), "w") as err:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            pretrain(task, parse_args(script, flags, extra_args=extra))
        except SystemExit as stop:
            code = exit_status(stop)
        except BaseException:  # the traceback goes where the rank's stderr would have
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
    return code


def exit_status(stop: SystemExit) -> int:
    """The status a process ending with ``stop`` exits with; a message, as the interpreter does,
    goes to stderr."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def convert(load, output):
    """The Hugging Face export as a user runs it: `python -m megatron_lsh.tools.convert`."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_lsh.tools.convert", "--load", str(load), "--output", str(output)],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300,
    )


def losses(output):
    return {int(it): float(loss) for it, loss in LOSS_LINE.findall(output)}


def kill_with_descendants(pid):
    """SIGKILL torchrun and every worker (workers run in sessions of their own)."""
    import psutil

    parent = psutil.Process(pid)
    for process in parent.children(recursive=True) + [parent]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def sigterm_job_at(flags, iteration: int, nproc=2, script="pretrain_gpt_moe.py", timeout=300,
                   whole_group=False) -> str:
    """The script under torchrun, sent SIGTERM once it logs ``iteration``; its output. The job must
    save and stop. By default the signal goes to torchrun's workers (and their data-loader workers
    and checkpoint writers), as torchrun forwards it, and torchrun must exit 0. With
    ``whole_group``, to every process of the job, torchrun included, as SLURM sends it: torchrun
    then ends in its own SignalException (exit 1) once the workers are gone, so the workers'
    clean end is read from the output: rank 0's closing line and no rank's traceback."""
    import psutil

    process = subprocess.Popen(torchrun_command(flags, nproc=nproc, script=script), cwd=REPO, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=whole_group)
    output = []
    for line in process.stdout:
        output.append(line)
        if re.search(rf"iteration\s+{iteration}/", line):
            if whole_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                for worker in psutil.Process(process.pid).children(recursive=True):
                    worker.send_signal(signal.SIGTERM)
            break
    output.append(process.stdout.read())
    output = "".join(output)
    code = process.wait(timeout=timeout)
    if whole_group:
        assert re.search(r"done: iteration \d+", output) and not re.search(r"\[rank\d+\]: Traceback", output), \
            output[-3000:]
    else:
        assert code == 0, output[-3000:]
    return output


def run_pretrain_expecting_error(flags, world_size=1, script="pretrain_gpt_moe.py"):
    """The entry script as a user runs it, one process as rank 0 of `world_size`: bad input must
    stop it before any collective, with exit code 2 and one `error:` line on stderr, no traceback.
    (The one-line contract of the scripts themselves; `pretrain_error` checks messages in-process.)"""
    flags = [*flags, "--lr-warmup-iters", "0"]
    env = environment(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    return the_error_line(result.stderr)


def the_error_line(stderr: str, prefix: str = "error: ") -> str:
    """The one `error:` line bad input must give (`error (rank 0):` once found after start-up, by
    every rank), with no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, stderr
    return errors[0]


def pretrain_error(flags, capfd, monkeypatch, world_size=1, model="gpt", prefix="error: "):
    """What `run_pretrain_expecting_error` checks, in this process: `pretrain` (the entry scripts'
    body) as rank 0 of `world_size` exits 2 with one `error:` line and no traceback. Errors found
    after start-up (data, tokenizer) come from a process group of one, which `pretrain` tears
    down before exiting."""
    from megatron_lsh.training.arguments import parse_args
    from megatron_lsh.training.gpt_task import GPT_TASK
    from megatron_lsh.training.loop import pretrain
    from megatron_lsh.training.t5_task import T5_TASK, add_t5_args

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    task, extra = (GPT_TASK, None) if model == "gpt" else (T5_TASK, add_t5_args)
    capfd.readouterr()
    try:
        pretrain(task, parse_args("test", [*flags, "--lr-warmup-iters", "0"], extra_args=extra))
    except SystemExit as stop:
        assert stop.code == 2, stop.code
    else:
        raise AssertionError("pretrain ran to the end instead of refusing its input")
    return the_error_line(capfd.readouterr().err, prefix)


def kill_at_checkpoint_and_resume(flags_for, tmp_path, killed_after, script="pretrain_gpt_moe.py", nproc=2,
                                  crash_mid_save=False):
    """Losses of an uninterrupted run, and of the same run SIGKILLed right after its checkpoint at
    iteration `killed_after` and resumed from it (only the resumed iterations); the two runs'
    final checkpoints must be equal bit for bit. With crash_mid_save, the killed run also leaves
    what a crash in the middle of saving a later iteration would: a half-written `.partial`
    directory, which the resume must ignore."""
    uninterrupted = losses(run_ranks(flags_for(tmp_path / "uninterrupted"), nproc=nproc, script=script))
    save = tmp_path / "killed"
    process = subprocess.Popen(torchrun_command(flags_for(save), nproc=nproc, script=script), cwd=REPO,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "saved checkpoint" in line and f"iter_{killed_after:07d}" in line:
            kill_with_descendants(process.pid)
            break
    process.wait(timeout=60)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(killed_after)
    if crash_mid_save:
        from megatron_lsh.training.checkpointing import find_latest_checkpoint

        partial = save / f"iter_{killed_after + 1:07d}.partial"
        partial.mkdir()
        (partial / "__0_0.distcp").write_bytes(b"half written")
        assert find_latest_checkpoint(str(save)) == killed_after
    output = run_ranks(flags_for(save), nproc=nproc, script=script)
    assert f"resuming at iteration {killed_after}" in output
    final = int((tmp_path / "uninterrupted" / "latest_checkpointed_iteration.txt").read_text())
    assert_checkpoints_equal(tmp_path / "uninterrupted", save, final, tmp_path)
    return uninterrupted, losses(output)


def checkpoint_tensors(save_dir, iteration: int, scratch) -> dict:
    """Every tensor a checkpoint holds (model, optimizer state), read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = Path(scratch) / f"{Path(save_dir).name}-{iteration}.pt"
    dcp_to_torch_save(str(Path(save_dir) / f"iter_{iteration:07d}"), str(target))
    return {k: v for k, v in torch.load(target, weights_only=False).items() if isinstance(v, torch.Tensor)}


def assert_checkpoints_equal(first, second, iteration: int, scratch) -> None:
    """Bit for bit: the same tensors, every element equal (weights, Adam moments, fp32 masters)."""
    import torch

    a, b = checkpoint_tensors(first, iteration, scratch), checkpoint_tensors(second, iteration, scratch)
    assert sorted(a) == sorted(b)
    assert any("optimizer" in name for name in a), sorted(a)[:10]
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert differing == [], differing[:10]
