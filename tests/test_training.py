"""Short real runs through cli.py: every parameter trains, 8-bit state, NaN stop, untrained warning,
summary manifest, export round-trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SMALL_REWARD, SMALL_SFT
from lightning.pytorch import Callback


class InitialParams(Callback):
    """Remembers every trainable tensor at the start of training."""

    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def unchanged_parameters(cli, recorder: InitialParams) -> list[str]:
    after = dict(cli.model.named_parameters())
    return [name for name, before in recorder.before.items() if torch.equal(before, after[name].detach())]


def add_trainer_callbacks(monkeypatch, *callbacks: Callback) -> None:
    """Runs of cli.main in this test get ``callbacks`` besides the default ones."""
    import cli as cli_module

    defaults = cli_module.trainer_defaults()
    monkeypatch.setattr(cli_module, "trainer_defaults",
                        lambda: {**defaults, "callbacks": defaults["callbacks"] + list(callbacks)})


@pytest.mark.parametrize("config, small", [("configs/sft/arithmetic.yaml", SMALL_SFT),
                                           ("configs/reward/bt.yaml", SMALL_REWARD)])
def test_a_few_steps_change_every_trainable_parameter(run_cli, config, small, monkeypatch):
    recorder = InitialParams()
    add_trainer_callbacks(monkeypatch, recorder)
    cli = run_cli("fit", config, *small)
    assert len(recorder.before) > 10
    assert unchanged_parameters(cli, recorder) == []


def read_summary(tmp_path: Path, name: str = "run") -> dict:
    [path] = list((tmp_path / name).glob("version_*/summary.json"))
    return json.loads(path.read_text())


def test_summary_manifest_and_test_after_fit(run_cli, tmp_path):
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--test_after_fit=true",
            "--trainer.accumulate_grad_batches=2")
    summary = read_summary(tmp_path)
    assert set(summary["stages"]) == {"fit", "test"}
    manifest = summary["manifest"]
    assert manifest["seed"] == 0 and manifest["world_size"] == 1
    assert manifest["effective_batch_size"] == 16  # 8 pairs x 2 accumulated batches x 1 process
    assert manifest["versions"]["torch"] and manifest["versions"]["lightning"]
    assert manifest["config"]["model"]["class_path"] == "modules.reward.RewardModel"
    assert summary["stages"]["test"]["checkpoint"].endswith("best.ckpt")
    assert 0.0 <= summary["stages"]["test"]["metrics"]["test/accuracy"] <= 1.0
    assert {"test/accuracy/format", "test/accuracy/consistency", "test/accuracy/arithmetic"} <= set(
        summary["stages"]["test"]["metrics"])
    assert summary["stages"]["fit"]["data"]["rows"]["train"] == 64
    assert summary["warnings"] == []


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(run_cli, tmp_path):
    from callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .* at global step \d+"):
        run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_steps=50",
                "--trainer.gradient_clip_val=null", "--model.init_args.lr_scheduler=null",
                "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=1e30",
                "--checkpoint.every_n_train_steps=1", "--checkpoint.monitor=null")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())


def test_adamw8bit_keeps_uint8_state_and_32bit_embeddings(run_cli):
    cli = run_cli("fit", "configs/reward/bt.yaml", "--config", "configs/optimizer/adamw8bit.yaml", *SMALL_REWARD)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    embedding = cli.model.model.get_input_embeddings().weight
    state_dtypes = {}
    for param, state in optimizer.state.items():
        state_dtypes[param is embedding] = state_dtypes.get(param is embedding, set()) | {state["state1"].dtype}
    assert state_dtypes[True] == {torch.float32}  # embeddings: 32-bit state
    assert torch.uint8 in state_dtypes[False]      # large matrices: 8-bit state


def test_export_round_trip_gives_the_same_rewards(run_cli, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cli import export_main

    cli = run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD)
    export_main([str(tmp_path / "run" / "checkpoints" / "best.ckpt"), str(tmp_path / "by_hand")])
    texts = ["<|user|>Compute 1+2.<|end|><|assistant|>1+2=3\nAnswer: 3<|end|>", "<|user|>Hi<|end|><|assistant|>x<|end|>"]
    module = cli.model.eval()
    # the fit's own export (export.dirpath) and `cli.py export` of the same best checkpoint
    for folder in (tmp_path / "run" / "export", tmp_path / "by_hand"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = module.rewards(batch["input_ids"], batch["attention_mask"])
            exported = model(**batch).logits.squeeze(-1)
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
        torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)


def test_validate_test_and_predict_run_from_a_checkpoint(run_cli, tmp_path):
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD)
    ckpt = f"--ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}"
    for subcommand in ("validate", "test", "predict"):
        run_cli(subcommand, "configs/reward/bt.yaml", *SMALL_REWARD, ckpt, "--data.init_args.eval_batch_size=8",
                name=subcommand)
        stage = read_summary(tmp_path, subcommand)["stages"][subcommand]
        assert stage["checkpoint"].endswith("best.ckpt")
        assert stage["batches_per_dataloader"] == [3]  # 24 rows in batches of 8
        if subcommand != "predict":
            metric = "val/accuracy" if subcommand == "validate" else "test/accuracy"
            assert 0.0 <= stage["metrics"][metric] <= 1.0


def test_a_partial_evaluation_is_recorded_as_one(run_cli, tmp_path):
    run_cli("test", "configs/reward/bt.yaml", *SMALL_REWARD, "--data.init_args.eval_batch_size=8",
            "--trainer.limit_test_batches=1")
    stage = read_summary(tmp_path)["stages"]["test"]
    assert stage["batches_per_dataloader"] == [1] and stage["limit_test_batches"] == 1


def test_a_failed_start_leaves_no_log_folder_and_keeps_an_earlier_runs_files(run_cli, tmp_path):
    from datamodules.common import DataError

    missing = f"--data.init_args.train_file={tmp_path / 'missing.jsonl'}"
    with pytest.raises((DataError, FileNotFoundError)):
        run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, missing)
    assert list((tmp_path / "run").glob("version_*")) == []  # the next run is version_0 again
    # a rerun into a fixed version folder holding an earlier run's files removes nothing
    earlier = tmp_path / "run" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "events.out.tfevents.earlier").write_text("earlier run")
    with pytest.raises((DataError, FileNotFoundError)):
        run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, missing, "--trainer.logger.init_args.version=0")
    assert (earlier / "events.out.tfevents.earlier").read_text() == "earlier run"


class FailFirstTestBatch(Callback):
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        raise RuntimeError("failure inside the test loop")


def test_a_failure_inside_a_loop_keeps_the_run_logs(run_cli, tmp_path, monkeypatch):
    add_trainer_callbacks(monkeypatch, FailFirstTestBatch())
    with pytest.raises(RuntimeError, match="failure inside the test loop"):
        run_cli("test", "configs/reward/bt.yaml", *SMALL_REWARD)  # global_step stays 0 in a test run
    [folder] = list((tmp_path / "run").glob("version_*"))
    assert (folder / "config.yaml").exists()


def test_step_limited_runs_get_a_progress_bar_without_a_negative_epoch_count(tmp_path):
    from conftest import ROOT, quiet_run_args

    import cli
    from callbacks.progress import StepAwareRichProgressBar, train_description

    assert train_description(0, -1, 800) == "Epoch 0 (step limit 800)"  # Lightning's rich bar: "Epoch 0/-2"
    assert train_description(2, 5, -1) == "Epoch 2/4"
    args = ["--config", str(ROOT / "configs/reward/bt.yaml"), *quiet_run_args(tmp_path), *SMALL_REWARD]
    shown = cli.main([*args, "--trainer.enable_progress_bar=true"], run=False)
    assert isinstance(shown.trainer.progress_bar_callback, StepAwareRichProgressBar)
    assert cli.main(args, run=False).trainer.progress_bar_callback is None  # enable_progress_bar=false holds


def test_eval_rows_keep_each_row_once_and_number_rows_without_ids():
    from types import SimpleNamespace

    from modules.base import EvalRows

    one_process = SimpleNamespace(world_size=1)
    rows = EvalRows(columns=1)
    rows.add(torch.tensor([3, 1]), [torch.tensor([30.0, 10.0])], rank=0)
    rows.add(torch.tensor([1, 2]), [torch.tensor([10.0, 20.0])], rank=0)  # row 1 again, as a sampler pads
    assert rows.gather(one_process, torch.device("cpu")).tolist() == [[1, 10], [2, 20], [3, 30]]
    # without ids nothing is merged, and the ids of rank 1 cannot meet those of rank 0
    rows.add(None, [torch.tensor([5.0, 5.0])], rank=1)
    rows.add(None, [torch.tensor([6.0])], rank=1)
    assert rows.gather(one_process, torch.device("cpu")).tolist() == [[2 ** 40, 5], [2 ** 40 + 1, 5], [2 ** 40 + 2, 6]]
    assert rows.gather(one_process, torch.device("cpu")).shape == (0, 2)  # each epoch starts empty


def test_fused_adamw_only_where_torch_was_left_to_choose():
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from modules.base import fused_kernel_applies

    weight = torch.nn.Parameter(torch.zeros(2, 2))
    on_cuda = SimpleNamespace(device=torch.device("cuda"), is_floating_point=lambda: True)
    on_mps = SimpleNamespace(device=torch.device("mps"), is_floating_point=lambda: True)
    plain = SimpleNamespace(precision_plugin=Precision(), strategy=None)

    def with_params(optimizer, params):
        optimizer.param_groups[0]["params"] = params
        return optimizer

    assert fused_kernel_applies(torch.optim.AdamW([weight]), plain)  # CPU parameters
    transposed = torch.nn.Parameter(torch.zeros(3, 2).t())  # the CPU kernel needs matching layouts: not fused
    assert not fused_kernel_applies(torch.optim.AdamW([transposed]), plain)
    assert not fused_kernel_applies(with_params(torch.optim.AdamW([weight]), [on_mps]), plain)
    assert fused_kernel_applies(with_params(torch.optim.AdamW([weight]), [on_cuda]), plain)
    assert fused_kernel_applies(with_params(torch.optim.Adam([weight]), [on_cuda]), plain)
    bf16_autocast = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"), strategy=None)
    assert fused_kernel_applies(with_params(torch.optim.AdamW([weight]), [on_cuda]), bf16_autocast)
    fp16_scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), strategy=None)
    assert not fused_kernel_applies(with_params(torch.optim.AdamW([weight]), [on_cuda]), fp16_scaled)
    for chosen in ({"foreach": False}, {"foreach": True}, {"fused": False}):  # the user's choice stands
        assert not fused_kernel_applies(with_params(torch.optim.AdamW([weight], **chosen), [on_cuda]), plain)
    assert not fused_kernel_applies(with_params(torch.optim.SGD([weight]), [on_cuda]), plain)
    assert not fused_kernel_applies(with_params(torch.optim.AdamW([weight]), [on_cuda, on_mps]), plain)  # not all supported


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_is_built_from_the_configured_factory_and_clips(run_cli, monkeypatch, precision):
    import modules.base

    seen = []
    clip = modules.base.TrainableModule.configure_gradient_clipping

    def recording_clip(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))

    monkeypatch.setattr(modules.base.TrainableModule, "configure_gradient_clipping", recording_clip)
    # bf16 autocast with clipping: Lightning's own plugin refuses to clip for a fused optimizer
    cli = run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, f"--trainer.precision={precision}",
                  "--trainer.gradient_clip_val=1e-3")
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["weight_decay"] == 0.01  # the config's settings
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    assert len(seen) == 4 and all(norm <= 1e-3 * (1 + 1e-4) for norm in seen)  # every step clipped


def test_throughput_counts_the_trained_tokens_and_flops_after_the_warm_up(run_cli, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modules.reward import RewardModel

    seen = []  # (rows, padded length, non-pad tokens) of every training step
    original = RewardModel.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((*batch["input_ids"].shape, int(batch["attention_mask"].sum())))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RewardModel, "training_step", recording_step)
    cli = run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_steps=7",
                  "--trainer.val_check_interval=3", "--throughput.log_every_n_steps=2",
                  "--throughput.warmup_steps=2", "--throughput.peak_flops=1e12")
    assert len(seen) == 7
    timed = seen[2:]  # steps 3-7
    config = cli.model.model.config
    n = sum(p.numel() for p in cli.model.model.parameters()) - cli.model.model.get_input_embeddings().weight.numel()
    flops = sum(rows * length * (6 * n + 12 * config.num_hidden_layers * config.hidden_size * length)
                for rows, length, _ in timed)
    throughput = read_summary(tmp_path)["stages"]["fit"]["throughput"]
    assert throughput["steps"] == 5
    assert throughput["sequences"] == sum(rows for rows, _, _ in timed) == 5 * 16  # 8 pairs, two rows each
    assert throughput["padded_tokens"] == sum(rows * length for rows, length, _ in timed)
    assert throughput["tokens"] == sum(tokens for _, _, tokens in timed)
    assert throughput["mfu"] == pytest.approx(flops / throughput["seconds"] / 1e12, rel=1e-9)
    assert throughput["tokens_per_s"] == pytest.approx(throughput["tokens"] / throughput["seconds"], rel=1e-9)

    events = EventAccumulator(str(next((tmp_path / "run").glob("version_*"))))
    events.Reload()
    logged = {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]
              if tag.startswith("perf/")}
    # windows close at every second step after the warm-up; step 7's half window goes only into the summary
    assert logged == {tag: [4, 6] for tag in ("perf/step_time_s", "perf/tokens_per_s", "perf/padded_tokens_per_s",
                                              "perf/sequences_per_s", "perf/mfu")}


def test_throughput_can_be_switched_off(run_cli, tmp_path):
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--throughput.enabled=false")
    assert "throughput" not in read_summary(tmp_path)["stages"]["fit"]


def test_throughput_of_a_module_without_token_batches_is_step_time_only(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks import Throughput

    for trainer_every, monitor_every in ((50, 2), (0, None), (50, 0)):  # 0: summary only, no windows
        monitor = Throughput(warmup_steps=1, log_every_n_steps=monitor_every)
        trainer = pl.Trainer(max_steps=5, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                             log_every_n_steps=trainer_every)
        trainer.fit(BoringModel())
        assert set(monitor.summary) == {"steps", "seconds", "step_time_s", "warmup_steps"}
        assert monitor.summary["steps"] == 4


def test_peak_flops_are_looked_up_by_whole_model_names():
    from callbacks.throughput import peak_flops_by_name

    assert peak_flops_by_name("NVIDIA H100 80GB HBM3") == peak_flops_by_name("NVIDIA H200") == 989e12
    assert peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_by_name("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert (peak_flops_by_name("NVIDIA L4"), peak_flops_by_name("NVIDIA L40"), peak_flops_by_name("NVIDIA L40S")) == (
        121e12, 181e12, 362e12)
    assert peak_flops_by_name("NVIDIA GeForce RTX 4090") is None


def test_throughput_leaves_validation_out_and_counts_accumulated_batches(run_cli, tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    import callbacks.throughput
    from modules.reward import RewardModel

    # the callback's clock, with each validation taking 1000 s on it: counted, it could not be missed
    skipped = [0.0]
    monkeypatch.setattr(callbacks.throughput, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))
    original = RewardModel.validation_step

    def slow_validation(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            skipped[0] += 1000.0
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RewardModel, "validation_step", slow_validation)
    # 4 optimizer steps of 2 batches; validation (one batch) after steps 2 and 4, both inside the timing
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_steps=4",
            "--trainer.accumulate_grad_batches=2", "--trainer.val_check_interval=4",
            "--data.init_args.val_size=8", "--throughput.warmup_steps=0")
    assert skipped[0] == 2000.0  # both validations ran inside the timed steps
    throughput = read_summary(tmp_path)["stages"]["fit"]["throughput"]
    assert throughput["steps"] == 4 and throughput["sequences"] == 4 * 2 * 16
    assert throughput["seconds"] < 1000.0


def test_a_rerun_replaces_best_and_last_instead_of_versioning_them(run_cli, tmp_path):
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD)
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_steps=8")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 8  # the second run's


def test_test_after_fit_without_test_data_is_skipped_with_a_warning(run_cli, tmp_path):
    from datamodules import arithmetic

    problems = arithmetic.generate_splits({"train": 40}, seed=0)["train"]
    rows = arithmetic.preference_rows(problems, ("format",), seed=0)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(UserWarning, match="test_after_fit skipped: PreferenceData has no test data"):
        run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, f"--data.init_args.train_file={path}",
                f"--data.init_args.val_file={path}", "--test_after_fit=true")
    assert set(read_summary(tmp_path)["stages"]) == {"fit"}


def test_abbreviated_options_are_refused(run_cli, capsys):
    with pytest.raises(SystemExit):  # argparse would take --trainer.max_step for --trainer.max_steps
        run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_step=5")
    assert "max_step" in capsys.readouterr().err


def test_a_missing_earlier_stage_is_one_error_line_naming_the_config_that_writes_it(tmp_path, monkeypatch, capsys):
    import sys

    from conftest import ROOT

    import cli

    argv = ["fit", "--config", str(ROOT / "configs/dapo/critic.yaml"), "--model.init_args.model=tiny"]
    monkeypatch.chdir(tmp_path)  # where runs/dapo/rollouts.jsonl does not exist
    monkeypatch.setattr(sys, "argv", ["cli.py", *argv])  # as cli.py's entry point sees them
    with pytest.raises(SystemExit) as exit_info:
        cli.run_reporting_errors(lambda: cli.main(argv))
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert "error: data file not found: runs/dapo/rollouts.jsonl" in stderr
    assert "hint: runs/dapo/rollouts.jsonl is also named in configs/dapo/advantages.yaml, configs/dapo/rollouts.yaml" \
        in stderr


def test_testing_a_reward_model_without_a_checkpoint_warns_that_its_head_is_untrained(run_cli):
    with pytest.warns(UserWarning, match=r"test ran without --ckpt_path on tiny, whose score.weight were newly "
                                         r"initialised"):
        run_cli("test", "configs/reward/bt.yaml", *SMALL_REWARD, "--data.init_args.eval_batch_size=8",
            "--trainer.limit_test_batches=1")


def test_export_needs_neither_the_base_model_nor_the_working_directory(run_cli, tmp_path):
    """A checkpoint carries its model's config and tokenizer: exporting it after the base model folder is
    gone gives the checkpoint's weights, without rebuilding or reading the base model."""
    import shutil

    from modules import lm

    base = lm.build_preset("tiny", tmp_path / "base")
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, f"--model.init_args.model={base}")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.ckpt"
    shutil.rmtree(base)
    out = lm.export_checkpoint(str(checkpoint), str(tmp_path / "exported"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    exported = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    for name, value in exported.items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0, msg=name)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_run_dir_moves_logs_checkpoints_and_export_together(tmp_path):
    from conftest import ROOT

    import cli

    run_dir = tmp_path / "ablation"
    cli.main(["fit", "--config", str(ROOT / "configs/reward/bt.yaml"), *SMALL_REWARD, f"--run_dir={run_dir}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run_dir / "export" / "config.json").exists()
    [summary] = list(run_dir.glob("version_*/summary.json"))
    assert json.loads(summary.read_text())["stages"]["fit"]


def test_export_from_a_checkpoint_keeps_the_generation_config(run_cli, tmp_path):
    """Stop tokens and sampling defaults live in generation_config.json, which the rollout engine reads."""
    import shutil

    from modules import lm

    base = lm.build_preset("tiny", tmp_path / "base")
    generation = json.loads((base / "generation_config.json").read_text())
    generation.update(eos_token_id=[1, 2], temperature=0.7, do_sample=True)  # not derivable from config.json
    (base / "generation_config.json").write_text(json.dumps(generation))
    run_cli("fit", "configs/sft/arithmetic.yaml", *SMALL_SFT, f"--model.init_args.model={base}")
    shutil.rmtree(base)
    out = lm.export_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    exported = json.loads((out / "generation_config.json").read_text())
    assert (exported["eos_token_id"], exported["temperature"], exported["do_sample"]) == ([1, 2], 0.7, True)


def test_sft_trains_with_a_tokenizer_that_has_no_pad_token(tmp_path):
    """Llama-3 and Mistral tokenizers ship without a pad token. SFT's padding is masked (attention 0, labels
    -100), so it pads with EOS and adds no token: the model keeps its vocabulary."""
    import lightning.pytorch as pl
    from conftest import padless_model
    from transformers import AutoConfig

    from datamodules.sft_data import SFTData
    from modules.lm import load_tokenizer
    from modules.sft import SFT

    folder = padless_model(tmp_path / "llama_like")
    tokenizer = load_tokenizer(str(folder))

    module = SFT(model=str(folder), generate_on_validation=False)
    vocabulary = AutoConfig.from_pretrained(folder).vocab_size
    assert module.tokenizer.pad_token_id is None
    small = dict(train_size=16, val_size=0, test_size=0, batch_size=8, max_length=64)
    data = SFTData(**small)  # takes the module's tokenizer
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert module.model.get_input_embeddings().weight.shape[0] == vocabulary  # nothing added
    batch = data.collate(data.datasets["train"][:8])
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == tokenizer.eos_token_id).all()
    assert (batch["labels"][padding] == -100).all()
    # greedy generation from EOS-left-padded prompts gives what each prompt gives alone
    items = sorted(data.datasets["train"], key=lambda item: len(item["prompt_ids"]))
    short, long = items[0], items[-1]
    assert len(short["prompt_ids"]) < len(long["prompt_ids"])
    together = data.collate([short, long])
    assert (together["prompt_input_ids"][0, 0] == tokenizer.eos_token_id).item()  # the short prompt is padded
    alone = [data.collate([item]) for item in (short, long)]
    assert module.generate(together["prompt_input_ids"], together["prompt_attention_mask"], 6) == \
        [module.generate(one["prompt_input_ids"], one["prompt_attention_mask"], 6)[0] for one in alone]


def test_untrained_check_reads_deepspeed_zero3_partitions():
    """Under DeepSpeed ZeRO-3 a parameter is an empty placeholder (numel() == 0, real size ds_numel) and each
    process holds a partition (ds_tensor): the check compares the partition, and never reports "no trainable
    parameters" for a sharded model."""
    from callbacks.summary import RunSummary

    class Sharded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves between forwards
            self.weight.ds_numel = 12
            self.weight.ds_tensor = torch.randn(6)  # this process's half
            self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    module, summary = Sharded(), RunSummary()
    summary.on_train_start(None, module)
    assert summary._untrained_report(module).startswith("NO TRAINABLE PARAMETER CHANGED in 1 tensors")
    module.weight.ds_tensor.add_(0.5)  # an optimizer step on the partition
    assert summary._untrained_report(module) is None
    # a process holding no values of a parameter cannot judge it, and does not call it untrained
    module.weight.ds_tensor = torch.empty(0)
    summary.on_train_start(None, module)
    assert summary._untrained_report(module) is None


@pytest.mark.parametrize("monitor, best_step", [("val/accuracy", 4), ("null", 6)])
def test_a_fit_between_checkpoint_points_saves_its_final_step(run_cli, tmp_path, monitor, best_step):
    # validation (and checkpointing) every 4 steps, 6 steps in all: the last 2 steps must not be lost
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_steps=6", f"--checkpoint.monitor={monitor}")
    folder = tmp_path / "run" / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6
    # a monitored best keeps its validated step; without a monitor the latest is the best
    [best] = [path for path in folder.glob("*.ckpt") if path.name != "last.ckpt"]
    assert torch.load(best, weights_only=False)["global_step"] == best_step
    assert read_summary(tmp_path)["stages"]["fit"]["epochs_trained"] == 0.75  # 6 of the 8 batches of 8 pairs


@pytest.mark.parametrize("accumulate", [1, 2])
def test_extending_a_fit_from_its_final_step_matches_an_uninterrupted_run(run_cli, tmp_path, accumulate):
    # the final step's last.ckpt is written mid-epoch (after batch 6 of 8, or batch 4 of 8 with 2 batches per
    # step): a resume goes on with the next batch, not the next epoch, and counts the batches it skips
    # in optimizer steps (accumulate_grad_batches)
    constant_lr = [*SMALL_REWARD, "--model.init_args.lr_scheduler=null", f"--trainer.accumulate_grad_batches={accumulate}"]
    run_cli("fit", "configs/reward/bt.yaml", *constant_lr, "--trainer.max_steps=10", name="straight")
    run_cli("fit", "configs/reward/bt.yaml", *constant_lr, "--trainer.max_steps=6", name="extended")
    run_cli("fit", "configs/reward/bt.yaml", *constant_lr, "--trainer.max_steps=10", "--ckpt_path=last", name="extended")
    expected, actual = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
                        for name in ("straight", "extended"))
    assert expected["global_step"] == actual["global_step"] == 10
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    assert read_summary(tmp_path, "straight")["stages"]["fit"]["epochs_trained"] == 10 * accumulate / 8


def test_a_rerun_into_the_same_log_folder_replaces_its_summary(run_cli, tmp_path):
    fixed = "--trainer.logger.init_args.version=0"
    with pytest.warns(UserWarning, match="NO TRAINABLE PARAMETER CHANGED"):
        run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, fixed, "--model.init_args.optimizer.init_args.lr=0",
                "--model.init_args.optimizer.init_args.weight_decay=0", "--test_after_fit=true")
    first = read_summary(tmp_path)
    assert set(first["stages"]) == {"fit", "test"}
    assert any("NO TRAINABLE PARAMETER CHANGED" in warning for warning in first["warnings"])
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, fixed)
    summary = read_summary(tmp_path)
    assert set(summary["stages"]) == {"fit"} and summary["warnings"] == []  # none of the first run's


