"""Every YAML under configs/ parses through cli.py, so a config can never rot."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

FRAGMENT_DIRS = {"trainer", "optimizer"}
ALL_CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
METHOD_CONFIGS = [p for p in ALL_CONFIGS if p.parts[1] not in FRAGMENT_DIRS]
FRAGMENTS = [p for p in ALL_CONFIGS if p.parts[1] in FRAGMENT_DIRS]
BASE = Path("configs/reward/bt.yaml")


def print_config(capsys, *configs: Path) -> str:
    import cli

    args = ["fit"]
    for config in configs:
        args += ["--config", str(ROOT / config)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_configs_exist():
    assert METHOD_CONFIGS and FRAGMENTS


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=str)
def test_method_config_parses(config, capsys):
    out = print_config(capsys, config)
    assert "class_path" in out


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=str)
def test_fragment_composes_with_a_method_config(fragment, capsys):
    out = print_config(capsys, BASE, fragment)
    if fragment.parts[1] == "optimizer":
        # the fragment swaps the class and keeps the method's learning rate
        import yaml

        base_lr = yaml.safe_load((ROOT / BASE).read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"]
        resolved = yaml.safe_load(out)["model"]["init_args"]["optimizer"]
        assert resolved["init_args"]["lr"] == base_lr
        assert resolved["class_path"] == yaml.safe_load((ROOT / fragment).read_text())["model"]["init_args"]["optimizer"]["class_path"]


def test_wrong_key_fails_before_any_work(capsys):
    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(ROOT / BASE), "--model.init_args.learning_rat=0.1"])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def test_wrong_type_fails_before_any_work(capsys):
    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(ROOT / BASE), "--data.init_args.batch_size=many"])
    assert exit_info.value.code != 0
    assert "batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("choice", ["highest", None])
def test_float32_matmul_precision_is_set_before_the_model_is_built(choice):
    import torch

    import cli

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        overrides = [f"--float32_matmul_precision={choice}"] if choice else []
        cli.main(["--config", str(ROOT / BASE), "--model.init_args.model=tiny", *overrides], run=False)
        assert torch.get_float32_matmul_precision() == (choice or "high")  # TF32 on NVIDIA GPUs by default
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("override, message", [
    ("--model.init_args.loss=focall", "error: unknown reward loss 'focall'; choose one of ('bt', 'bt_temperature'"),
    ("--data.init_args.subsets=[formatt]", "error: unknown subset 'formatt'; choose from ('format', 'consistency'"),
])
def test_a_misspelt_setting_value_is_one_error_line(override, message, capsys, tmp_path):
    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run_reporting_errors(lambda: cli.main(["fit", "--config", str(ROOT / BASE), "--model.init_args.model=tiny",
                                                   f"--run_dir={tmp_path}", override]))
    assert exit_info.value.code == 1
    # the run ends with the one error line (in-process, logging may print its own complaints earlier)
    last, hint = capsys.readouterr().err.rstrip().splitlines()[-2:]
    assert last.startswith(message) and hint == "(CLI_TRACEBACK=1 shows the traceback)"


def test_only_the_projects_own_value_errors_count_as_setting_errors():
    import json

    import cli
    from modules.reward import preference_loss

    with pytest.raises(ValueError) as ours:
        preference_loss(None, None, kind="focall")
    with pytest.raises(ValueError) as library:
        json.loads("{")
    with pytest.raises(ValueError) as builtin_in_project_code:  # a bug, not a check: keeps its traceback
        exec(compile("a, b = [1, 2, 3]", str(ROOT / "modules" / "reward.py"), "exec"))
    assert cli.is_setting_error(ours.value)
    assert not cli.is_setting_error(library.value) and not cli.is_setting_error(builtin_in_project_code.value)
