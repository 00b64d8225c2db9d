"""The shared LM layer: the embedded preset, pad-token handling, config-only folders."""

from __future__ import annotations

import pytest
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


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path):
    # transformers alone would build a one-token tokenizer from config.json that encodes all text to []
    Qwen2Config(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer in {tmp_path}: it has none of tokenizer.json"):
        lm.load_tokenizer(str(tmp_path))


def test_generation_stays_in_step_only_with_zero3_partitions_on_several_processes(monkeypatch):
    import torch.distributed as dist

    model = torch.nn.Linear(2, 2)
    assert lm.generation_sync_kwargs(model) == {}  # one process
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert lm.generation_sync_kwargs(model) == {}  # DDP: whole parameters, no collective per token
    model.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on the parameters it partitions (a stand-in here)
    assert lm.generation_sync_kwargs(model) == {"synced_gpus": True}


def test_a_failed_hub_lookup_names_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model not found: exports/bt \(neither a local folder nor a model "
                                                r"on the Hugging Face hub: exports/bt is not a local folder"):
        with lm.naming_the_model("exports/bt"):
            raise OSError("exports/bt is not a local folder and is not a valid model identifier listed on ...\nmore")
    with pytest.raises(FileNotFoundError, match=r"cannot load the model org/model: there is no local folder of that "
                                                r"name, and loading it from the Hugging Face hub failed: couldn't "
                                                r"connect\nmore detail"):
        with lm.naming_the_model("org/model"):  # offline: the name may well be right
            raise OSError("couldn't connect\nmore detail")
    with pytest.raises(OSError, match="damaged") as kept:  # a local folder's own error is left as it is
        with lm.naming_the_model(str(tmp_path)):
            raise OSError("damaged")
    assert not isinstance(kept.value, FileNotFoundError)


def test_an_export_that_fails_midway_leaves_the_previous_folder_whole(tmp_path):
    from modules.reward import RewardModel

    module = RewardModel(model="tiny")
    out = module.export_pretrained(tmp_path / "export")
    before = sorted(p.name for p in out.iterdir())
    assert "config.json" in before and any(name.endswith(".safetensors") for name in before)

    def killed_after_the_config(folder):
        module.model.config.save_pretrained(folder)
        raise KeyboardInterrupt("killed")

    module.write_export = killed_after_the_config
    try:
        module.export_pretrained(out)
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in out.iterdir()) == before  # not a config-only folder (fresh weights)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
    lm.load_model(str(out), kind="sequence_classification")
    # a folder that is not an earlier export (a run's folder, given by mistake) is never replaced
    run_folder = tmp_path / "run"
    (run_folder / "checkpoints").mkdir(parents=True)
    del module.write_export
    import pytest

    with pytest.raises(FileExistsError, match=r"run exists and is not an earlier output of this kind"):
        module.export_pretrained(run_folder)
    assert (run_folder / "checkpoints").is_dir()


def test_a_damaged_model_folder_is_a_clear_error(tmp_path):
    import pytest

    folder = lm.build_preset("tiny", tmp_path / "model")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model: cannot load the model from this folder .* export it again"):
        lm.load_model(str(folder))


def test_trained_preset_builder_writes_a_loadable_sft_model(tmp_path):
    from modules.sft import build_arithmetic_preset

    path = build_arithmetic_preset(lm.resolve_model_path("tiny"), tmp_path / "tiny-sft", steps=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(lm.resolve_model_path("tiny"))
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters())]
    assert all(changed)
    assert AutoTokenizer.from_pretrained(path).chat_template == lm.CHAT_TEMPLATE
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_presets_command_builds_named_presets_and_rejects_unknown_ones(tmp_path, monkeypatch, capsys):
    from cli import entry, presets_main

    monkeypatch.setenv(lm.PRESETS_ROOT_ENV, str(tmp_path))
    entry(["presets", "tiny"])  # `python cli.py presets tiny`, as setup.sh runs it
    assert "(built)" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(tmp_path / "tiny").chat_template == lm.CHAT_TEMPLATE
    presets_main(["tiny"])
    assert "(already built)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"unknown preset\(s\) \['tiny-xl'\]"):
        presets_main(["tiny-xl"])
    assert not (tmp_path / "tiny-xl").exists()


