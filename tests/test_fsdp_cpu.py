"""configs/trainer/fsdp.yaml on two CPU processes (gloo): Lightning's FSDPStrategy with the fragment's
wrapping, activation checkpointing and full-state-dict checkpoints, run through cli.py on the reward
model. Only the device differs from a GPU run (tests/cpu_fsdp.py supplies it)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT
from test_resume_ddp import cli

CLIP = 1e-3  # far below the gradient norms of these steps, so every step is clipped
FSDP_ON_CPU = ["--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
               "--trainer.strategy.class_path=cpu_fsdp.CPUFSDPStrategy"]
SMALL_REWARD_CLIPPED = [f"--trainer.gradient_clip_val={CLIP}", "--model.init_args.model=tiny",
                        "--data.init_args.train_size=64", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
                        "--data.init_args.batch_size=8",  # 4 steps per epoch on 2 ranks
                        "--trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One epoch with a probe, test after fit and export; its resumption to step 6; a straight 6-step run."""
    tmp = tmp_path_factory.mktemp("fsdp")
    probe = tmp / "probe.json"
    first = cli(tmp, "resumed", *FSDP_ON_CPU, *SMALL_REWARD_CLIPPED, "--trainer.max_steps=4", "--test_after_fit=true",
                "--trainer.callbacks+=cpu_fsdp.FSDPProbe", f"--trainer.callbacks.path={probe}")
    resumed = cli(tmp, "resumed", *FSDP_ON_CPU, *SMALL_REWARD_CLIPPED, "--trainer.max_steps=6", "--test_after_fit=false",
                  "--ckpt_path=last")
    straight = cli(tmp, "straight", *FSDP_ON_CPU, *SMALL_REWARD_CLIPPED, "--trainer.max_steps=6", "--test_after_fit=false")
    return tmp, probe, first, resumed, straight


def test_fsdp_fragment_shards_checkpoints_layers_and_clips_the_global_norm(fsdp_runs):
    tmp, probe_path, first, _, _ = fsdp_runs
    assert first.returncode == 0, first.stderr[-3000:]
    probe = json.loads(probe_path.read_text())
    layers = json.loads((ROOT / ".cache/presets/tiny/config.json").read_text())["num_hidden_layers"]
    assert probe["world_size"] == 2
    assert probe["generate_syncs_processes"]  # else a process whose sequences end first would leave the others waiting
    assert probe["fsdp_units"] == layers + 1  # one unit per decoder layer, plus the root
    assert probe["checkpointed_layers"] == ["Qwen2DecoderLayer"] and probe["checkpointed_count"] == layers
    assert len(probe["steps"]) == 4
    for step in probe["steps"]:  # the norm over every rank's shard, before and after the trainer's clipping
        assert step["before_clip"] > 100 * CLIP
        assert math.isclose(step["after_clip"], CLIP, rel_tol=1e-3)


