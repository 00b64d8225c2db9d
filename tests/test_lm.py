"""The shared LM layer: the embedded preset, pad-token handling, config-only folders."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from modules import lm


def test_preset_reloads_like_a_hub_model(tmp_path):
    path = lm.build_preset("tiny", tmp_path / "tiny", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) and model.config.model_type == "qwen2"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>2+2?<|end|><|assistant|>"
    ids = tokenizer(text + "héllo\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + len("2+2?") + len("héllo\n".encode())  # role tokens are single, text is bytes
    assert tokenizer.decode(ids) == text + "héllo\n"
    again = lm.build_preset("tiny", tmp_path / "again", seed=3)
    for a, b in zip(model.parameters(), AutoModelForCausalLM.from_pretrained(again).parameters()):
        assert torch.equal(a, b)  # seeded: the same preset everywhere


def test_pad_equal_to_eos_is_replaced_by_a_distinct_pad_token():
    tokenizer = lm.build_byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    size = len(tokenizer)
    assert lm.ensure_distinct_pad_token(tokenizer) is False  # an existing <|pad|> token is reused
    assert tokenizer.pad_token == "<|pad|>" and len(tokenizer) == size
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_config_only_folder_gives_fresh_weights(tmp_path):
    lm.build_byte_tokenizer().save_pretrained(tmp_path)
    Qwen2Config(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path)
    assert lm.has_config_only(str(tmp_path))
    model = lm.load_model(str(tmp_path), kind="sequence_classification", num_labels=1)
    assert model.config.hidden_size == 32 and model.score.out_features == 1


def test_trained_preset_builder_writes_a_loadable_sft_model(tmp_path):
    from modules.sft import build_arithmetic_preset

    path = build_arithmetic_preset(lm.resolve_model_path("tiny"), tmp_path / "tiny-sft", steps=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(lm.resolve_model_path("tiny"))
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters())]
    assert all(changed)
    assert AutoTokenizer.from_pretrained(path).chat_template == lm.CHAT_TEMPLATE
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_presets_command_builds_named_presets_and_rejects_unknown_ones(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, lm.PRESETS_ROOT_ENV: str(tmp_path)}
    built = subprocess.run([sys.executable, "cli.py", "presets", "tiny"], cwd=repo, env=env, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    assert "(built)" in built.stdout
    assert AutoTokenizer.from_pretrained(tmp_path / "tiny").chat_template == lm.CHAT_TEMPLATE
    again = subprocess.run([sys.executable, "cli.py", "presets", "tiny"], cwd=repo, env=env, capture_output=True,
                           text=True)
    assert "(already built)" in again.stdout
    unknown = subprocess.run([sys.executable, "cli.py", "presets", "tiny-xl"], cwd=repo, env=env,
                             capture_output=True, text=True)
    assert unknown.returncode != 0 and "unknown preset(s) ['tiny-xl']" in unknown.stderr
    assert not (tmp_path / "tiny-xl").exists()
