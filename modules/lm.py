"""Shared language-model plumbing.

- the embedded tiny preset: a real Qwen2 architecture with a byte-level tokenizer built here, saved with
  ``save_pretrained`` so every stage loads it exactly like a hub model;
- loading any HF causal LM or sequence classifier by name or local path;
- masked token log-prob helpers;
- export of a Lightning checkpoint as a ``save_pretrained`` folder.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PRESETS_ROOT_ENV = "TRAINERS_PRESETS"
_REPO_ROOT = Path(__file__).resolve().parent.parent

# Special tokens of the embedded tokenizer. Role markers are single tokens so a chat turn costs two
# tokens of overhead instead of a dozen characters.
PAD, END, SYSTEM, USER, ASSISTANT = "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"
# Never produced by a byte-level tokenizer; declared so that every tokenizer class that may load the
# preset (transformers picks one from the model type) agrees on the vocabulary.
UNK = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# name -> Qwen2 shape. "tiny" is the default of every embedded job; "small" is for quick experiments
# that need more capacity. Both are small enough for a 2-core CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048),
}


# Presets made by training a base preset, built on first use like a hub download:
# name -> ("module:function", base preset). The function writes a save_pretrained folder.
TRAINED_PRESETS: dict[str, tuple[str, str]] = {
    # the tiny preset after a short SFT on the embedded arithmetic task: the "instruct" backbone that
    # reward models start from, and an imperfect policy for DAPO
    "tiny-sft": ("modules.sft:build_arithmetic_preset", "tiny"),
}


def presets_root() -> Path:
    return Path(os.environ.get(PRESETS_ROOT_ENV, _REPO_ROOT / ".cache" / "presets"))


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols, no merges) with role tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=END, unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT], padding_side="right",
        model_max_length=PRESETS["tiny"]["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_preset(name: str, path: str | Path, seed: int = 0) -> Path:
    """Write a preset (config, tokenizer, seeded random weights) to ``path`` with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(tmp)
    config = Qwen2Config(
        vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **PRESETS[name],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp)
    (tmp / "preset.json").write_text(json.dumps({"preset": name, "seed": seed}))
    os.replace(tmp, path)  # atomic: a concurrent or killed build never leaves a half-written preset
    reloaded = load_tokenizer(str(path))
    if len(reloaded) != config.vocab_size:
        raise RuntimeError(f"preset tokenizer reloads with {len(reloaded)} tokens, model has {config.vocab_size}")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map a preset name to its local folder (built on first use); pass anything else through."""
    if name_or_path in TRAINED_PRESETS:
        path = presets_root() / name_or_path
        if not (path / "config.json").exists():
            import importlib

            target, base = TRAINED_PRESETS[name_or_path]
            module_name, _, function = target.partition(":")
            getattr(importlib.import_module(module_name), function)(resolve_model_path(base), path)
        return str(path)
    if name_or_path in PRESETS:
        path = presets_root() / name_or_path
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                build_preset(name_or_path, path)
            except OSError:
                if not (path / "config.json").exists():  # another process won the race
                    raise
        return str(path)
    from datamodules.common import looks_like_local_path

    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        # else transformers takes it for a hub repo id and fails with a message about repo id syntax
        raise FileNotFoundError(f"model folder not found: {name_or_path} (a local path, so not a hub model name)")
    return name_or_path


@contextlib.contextmanager
def naming_the_model(name_or_path: str):
    """Turn a failed hub lookup of a name that is no local folder (a typo'd path, a model not cached while
    offline) into an error that names it; transformers' own message names neither the model nor the folder."""
    try:
        yield
    except OSError as error:
        if Path(name_or_path).expanduser().exists():
            raise
        text = str(error).strip() or type(error).__name__
        if "not a valid model identifier" in text or "Repository Not Found" in text:
            raise FileNotFoundError(f"model not found: {name_or_path} (neither a local folder nor a model on the "
                                    f"Hugging Face hub: {text.splitlines()[0]})") from error
        # offline, unreachable, gated, a full disk ...: the name may be right
        raise FileNotFoundError(f"cannot load the model {name_or_path}: there is no local folder of that name, and "
                                f"loading it from the Hugging Face hub failed: {text}") from error