def test_summary_metrics_are_strict_json():
    from callbacks.summary import _jsonable

    values = {"nan": torch.tensor(float("nan")), "inf": torch.tensor(float("inf")), "x": torch.tensor([1.0, -float("inf")]),
              "plain": float("-inf"), "ok": torch.tensor(0.5)}
    text = json.dumps({key: _jsonable(value) for key, value in values.items()}, allow_nan=False)
    assert json.loads(text) == {"nan": "nan", "inf": "inf", "x": [1.0, "-inf"], "plain": "-inf", "ok": 0.5}


def test_a_failed_export_stops_every_process():
    from types import SimpleNamespace

    from callbacks.export import ExportPretrained

    def trainer(rank: int, failure_on_zero: str | None):
        strategy = SimpleNamespace(broadcast=lambda value, src=0: value if rank == 0 else failure_on_zero)
        callback = SimpleNamespace(best_model_path="", last_model_path="")
        return SimpleNamespace(is_global_zero=rank == 0, strategy=strategy, checkpoint_callback=callback)

    class Module:
        def export_pretrained(self, path):
            raise FileExistsError(f"{path} holds other files")

    export = ExportPretrained("out")
    with pytest.raises(FileExistsError, match="out holds other files"):  # process 0: its own error
        export.on_fit_end(trainer(0, None), Module())
    with pytest.raises(RuntimeError, match="the export to out failed on process 0: FileExistsError: out holds"):
        export.on_fit_end(trainer(1, "FileExistsError: out holds other files"), Module())
    export.on_fit_end(trainer(1, None), Module())  # no failure: the others go on


