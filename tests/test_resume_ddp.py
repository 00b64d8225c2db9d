"""Process-level reliability: SIGKILL + `--ckpt_path last` resumes to the same weights, 2-process DDP
on the CPU (gloo) trains the reward model, and evaluates each pair exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, quiet_run_args

EPOCHS = ["--model.init_args.model=tiny", "--data.init_args.train_size=48", "--data.init_args.val_size=16", "--data.init_args.batch_size=8",
          "--trainer.max_steps=-1", "--trainer.max_epochs=3", "--trainer.val_check_interval=1.0",
          "--trainer.check_val_every_n_epoch=1", "--test_after_fit=false"]


def cli(tmp_path, name, *extra, timeout=400, config="configs/reward/bt.yaml", subcommand="fit"):
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, str(ROOT / "cli.py"), subcommand, "--config", str(ROOT / config),
               *quiet_run_args(tmp_path, name), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(tmp_path, name):
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


# checkpoints every 4 steps; killed in epoch two, 2 of its 6 batches done; 18 steps in all. Resuming
# mid-epoch with 2 batches per optimizer step: test_training.py (extending a fit from its final step)
@pytest.mark.parametrize("accumulate, kill_step, saved_step, last_step", [(1, 9, 8, 18)])
def test_a_resume_from_a_mid_epoch_checkpoint_continues_the_epoch_where_it_stopped(
        tmp_path, accumulate, kill_step, saved_step, last_step):
    """The main job checkpoints mid-epoch (every 200 of 250 steps): the resumed epoch must go on with the
    batches the checkpoint had not consumed, not start the epoch's data over."""
    mid_epoch = [*EPOCHS, "--trainer.val_check_interval=4", "--trainer.check_val_every_n_epoch=null",
                 f"--trainer.accumulate_grad_batches={accumulate}"]
    straight = cli(tmp_path, "straight", *mid_epoch)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = cli(tmp_path, "resumed", *mid_epoch, "--trainer.callbacks+=fault_callbacks.SigkillAtStep",
                 f"--trainer.callbacks.step={kill_step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (saved_step, 1)  # batch 8 of 18: mid epoch two
    resumed = cli(tmp_path, "resumed", *mid_epoch, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    expected, actual = final_weights(tmp_path, "straight"), final_weights(tmp_path, "resumed")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # last.ckpt is written at each validation (every 4 batches) and at the end of the fit: the final step
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == last_step


def test_a_ddp_resume_of_length_grouped_batches_matches_an_uninterrupted_run(tmp_path):
    """Each process's share of the grouped order follows the trainer's epoch, also after a resume."""
    ddp = ["--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), *EPOCHS, "--data.init_args.group_by_length=true"]
    straight = cli(tmp_path, "straight", *ddp, "--throughput.warmup_steps=1")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # the uninterrupted run is an ordinary 2-process DDP fit: what its summary records
    [summary_path] = list((tmp_path / "straight").glob("version_*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["manifest"]["world_size"] == 2 and summary["manifest"]["strategy"] == "DDPStrategy"
    assert summary["manifest"]["effective_batch_size"] == 16
    assert summary["stages"]["fit"]["global_step"] == 9
    throughput = summary["stages"]["fit"]["throughput"]
    # both processes' rows are counted: 8 timed steps x 2 processes x 8 pairs x 2 rows
    assert throughput["steps"] == 8 and throughput["sequences"] == 256
    # grouped by length across both processes: 9.6% of the positions are padding here, 17.6% with uniform
    # batches (Lightning's own distributed sampler would reshuffle the grouped order and undo it)
    assert 1 - throughput["tokens"] / throughput["padded_tokens"] < 0.13
    assert "mfu" not in throughput  # no peak is known for a CPU
    first = cli(tmp_path, "resumed", *ddp, "--trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli(tmp_path, "resumed", *ddp, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = final_weights(tmp_path, "straight"), final_weights(tmp_path, "resumed")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 9


def test_a_nan_on_one_process_stops_every_process_with_the_guards_message(tmp_path):
    # rank 1 alone sees a NaN loss: rank 0 must not go on into backward and wait for its gradients
    run = cli(tmp_path, "nan", "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), "--model.init_args.model=tiny",
              "--data.init_args.train_size=64", "--data.init_args.val_size=16", "--data.init_args.batch_size=8",
              "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--test_after_fit=false",
              "--trainer.callbacks+=fault_callbacks.NanLossOnRank", "--trainer.callbacks.rank=1",
              "--trainer.callbacks.step=2", timeout=200)
    assert run.returncode != 0
    assert "non-finite training loss (nan) at global step 2" in run.stderr  # rank 1, where it happened
    assert "non-finite training loss (finite here, not on another process) at global step 2" in run.stderr  # rank 0
    assert "Connection closed by peer" not in run.stderr and "Traceback" not in run.stderr


def test_a_ddp_width_sweep_writes_its_outputs_and_summary(tmp_path):
    # the sweep's files are written by process 0 only, but finding their folder is a collective call
    run = cli(tmp_path, "sweep", "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), "--trainer.max_steps=3",
              "--model.init_args.num_widths=3", "--model.init_args.num_seeds=1", "--model.init_args.eval_every_n_steps=0",
              "--export.dirpath=null", "--test_after_fit=false", config="configs/width_sweep/two_layer_adam.yaml",
              timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    [folder] = list((tmp_path / "sweep").glob("version_*"))
    assert {"width_sweep.csv", "width_sweep.json", "summary.json"} <= {path.name for path in folder.iterdir()}
    assert json.loads((folder / "summary.json").read_text())["manifest"]["world_size"] == 2


def test_ddp_test_counts_each_pair_once(tmp_path, run_cli):
    # 15 test pairs on 2 ranks: the distributed sampler repeats one pair to give both ranks 8
    small = ["--model.init_args.model=tiny", "--data.init_args.train_size=32", "--data.init_args.val_size=8",
             "--data.init_args.test_size=15", "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=4",
             "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--test_after_fit=false"]
    run_cli("fit", "configs/reward/bt.yaml", *small, name="fit")  # the one-process runs in this process
    ckpt = f"--ckpt_path={tmp_path / 'fit' / 'checkpoints' / 'best.ckpt'}"
    run_cli("test", "configs/reward/bt.yaml", *small, ckpt, name="single")
    ddp = cli(tmp_path, "ddp", "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), *small, ckpt, subcommand="test")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = {}
    for name in ("single", "ddp"):
        [summary_path] = list((tmp_path / name).glob("version_*/summary.json"))
        summary = json.loads(summary_path.read_text())
        assert summary["manifest"]["world_size"] == (2 if name == "ddp" else 1)
        metrics[name] = summary["stages"]["test"]["metrics"]
    correct = metrics["single"]["test/accuracy"] * 15
    assert abs(correct - round(correct)) < 1e-4  # a whole number of the 15 pairs
    assert metrics["ddp"].keys() == metrics["single"].keys()
    for key, value in metrics["single"].items():  # same pairs, same weights: only batch shapes differ
        assert abs(metrics["ddp"][key] - value) < 1e-5, (key, metrics["ddp"][key], value)


def test_ddp_prompt_classifier_calibrates_on_each_prompt_once(tmp_path, run_cli):
    # 6 decoy authors: an odd number of validation prompts (143), so the sampler repeats one on 2 processes
    small = ["--data.init_args.n_authors=6", "--data.init_args.decoy_authors=6", "--data.init_args.eval_batch_size=16",
             "--trainer.max_steps=2", "--test_after_fit=false"]  # barely trained: errors on both classes
    run_cli("fit", "configs/eco/classifier.yaml", *small, name="fit")  # the one-process runs in this process
    ckpt = f"--ckpt_path={tmp_path / 'fit' / 'checkpoints' / 'last.ckpt'}"
    run_cli("validate", "configs/eco/classifier.yaml", *small, ckpt, name="single")
    ddp = cli(tmp_path, "ddp", "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), *small, ckpt,
              config="configs/eco/classifier.yaml", subcommand="validate")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics, rows = {}, {}
    for name in ("single", "ddp"):
        [summary_path] = list((tmp_path / name).glob("version_*/summary.json"))
        stage = json.loads(summary_path.read_text())["stages"]["validate"]
        metrics[name], rows[name] = stage["metrics"], stage["data"]["rows"]["val"]
    assert rows["single"] % 2 == 1  # so the sampler repeats a prompt on 2 processes
    # the threshold chosen on the validation prompts, the error rates at it and the loss, as on one process
    for key, tolerance in (("val/threshold", 1e-6), ("val/fpr", 1e-6), ("val/fnr", 1e-6), ("val/error", 1e-6),
                           ("val/loss", 1e-5)):
        assert abs(metrics["ddp"][key] - metrics["single"][key]) < tolerance, (key, metrics["ddp"][key],
                                                                               metrics["single"][key])