def test_fsdp_test_after_fit_and_export_use_the_full_checkpoint(fsdp_runs):
    from transformers import AutoModelForSequenceClassification

    tmp, _, first, _, _ = fsdp_runs
    assert first.returncode == 0, first.stderr[-3000:]
    [summary_path] = list((tmp / "resumed").glob("version_0/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["manifest"]["strategy"] == "CPUFSDPStrategy" and summary["manifest"]["world_size"] == 2
    test = summary["stages"]["test"]
    assert test["checkpoint"] == summary["stages"]["fit"]["best_checkpoint"]
    assert 0.0 <= test["metrics"]["test/accuracy"] <= 1.0

    # the checkpoint holds whole (gathered) tensors, and the export is exactly its weights
    state = torch.load(test["checkpoint"], weights_only=False)["state_dict"]
    exported = AutoModelForSequenceClassification.from_pretrained(tmp / "resumed" / "export")
    exported_state = exported.state_dict()
    assert {f"model.{key}" for key in exported_state} <= set(state)
    for key, value in exported_state.items():
        torch.testing.assert_close(value, state[f"model.{key}"], rtol=0, atol=0, msg=key)

    # throughput: parameters counted whole (before sharding), rows of both processes after the 2 warm-up steps
    throughput = summary["stages"]["fit"]["throughput"]
    embedding = exported.get_input_embeddings().weight.numel()
    assert throughput["model_flops_shape"]["non_embedding_parameters"] == exported.num_parameters() - embedding
    assert throughput["steps"] == 2 and throughput["sequences"] == 2 * 2 * 16


def test_fsdp_resume_from_last_matches_an_uninterrupted_run(fsdp_runs):
    tmp, _, _, resumed, straight = fsdp_runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = torch.load(tmp / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    actual = torch.load(tmp / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert expected["global_step"] == actual["global_step"] == 6
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for key in expected["state_dict"]:
        torch.testing.assert_close(actual["state_dict"][key], expected["state_dict"][key], rtol=0, atol=1e-6, msg=key)


def test_fsdp_sft_with_bf16_autocast_trains_generates_in_test_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    run = cli(tmp_path, "sft", *FSDP_ON_CPU, f"--trainer.gradient_clip_val={CLIP}",
              "--config", str(ROOT / "configs/trainer/bf16.yaml"),
              "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--data.init_args.train_size=32", "--data.init_args.val_size=8", "--data.init_args.test_size=8",
              "--data.init_args.batch_size=8", "--model.init_args.max_new_tokens=4", "--test_after_fit=true",
              config="configs/sft/arithmetic.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    [summary_path] = list((tmp_path / "sft").glob("version_0/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["manifest"]["precision"] == "bf16-mixed"
    test = summary["stages"]["test"]
    assert test["checkpoint"].endswith("best.ckpt") and 0.0 <= test["metrics"]["test/accuracy"] <= 1.0
    state = torch.load(test["checkpoint"], weights_only=False)["state_dict"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "export").state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, state[f"model.{key}"], rtol=0, atol=0, msg=key)


def test_fsdp_tofu_evaluation_in_a_callback_and_npo_reference_equal_one_process(tmp_path, run_cli):
    # TofuEvaluation runs the model outside any training step, where FSDP keeps the embeddings sharded; so
    # does NPO's precomputed reference (at fit start)
    callbacks = tmp_path / "tofu_evaluation.yaml"
    callbacks.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.tofu_eval.TofuEvaluation\n"
                         "      init_args: {every_n_epochs: 1, max_new_tokens: 8}\n")
    small = ["--config", str(callbacks), "--model.init_args.model=tiny", "--data.init_args.n_authors=4",
             "--model.init_args.loss=npo"]
    sharded = cli(tmp_path, "fsdp", *FSDP_ON_CPU, *small, "--trainer.max_epochs=1", "--trainer.max_steps=3",
                  config="configs/flat/unlearn.yaml")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    run_cli("test", "configs/flat/unlearn.yaml", *small, f"--ckpt_path={tmp_path / 'fsdp' / 'checkpoints' / 'last.ckpt'}",
            name="one")  # the one-process runs in this process
    [during_fit] = list((tmp_path / "fsdp").glob("version_0/tofu_eval/epoch_001.json"))
    [after] = list((tmp_path / "one").glob("version_0/tofu_eval/test.json"))
    during_fit, after = json.loads(during_fit.read_text()), json.loads(after.read_text())
    assert during_fit["report"].keys() == after["report"].keys()
    for key, value in after["report"].items():
        if isinstance(value, float):
            assert math.isclose(during_fit["report"][key], value, rel_tol=1e-5, abs_tol=1e-7), key
    assert during_fit["generations"] == after["generations"]
    run_cli("fit", "configs/flat/unlearn.yaml", *small, "--trainer.max_epochs=1", "--trainer.max_steps=1",
            name="one_fit")
    expected = torch.load(tmp_path / "one_fit" / "checkpoints" / "last.ckpt", weights_only=False)["reference_logps"]
    actual = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", weights_only=False)["reference_logps"]
    for name in ("forget", "template"):
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_scoring_with_uneven_shards_finishes_and_equals_one_process(tmp_path, run_cli):
    # 9 pairs in batches of 4 on 2 processes: Lightning's own predict split gives one process a batch fewer,
    # and a sharded forward waits for every process (a hang before the padded sampler)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Compute {i}+1.", "chosen": f"{i}+1={i + 1}\nAnswer: {i + 1}",
                                        "rejected": f"{i}+1={i + 2}\nAnswer: {i + 2}", "source": "s"}) + "\n"
                            for i in range(9)))
    scores = {}
    common = ["--model.init_args.model=tiny", f"--data.init_args.input_file={pool}", "--data.init_args.eval_batch_size=4"]
    run = cli(tmp_path, "fsdp", *FSDP_ON_CPU, *common, f"--model.init_args.output_file={tmp_path / 'fsdp.jsonl'}",
              config="configs/curation/score.yaml", subcommand="predict", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    run_cli("predict", "configs/curation/score.yaml", *common, f"--model.init_args.output_file={tmp_path / 'one.jsonl'}",
            name="one")  # the one-process run in this process
    for name in ("fsdp", "one"):
        out = tmp_path / f"{name}.jsonl"
        scores[name] = [(row["prompt"], row["score_chosen"], row["score_rejected"])
                        for row in map(json.loads, out.read_text().splitlines())]
    assert len(scores["fsdp"]) == len(scores["one"]) == 9
    for (prompt, chosen, rejected), (prompt_one, chosen_one, rejected_one) in zip(scores["fsdp"], scores["one"]):
        assert prompt == prompt_one
        assert math.isclose(chosen, chosen_one, abs_tol=1e-5) and math.isclose(rejected, rejected_one, abs_tol=1e-5)


def test_dapo_generation_refuses_sharded_parameters_with_a_clear_error(tmp_path):
    run = cli(tmp_path, "dapo", *FSDP_ON_CPU, "--model.init_args.model=tiny", "--data.init_args.test_size=8",
              config="configs/dapo/evaluate.yaml", subcommand="test", timeout=240)
    assert run.returncode != 0
    assert "DAPOPolicy generates or scores a data-dependent number of forwards" in run.stderr
    assert "Use one device or DDP" in run.stderr


def test_a_model_without_any_of_the_wrapped_layer_classes_is_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from modules import lm
    from modules.base import check_fsdp_wraps_layers

    trainer = SimpleNamespace(strategy=FSDPStrategy(auto_wrap_policy={Qwen2DecoderLayer}))
    check_fsdp_wraps_layers(trainer, lm.load_model("tiny"))  # a Qwen2: wrapped layer by layer
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"names \['Qwen2DecoderLayer'\], but LlamaForCausalLM has none of them.*"
                                         r"LlamaDecoderLayer"):
        check_fsdp_wraps_layers(trainer, llama)
    check_fsdp_wraps_layers(SimpleNamespace(strategy=None), llama)  # other strategies: nothing to check
