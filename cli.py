"""The one entry point: ``python cli.py {fit,validate,test,predict} --config configs/<method>/<stage>.yaml``.

Every LightningModule in ``modules`` and LightningDataModule in ``datamodules`` is selectable by its short
class name (``model: {class_path: RewardModel, init_args: {...}}``). One extra command exports a trained
checkpoint as a Hugging Face folder: ``python cli.py export CKPT OUT_DIR``; another builds the embedded
presets ahead of time (``setup.sh`` runs it, as one would download a base model): ``python cli.py presets``.
"""

from __future__ import annotations

import inspect
import linecache
import logging
import os
import sys
from pathlib import Path
from typing import Literal

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes (imported by transformers) warns on every start that an optional 4-bit CPU kernel package is
# missing; no method here uses 4-bit kernels
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from jsonargparse.typing import import_object  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402

import datamodules  # noqa: E402,F401  (registers the data modules)
import modules  # noqa: E402,F401  (registers the methods)
from callbacks import (  # noqa: E402
    Checkpoint,
    ExportPretrained,
    NonFiniteLossError,
    NonFiniteLossGuard,
    RunSummary,
    StepAwareRichProgressBar,
    Throughput,
)


class CheckpointClassError(ValueError):
    """--ckpt_path names a checkpoint of another LightningModule than the config's; cli.py prints it in one line."""


class TrainerCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the config's model by the checkpoint's own class and settings. Where the two
        classes differ (a reward model's checkpoint given to the scorer, an SFT checkpoint to the DAPO
        evaluator), the config's stage would silently not run; refuse and say how to run it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            # memory-mapped: only the hyperparameters are read here, not the weights and optimizer state
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
            hparams = checkpoint.get("hyper_parameters") or {}
            written_by = hparams.get("_class_path")
            configured = self.config[subcommand].get("model", {}).get("class_path")
            if written_by and configured and written_by != configured:
                short = configured.rsplit(".", 1)[-1]
                scorer_hint = (f" or pass it as --model.init_args.checkpoint={ckpt_path}"
                               if "checkpoint" in inspect.signature(import_object(configured)).parameters else "")
                raise CheckpointClassError(
                    f"--ckpt_path {ckpt_path} holds a {written_by.rsplit('.', 1)[-1]}, and this config runs {short}: "
                    f"Lightning would run the checkpoint's class instead of {short}. Export it (python cli.py export "
                    f"{ckpt_path} DIR) and pass --model.init_args.model=DIR{scorer_hint}")
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        # a rerun of a config replaces best.ckpt / last.ckpt instead of writing best-v1.ckpt beside them,
        # so commands and recipes that name best.ckpt get the latest run's model
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")
        parser.add_lightning_class_args(ExportPretrained, "export")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, run test with the best checkpoint (the last if none is ranked)")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="put this run's logs (RUN_DIR/version_N, and what is written beside them by "
                                 "default: summary.json, TOFU evaluations), checkpoints (RUN_DIR/checkpoints) and "
                                 "export (RUN_DIR/export) under RUN_DIR instead of the config's paths. Other outputs "
                                 "a config names by path stay where it says (ECO settings_dir, a TofuEvaluation "
                                 "save_dir, curation_dir, a scorer's output_file, the DAPO writers' output): "
                                 "override those too for an ablation")
        parser.add_argument("--float32_matmul_precision", type=Literal["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision: 'high' lets float32 matmuls use TF32 tensor "
                                 "cores on NVIDIA GPUs (and oneDNN's reduced-precision float32 on CPUs that have "
                                 "one); 'highest' keeps full float32 everywhere")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.get("float32_matmul_precision") or "high")
        run_dir = config.get("run_dir")
        if run_dir:
            loggers = config.trainer.get("logger")
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                if logger and getattr(logger, "init_args", None) is not None and "save_dir" in logger.init_args:
                    logger.init_args.save_dir = run_dir
                    if "name" in logger.init_args:
                        logger.init_args.name = ""
            config.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
            if config.export.get("dirpath"):  # only configs that export
                config.export.dirpath = os.path.join(run_dir, "export")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        has_split = getattr(self.datamodule, "has_split", None)
        if self.datamodule is not None and (not is_overridden("test_dataloader", self.datamodule, pl.LightningDataModule)
                                            or (has_split is not None and not has_split("test"))):
            # a warning, not an error: the trained model and its export are there and fine
            rank_zero_warn(f"test_after_fit skipped: {type(self.datamodule).__name__} has no test data "
                           f"(set its test_file or test_split, or --test_after_fit=false)")
            return
        callback = self.trainer.checkpoint_callback
        ckpt = "best" if callback is not None and callback.best_model_path else None
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # fit sharded this module's layers in place, and Lightning cannot shard a sharded module again
            # to load a checkpoint into it: test a fresh instance, built and sharded as a new process would
            ckpt = ckpt or ("last" if callback is not None and callback.last_model_path else None)
            if ckpt is None:
                rank_zero_warn("test_after_fit skipped: under FSDP it tests a checkpoint, and this fit saved none")
                return
            self.model = self._get(self.parser.instantiate_classes(self.config), "model")  # frees the fitted one
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)

    def _instantiate_trainer(self, config: dict, callbacks: list[pl.Callback]) -> pl.Trainer:
        # Lightning's own choice (rich where installed) but labelled for step-limited runs; a progress bar the
        # user configured, or enable_progress_bar=false, is left alone
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if (config.get("enable_progress_bar") is not False and _RICH_AVAILABLE
                and not any(isinstance(callback, ProgressBar) for callback in [*configured, *callbacks])):
            callbacks = [*callbacks, StepAwareRichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _warn_if_untrained(self) -> None:
        """Testing, validating or predicting without --ckpt_path uses the configured model's own weights;
        where some were newly initialised (a reward model's score head on a causal LM), say so."""
        if self.config[self.subcommand].get("ckpt_path"):
            return
        fresh = getattr(getattr(self.model, "model", None), "newly_initialized_weights", None)
        if fresh:
            rank_zero_warn(f"{self.subcommand} ran without --ckpt_path on {self.model.model_name_or_path}, whose "
                           f"{', '.join(fresh[:3])}{' ...' if len(fresh) > 3 else ''} were newly initialised (not "
                           f"trained): pass --ckpt_path (e.g. the fit's best.ckpt) or an exported model")

    after_test = after_validate = after_predict = _warn_if_untrained


def trainer_defaults() -> dict:
    return {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False}},
        "callbacks": [LearningRateMonitor(logging_interval="step")],
        "log_every_n_steps": 10,
    }


