"""Shared helpers: run cli.py in-process with everything written under a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_run_args(tmp_path: Path, name: str = "run") -> list[str]:
    """Overrides that send logs and checkpoints into ``tmp_path`` and keep output short."""
    return [
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.logger.init_args.name={name}",
        f"--checkpoint.dirpath={tmp_path / name / 'checkpoints'}",
        f"--export.dirpath={tmp_path / name / 'export'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests: they gain nothing from more threads and stall when cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(tmp_path):
    """``run_cli(subcommand, config, *overrides)`` runs cli.py in-process and returns the CLI object."""
    import cli

    def run(subcommand: str, config: str, *overrides: str, name: str = "run"):
        args = [subcommand, "--config", str(ROOT / config), *quiet_run_args(tmp_path, name), *overrides]
        return cli.main(args)

    return run


SMALL_SFT = ["--data.init_args.train_size=64", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
             "--data.init_args.batch_size=8", "--model.init_args.max_new_tokens=8", "--trainer.max_steps=4",
             "--trainer.val_check_interval=4", "--test_after_fit=false"]
SMALL_REWARD = ["--model.init_args.model=tiny", "--data.init_args.train_size=64", "--data.init_args.val_size=24", "--data.init_args.test_size=24",
                "--data.init_args.batch_size=8", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                "--test_after_fit=false"]


def padless_model(path: Path) -> Path:
    """A tiny-shaped model folder whose tokenizer has no pad token and none of the usual pad tokens in its
    vocabulary, as Llama-2's; random weights."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from modules import lm

    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=lm.END, unk_token=lm.UNK,
                                        additional_special_tokens=[lm.SYSTEM, lm.USER, lm.ASSISTANT])
    tokenizer.chat_template = lm.CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    # said outright, as Llama-2's files do: without the key, transformers gives a Qwen2 folder Qwen2's pad token
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": None}))
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=None, bos_token_id=None, **lm.PRESETS["tiny"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    assert lm.load_tokenizer(str(path)).pad_token_id is None
    return path