def test_a_checkpoint_of_another_module_class_is_refused_with_what_to_do(run_cli, tmp_path):
    from cli import CheckpointClassError

    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD)
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    # Lightning would run the checkpoint's RewardModel in place of the scorer, which then writes nothing
    with pytest.raises(CheckpointClassError, match=r"holds a RewardModel, and this config runs RewardScorer: .*export "
                                                   r".* or pass it as --model.init_args.checkpoint="):
        run_cli("predict", "configs/curation/score.yaml", f"--ckpt_path={best}", name="score")
    run_cli("test", "configs/reward/bt.yaml", *SMALL_REWARD, f"--ckpt_path={best}", name="test")  # same class: runs


def test_a_ddp_run_destroys_its_process_group_before_the_process_exits(run_cli, monkeypatch):
    """Left to interpreter shutdown, a gloo group's worker threads can abort a finished run (SIGABRT); the CLI
    destroys the group once its commands are done. One DDP process opens a real group, as two would."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Lightning writes these into os.environ, where the later tests' subprocesses would inherit a used port and
    # with LOCAL_RANK take themselves for launched processes: touched here, so that monkeypatch restores them
    # (an unset name is set first: deleting it alone records nothing). OMP_NUM_THREADS, set, keeps Lightning
    # from setting it and this process's thread count.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
    for name in ("LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    opened = []

    class SeesTheGroup(Callback):
        def on_train_start(self, trainer, pl_module):
            opened.append(torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo")

    add_trainer_callbacks(monkeypatch, SeesTheGroup())
    run_cli("fit", "configs/reward/bt.yaml", *SMALL_REWARD, "--trainer.max_steps=1", "--trainer.accelerator=cpu",
            "--trainer.devices=1", "--trainer.strategy=ddp")
    still_open = torch.distributed.is_initialized()
    if still_open:  # not left to the later tests of this process
        torch.distributed.destroy_process_group()
    assert opened == [True]
    assert not still_open


def test_length_chunks_give_the_rewards_and_gradients_of_one_padded_pass():
    from modules.reward import RewardModel, length_chunks_of, padding_layout

    lengths = torch.tensor([3, 17, 9, 30, 5, 30, 12])
    # sorted by length: rows 0, 4, 2, 6, 1, 3, 5, cut into parts of 3, 2 and 2 rows
    assert [part.tolist() for part in length_chunks_of(lengths, 3)] == [[0, 4, 2], [6, 1], [3, 5]]
    assert [part.tolist() for part in length_chunks_of(lengths[:2], 3)] == [[0], [1]]  # never an empty part

    torch.manual_seed(0)
    one, chunked = RewardModel(model="tiny"), RewardModel(model="tiny", length_chunks=3)
    for module in (one, chunked):
        module.configure_model()
    chunked.model.load_state_dict(one.model.state_dict())
    pad, width = one.tokenizer.pad_token_id, 30
    tokens = torch.randint(10, 200, (len(lengths), width))
    right_mask = (torch.arange(width) < lengths[:, None]).long()
    left_mask = right_mask.flip(-1)
    right_ids = torch.where(right_mask.bool(), tokens, pad)
    left_ids = torch.stack([torch.cat([torch.full((width - n,), pad), tokens[i, :n]]) for i, n in enumerate(lengths.tolist())])
    assert padding_layout(right_mask) == "right" and padding_layout(left_mask) == "left"
    assert padding_layout(torch.tensor([[1, 0, 1], [1, 1, 1]])) is None  # a hole: one pass, as without chunks
    weights = torch.linspace(-1.0, 1.0, len(lengths))
    for ids, mask in ((right_ids, right_mask), (left_ids, left_mask)):
        rewards = {}
        for name, module in (("one", one), ("chunked", chunked)):
            module.model.zero_grad()
            rewards[name] = module.rewards(ids, mask)
            (rewards[name] * weights).sum().backward()
        torch.testing.assert_close(rewards["chunked"], rewards["one"], rtol=0, atol=1e-5)
        for (name, expected), actual in zip(one.model.named_parameters(), chunked.model.parameters()):
            torch.testing.assert_close(actual.grad, expected.grad, rtol=0, atol=1e-5, msg=name)
    # what the throughput callback counts: each pass at its own width (rows 0, 4, 2 are 3, 5 and 9 tokens long)
    for mask in (right_mask, left_mask):
        shapes = [(rows, width, int(real)) for rows, width, real in chunked.training_forward_shapes({"attention_mask": mask})]
        assert shapes == [(3, 9, 17), (2, 17, 29), (2, 30, 60)]
    assert [(rows, width) for rows, width, _ in one.training_forward_shapes({"input_ids": right_ids, "attention_mask": right_mask})] \
        == [(7, 30)]
    # the training step reuses the passes the throughput callback asked for on the same batch
    assert chunked.forward_passes(right_mask) is chunked.forward_passes(right_mask)
    with pytest.raises(ValueError, match="length_chunks must be at least 1, got 0"):
        RewardModel(model="tiny", length_chunks=0)