def release_process_group() -> None:
    """Destroy the process group a multi-process run opened, while the interpreter is still whole. Lightning does
    so at exit for NCCL only; a gloo group left to interpreter shutdown can still hold tensors in its worker
    threads, and the process then aborts (SIGABRT, "terminate called without an active exception") after a
    run that went well. Only after success: a process that failed may leave its peers inside a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(args: list[str] | None = None, run: bool = True) -> TrainerCLI:
    cli = TrainerCLI(
        model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        trainer_defaults=trainer_defaults(), seed_everything_default=0,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
        # an option is matched whole: a typo such as --trainer.max_step must not pass for max_steps
        parser_kwargs={"allow_abbrev": False, "epilog": "other commands: 'python cli.py export CHECKPOINT OUT_DIR' "
                       "writes a trained checkpoint as a save_pretrained folder; 'python cli.py presets [NAME ...]' "
                       "builds the embedded presets",
                       **{subcommand: {"allow_abbrev": False} for subcommand in ("fit", "validate", "test", "predict")}},
        args=args, run=run,
    )
    if run:
        release_process_group()
    return cli


def export_main(argv: list[str]) -> None:
    from modules.lm import export_checkpoint

    if len(argv) != 2 or any(arg in ("-h", "--help") for arg in argv):
        sys.exit("usage: python cli.py export CHECKPOINT OUT_DIR: the Hugging Face model of a checkpoint written "
                 "by cli.py fit, as a save_pretrained folder")
    out = export_checkpoint(argv[0], argv[1])
    print(f"exported {argv[0]} -> {out}")


def presets_main(argv: list[str]) -> None:
    from modules.lm import PRESETS, TRAINED_PRESETS, presets_root, resolve_model_path

    known = [*PRESETS, *TRAINED_PRESETS]
    if any(name in ("-h", "--help") for name in argv):
        sys.exit(f"usage: python cli.py presets [NAME ...]: build the embedded presets (default: all of {known}) "
                 f"into .cache/presets")
    unknown = [name for name in argv if name not in known]
    if unknown:
        sys.exit(f"unknown preset(s) {unknown}; choose from {known}")
    for name in argv or known:
        ready = (presets_root() / name / "config.json").exists()
        print(f"preset {name}: {resolve_model_path(name)}" + (" (already built)" if ready else " (built)"), flush=True)


def missing_input_hint(error: BaseException, argv: list[str]) -> str:
    """For a missing file or folder, the other configs that name it: usually the earlier stage writing it."""
    import re

    match = re.search(r"not found: (\S+)", str(error))
    if match is None:
        return ""
    missing = match.group(1)
    running = {str(Path(argv[i + 1] if arg == "--config" else arg.split("=", 1)[1]).resolve())
               for i, arg in enumerate(argv) if (arg == "--config" and i + 1 < len(argv)) or arg.startswith("--config=")}
    root = Path(__file__).resolve().parent
    naming = sorted(str(path.relative_to(root)) for path in (root / "configs").rglob("*.yaml")
                    if str(path.resolve()) not in running and missing in path.read_text(encoding="utf-8"))
    if naming:
        return (f"\nhint: {missing} is also named in {', '.join(naming)}: run the stage that writes it first "
                f"(each config's header says what it reads and writes; recipes/ chain the stages)")
    return "\nhint: run the stage or recipe that writes it first, or point the config at an existing path"


PROJECT_PACKAGES = tuple(Path(__file__).resolve().parent / name for name in ("modules", "datamodules", "callbacks"))


def is_setting_error(error: BaseException) -> bool:
    """A ValueError from a ``raise`` statement of the project's own checks (a misspelt loss, split or subset
    name): its message names the setting and the choices. Not one from a library, nor one that a built-in
    raised inside project code (a failed unpacking, ``int("x")``): those are bugs and keep their traceback."""
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    raised_in = Path(frame.tb_frame.f_code.co_filename).resolve()
    if not any(raised_in.is_relative_to(package) for package in PROJECT_PACKAGES):
        return False
    return linecache.getline(str(raised_in), frame.tb_lineno).lstrip().startswith("raise ")


def run_reporting_errors(command) -> None:
    """Run ``command()``. Bad input, a bad setting or a missing earlier stage (also when jsonargparse wraps it
    while building a class) ends the process with one ``error:`` line that says what and where, and exit
    status 1; a traceback would bury it (``CLI_TRACEBACK=1`` shows it). Other errors keep their traceback."""
    from datamodules.common import DataError

    try:
        command()
    except Exception as raised:
        error: BaseException | None = raised
        # follow explicit chaining only ("raise ... from"): an error merely raised while handling another is
        # not its cause
        while error is not None and not (isinstance(error, (NonFiniteLossError, DataError, FileNotFoundError,
                                                            FileExistsError, CheckpointClassError))
                                         or is_setting_error(error)):
            error = error.__cause__
        if error is None or os.environ.get("CLI_TRACEBACK"):
            raise
        print(f"error: {error}{missing_input_hint(error, sys.argv)}\n(CLI_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)


def entry(argv: list[str] | None = None) -> None:
    """The command line: ``export`` and ``presets`` are plain commands, anything else is LightningCLI's
    (``argv`` None: the process's own arguments)."""
    commands = {"export": export_main, "presets": presets_main}
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in commands:
        run_reporting_errors(lambda: commands[words[0]](words[1:]))
    else:
        run_reporting_errors(main if argv is None else lambda: main(argv))


if __name__ == "__main__":
    entry()
