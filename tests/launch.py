"""Launching the pretraining scripts as a user does: torchrun subprocesses on CPU."""

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
    """A tiny GPT-MoE on the test corpus, 2 ranks, expert parallel 2."""
    return as_flags({
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


def torchrun(flags, nproc=2, timeout=600, script="pretrain_gpt_moe.py"):
    result = subprocess.run(torchrun_command(flags, nproc, script), cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


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


def run_pretrain_expecting_error(flags, world_size=1, script="pretrain_gpt_moe.py"):
    """One process, as rank 0 of `world_size`: bad input must stop it before any collective."""
    flags = [*flags, "--lr-warmup-iters", "0"]
    env = environment(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]




def kill_at_checkpoint_and_resume(flags_for, tmp_path, killed_after, script="pretrain_gpt_moe.py", nproc=2):
    """Losses of an uninterrupted run, and of the same run SIGKILLed right after its checkpoint at
    iteration `killed_after` and resumed from it (only the resumed iterations)."""
    uninterrupted = losses(torchrun(flags_for(tmp_path / "uninterrupted"), nproc=nproc, script=script))
    save = tmp_path / "killed"
    process = subprocess.Popen(torchrun_command(flags_for(save), nproc=nproc, script=script), cwd=REPO,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "saved checkpoint" in line and f"iter_{killed_after:07d}" in line:
            kill_with_descendants(process.pid)
            break
    process.wait(timeout=60)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(killed_after)
    output = torchrun(flags_for(save), nproc=nproc, script=script)
    assert f"resuming at iteration {killed_after}" in output
    return uninterrupted, losses(output)