def generation_sync_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``generate`` arguments for a model whose parameters are DeepSpeed ZeRO-3 partitions with several
    processes running: every generated token is a forward that gathers the parameters from all of them, so a
    process whose batch has finished must go on taking part (``synced_gpus``). transformers sees FSDP by
    itself, but not ZeRO-3 under Lightning's DeepSpeed strategy, which sets up no transformers config."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    partitioned = any(hasattr(param, "ds_id") for param in model.parameters())  # ZeRO-3's partitioned parameters
    return {"synced_gpus": True} if partitioned else {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone, which encodes all text to []
        raise FileNotFoundError(f"no tokenizer in {folder}: it has none of {', '.join(TOKENIZER_FILES)}; save one "
                                f"there (tokenizer.save_pretrained), e.g. the base model's, beside config.json")
    with naming_the_model(path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    return tokenizer


def ensure_distinct_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS. Returns True if a token was added.

    Pooling at the last non-pad token breaks when pad == eos: the real EOS of every sequence looks like
    padding (the classic "reward accuracy stuck at 0.5" failure).
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    for candidate in ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def has_config_only(path: str) -> bool:
    """A local folder with a config.json and no weight files."""
    folder = Path(path)
    return (folder.is_dir() and (folder / "config.json").exists()
            and not any(child.name.endswith(WEIGHT_SUFFIXES) for child in folder.iterdir()))


def load_model(name_or_path: str, kind: str = "causal_lm", dtype: str | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False, num_labels: int = 1, tokenizer=None,
               fused_norms: bool = True):
    """Load a HF model by name or local path. ``kind``: ``causal_lm`` or ``sequence_classification``.
    ``fused_norms``: run its standard RMSNorm layers through torch's fused kernel (``use_fused_rms_norms``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal_lm": AutoModelForCausalLM,
            "sequence_classification": AutoModelForSequenceClassification}.get(kind)
    if auto is None:
        raise ValueError(f"unknown model kind {kind!r}: use 'causal_lm' or 'sequence_classification'")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if kind == "sequence_classification":
        kwargs["num_labels"] = num_labels
    path = resolve_model_path(name_or_path)
    info: dict[str, Any] = {"missing_keys": []}  # a config-only model is fresh by request, not by accident
    if has_config_only(path):
        # a folder holding only config.json: a model of that shape with fresh weights (benchmarks,
        # from-scratch training); from_pretrained would refuse it
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            **({"num_labels": num_labels} if kind == "sequence_classification" else {}))
        kwargs.pop("num_labels", None)
        model = auto.from_config(config, **kwargs)
        if (Path(path) / "generation_config.json").exists():  # else from_config derives one from config.json
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
    elif Path(path).is_dir():
        try:
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
        except Exception as error:  # a damaged folder fails deep inside safetensors or transformers
            raise ValueError(f"{path}: cannot load the model from this folder ({type(error).__name__}: {error}); "
                             f"if the folder is an incomplete export, export it again") from error
    else:
        with naming_the_model(path):
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    # a sequence classifier built on a causal LM starts with a random head: evaluating it untrained is a
    # mistake worth a warning (cli.py), training it is the point
    model.newly_initialized_weights = sorted(info.get("missing_keys", ()))
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if fused_norms:
        use_fused_rms_norms(model)
    return model


def flops_shape(model: torch.nn.Module) -> dict[str, int] | None:
    """What the model-FLOPs count needs (``callbacks.throughput``): non-embedding parameters, layers and
    hidden size; None for a model whose config does not say its layers and width. Call it before FSDP or
    DeepSpeed shard the parameters (ZeRO-3's partitioned parameters are counted by their full size)."""
    config = getattr(model, "config", None)
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(hidden, int):
        return None

    def numel(param: torch.Tensor) -> int:
        return getattr(param, "ds_numel", None) or param.numel()

    embedding = model.get_input_embeddings()
    total = sum(numel(param) for param in model.parameters())
    return {"non_embedding_parameters": total - (numel(embedding.weight) if embedding is not None else 0),
            "layers": layers, "hidden": hidden}


# ----------------------------------------------------------------------------------------------------
# Fused RMSNorm


@functools.cache
def _reference_rms_norm_source() -> str:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _forward_body(LlamaRMSNorm)


def _forward_body(cls: type) -> str:
    return "\n".join(inspect.getsource(cls.forward).splitlines()[1:])  # without the def line


@functools.cache
def is_standard_rms_norm(cls: type) -> bool:
    """A HF RMSNorm class whose forward is Llama's, character for character: weight · x / rms(x), computed
    in float32 and cast back to the input dtype. transformers copies that forward verbatim into most
    families (Qwen2/3, Mistral, Mixtral, Phi-3, Granite, DeepSeek-V3, ...). Variants with another formula
    (Gemma's 1 + weight, OLMo-2's cast order, gated norms) differ in source and keep their own forward."""
    if not cls.__name__.endswith("RMSNorm"):
        return False
    try:
        return _forward_body(cls) == _reference_rms_norm_source()
    except (OSError, TypeError):  # no source to compare (compiled or dynamically built class)
        return False


def fused_rms_norm_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as one fused kernel per direction: torch's ``rms_norm`` accumulates in float32 like
    the original, which instead makes about six element-wise passes over the activations forward and a dozen
    backward (by a count of memory traffic, about a tenth of a 0.5B model's bf16-autocast GPU step; not yet
    measured). With a low-precision input
    the output is rounded once, where the original rounds before the weight product: within one ulp."""
    weight = module.weight
    if hidden_states.dtype != weight.dtype:  # the original promotes to the wider dtype; keep its result
        return type(module).forward(module, hidden_states)
    # the norm runs in the input's dtype, as the original, whatever autocast would pick for rms_norm
    with torch.autocast(hidden_states.device.type, enabled=False):
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, module.variance_epsilon)


def use_fused_rms_norms(model: torch.nn.Module) -> int:
    """Route every standard RMSNorm of ``model`` through ``fused_rms_norm_forward`` (this instance only; the
    class and other models are untouched, and the state dict does not change). Returns how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (is_standard_rms_norm(type(module)) and isinstance(getattr(module, "variance_epsilon", None), float)
                and isinstance(weight, torch.Tensor) and weight.dim() == 1):  # the last dimension's norm only
            # a partial, not a bound method: it pickles and deep-copies with the module
            module.forward = functools.partial(fused_rms_norm_forward, module)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------------
# Token log-probs


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-prob of each next token. ``logits`` (B, T, V) predict ``labels`` (B, T) shifted by one.

    Returns (B, T-1) with zeros where the label is ``ignore_index``. Computed in float32 through
    ``cross_entropy`` so a full (B, T, V) log-softmax is never materialised twice.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != ignore_index
    safe_labels = shifted_labels.masked_fill(~mask, 0)
    logp = -F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), safe_labels.reshape(-1),
                            reduction="none").view_as(safe_labels)
    return logp * mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum",
                     ignore_index: int = -100) -> torch.Tensor:
    """Summed or mean log-prob of the labelled tokens of each row (B,)."""
    logp = token_logprobs(logits, labels, ignore_index)
    if reduction == "sum":
        return logp.sum(-1)
    if reduction == "mean":
        count = (labels[:, 1:] != ignore_index).sum(-1)
        return logp.sum(-1) / count.clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


