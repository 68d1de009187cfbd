"""MetricsLogger: wandb without an API key, as a new user first runs it, and a wandb that fails."""

import argparse
import glob
import os

import pytest

from megatron_lsh.training.metrics_logger import MetricsLogger

wandb = pytest.importorskip("wandb")


def logger_args(tmp_path, **overrides):
    settings = dict(tensorboard_dir=None, wandb_project="megatron-lsh-test", wandb_exp_name="no-key",
                    wandb_save_dir=str(tmp_path / "wandb"), save=None)
    settings.update(overrides)
    return argparse.Namespace(**settings)


def test_without_an_api_key_wandb_runs_offline_and_says_how_to_upload(tmp_path, monkeypatch, capsys):
    for variable in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from a `wandb login`
    logger = MetricsLogger(logger_args(tmp_path), enabled=True, run_config={"lr": 1e-3})
    assert logger.wandb is not None and logger.wandb.settings.mode == "offline"
    logger.log({"lm loss": 2.5}, iteration=1, consumed_tokens=1024, wall_seconds=3.0)
    logger.close()
    out = capsys.readouterr().out
    assert "wandb: offline run in" in out and "wandb sync" in out
    runs = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and any(name.endswith(".wandb") for name in os.listdir(runs[0]))


def test_a_failing_wandb_never_stops_training(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    logger = MetricsLogger(logger_args(tmp_path), enabled=True)
    assert logger.wandb is None
    logger.log({"lm loss": 2.5}, iteration=1, consumed_tokens=1024, wall_seconds=3.0)
    logger.close()
    assert "WARNING: wandb logging disabled (RuntimeError: no network)" in capsys.readouterr().out