def _rms_norm_by_hand(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_fused_rms_norm_equals_the_model_norm_forward_and_backward(monkeypatch):
    import torch.nn.functional as F
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    calls = []
    monkeypatch.setattr(F, "rms_norm", lambda *args, **kwargs: calls.append(args) or torch.rms_norm(*args, **kwargs))
    torch.manual_seed(0)
    original, fused = Qwen2RMSNorm(48, eps=1e-5), Qwen2RMSNorm(48, eps=1e-5)
    original.weight.data.normal_()
    fused.load_state_dict(original.state_dict())
    assert lm.use_fused_rms_norms(fused) == 1
    x = (torch.randn(3, 7, 48) * 5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = original(x), fused(x2)
    torch.testing.assert_close(y2, _rms_norm_by_hand(x, original.weight, 1e-5), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and calls[0][1] == (48,) and calls[0][3] == 1e-5  # torch's kernel, with the module's eps
    assert torch.equal(y2, y)  # on the CPU torch computes it the same way: bit for bit
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.weight.grad, original.weight.grad, rtol=1e-5, atol=1e-6)
    # a weight of more than one dimension would change what is normalised: such a module keeps its forward
    odd = Qwen2RMSNorm(4)
    odd.weight = torch.nn.Parameter(torch.ones(2, 4))
    assert lm.use_fused_rms_norms(odd) == 0

    # bf16 input with float32 weight: the original promotes to float32; the fused forward defers to it
    x16 = torch.randn(2, 48).bfloat16()
    assert fused(x16).dtype == torch.float32 and torch.equal(fused(x16), original(x16))
    # all-bf16 under autocast: the norm stays in bf16 like the original, within one bf16 rounding of it
    original16, fused16 = Qwen2RMSNorm(48).bfloat16(), Qwen2RMSNorm(48).bfloat16()
    original16.weight.data.normal_()
    fused16.load_state_dict(original16.state_dict())
    lm.use_fused_rms_norms(fused16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused16(x16), original16(x16)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -7, atol=1e-2)


def test_only_norms_with_llama_formula_are_fused():
    from transformers import GemmaConfig, GemmaForCausalLM
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    assert lm.is_standard_rms_norm(LlamaRMSNorm) and lm.is_standard_rms_norm(Qwen3RMSNorm)
    # Gemma scales by 1 + weight; OLMo-2 casts before the weight product: neither is the same function
    assert not lm.is_standard_rms_norm(GemmaRMSNorm) and not lm.is_standard_rms_norm(Olmo2RMSNorm)
    assert not lm.is_standard_rms_norm(torch.nn.RMSNorm)
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert lm.use_fused_rms_norms(gemma) == 0


def test_loaded_models_fuse_their_norms_with_unchanged_outputs_and_survive_copies():
    import copy
    import functools
    import pickle

    fused, plain = lm.load_model("tiny"), lm.load_model("tiny", fused_norms=False)
    layers = fused.config.num_hidden_layers
    patched = [m for m in fused.modules() if isinstance(m.__dict__.get("forward"), functools.partial)]
    assert len(patched) == 2 * layers + 1  # two per decoder layer and the final norm
    assert not any("forward" in m.__dict__ for m in plain.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(10, 200, (3, 30))
    expected = plain(ids).logits
    torch.testing.assert_close(fused(ids).logits, expected, rtol=1e-5, atol=1e-5)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        norm = clone.model.norm
        assert norm.forward.args[0] is norm  # bound to the copy, not to the original module
        torch.testing.assert_close(clone(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_flops_shape_counts_non_embedding_parameters_by_hand():
    model = lm.load_model("tiny", kind="sequence_classification")
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    attention = (c.hidden_size * c.hidden_size + c.hidden_size) + 2 * (c.hidden_size * kv + kv) + c.hidden_size ** 2
    per_layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size  # q,k,v (biased), o; MLP; norms
    expected = c.num_hidden_layers * per_layer + c.hidden_size + c.hidden_size  # final norm, score head
    assert lm.flops_shape(model) == {"non_embedding_parameters": expected, "layers": c.num_hidden_layers,
                                     "hidden": c.hidden_size}
    assert lm.flops_shape(torch.nn.Linear(3, 3)) is None  # no config: no FLOPs count