# ----------------------------------------------------------------------------------------------------
# Export


def replace_folder_atomically(write: Callable[[Path], None], out: str | os.PathLike,
                              marker: str = "config.json") -> Path:
    """Run ``write(folder)`` on a temporary sibling of ``out``, then swap it in with renames.

    A killed or failed export never leaves a half-written folder where the next stage looks: a folder
    holding only config.json would load with fresh weights (``has_config_only``), and a cut weights file
    fails deep inside safetensors. Between the two renames ``out`` is briefly absent, never partial.
    An existing ``out`` is replaced only if it is empty or an earlier output of the same kind (it holds
    ``marker``): exporting into a run's folder by mistake must not delete its checkpoints."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise FileExistsError(f"{out} exists and is not an earlier output of this kind (no {marker}); "
                              f"choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = out.with_name(f".{out.name}.old{os.getpid()}") if out.exists() else None
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out, previous)
    os.replace(tmp, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return out


MODEL_FILES_KEY = "hf_model_files"  # checkpoint entry: {file name: bytes} of the configs and the tokenizer


def model_files(model: torch.nn.Module, tokenizer) -> dict[str, bytes]:
    """config.json, generation_config.json (stop tokens, sampling defaults) and the tokenizer's files as
    bytes: with a state dict, all a model folder needs."""
    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def export_checkpoint(ckpt_path: str, out_dir: str) -> Path:
    """Write the HF model inside a Lightning checkpoint as a ``save_pretrained`` folder.

    Rebuilds the LightningModule from the hyper-parameters stored in the checkpoint on one process,
    loads the weights (a DeepSpeed checkpoint folder is consolidated first) and saves model and tokenizer.
    The model is built from the config and tokenizer the checkpoint carries (``MODEL_FILES_KEY``), so the
    base model it was trained from need not exist here; checkpoints without them rebuild from the base.
    """
    import lightning.pytorch as pl

    ckpt_path = str(ckpt_path)
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    out = Path(out_dir)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    # beside the output (a consolidated checkpoint can be larger than /tmp): the carried model files, and
    # for a DeepSpeed folder of shards its consolidated checkpoint
    with tempfile.TemporaryDirectory(dir=out.resolve().parent, prefix=f".{out.resolve().name}.export") as work:
        if os.path.isdir(ckpt_path):
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            consolidated = os.path.join(work, "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(ckpt_path, consolidated)
            ckpt_path = consolidated
        # mapped, not read: only the class path and the carried files are needed here, and
        # load_from_checkpoint reads the weights
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
        if class_path is None:
            raise ValueError(f"{ckpt_path}: no '_class_path' in hyper_parameters; was it written by cli.py?")
        module_name, _, class_name = class_path.rpartition(".")
        import importlib

        module_cls: type[pl.LightningModule] = getattr(importlib.import_module(module_name), class_name)
        overrides: dict[str, Any] = {}
        base_model = checkpoint["hyper_parameters"].get("model")
        if MODEL_FILES_KEY in checkpoint:  # configs and tokenizer, no weights: built fresh, then loaded
            carried = Path(work) / "model"
            carried.mkdir()
            for name, data in checkpoint[MODEL_FILES_KEY].items():
                (carried / name).write_bytes(data)
            overrides["model"] = str(carried)
        del checkpoint
        from transformers.utils import logging as transformers_logging

        # quiet the base model's "newly initialised head" notice: the checkpoint's weights replace every tensor
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            module = module_cls.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
        finally:
            transformers_logging.set_verbosity(verbosity)
        if not hasattr(module, "export_pretrained"):
            raise ValueError(f"{class_path} has no Hugging Face model to export")
        if overrides and base_model is not None:  # an export records the run's base model as its source
            module.model_name_or_path = base_model
        return module.export_pretrained(out)
