"""Shared fixtures: tiny Llama / Qwen2 / GPT-2 models saved to temporary directories.

Every model is built here from a config and a seed (nothing is downloaded), saved with
safetensors in the transformers layout together with the demo character tokenizer, once
per test session. ``tiny_llama_sharded_dir`` holds the same weights as ``tiny_llama_dir``
split over several shards. ``initializer_range`` is large (0.3, not 0.02) so that the
weights, and hence small adapters on them, visibly move the logits of these tiny models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adapters_zoo.demo_model import build_tokenizer

INIT_RANGE = 0.3
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # grouped-query: k_proj / v_proj are (16, 32), not square
MAX_POSITIONS = 128
SHARD_SIZE = "40KB"  # the tiny Llama is ~110 KB in float32: three shards


@pytest.fixture(scope="session", autouse=True)
def specfuse_home(tmp_path_factory):
    """Every test writes its registry under a temporary home, never into ~/.specfuse."""
    home = tmp_path_factory.mktemp("specfuse-home")
    old = os.environ.get("SPECFUSE_HOME")
    os.environ["SPECFUSE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SPECFUSE_HOME", None)
    else:
        os.environ["SPECFUSE_HOME"] = old


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _token_ids(tok) -> dict:
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


def tiny_model(arch: str, seed: int, tok):
    """A random tiny ``llama`` / ``qwen2`` / ``gpt2`` causal LM (eval mode) for the char tokenizer."""
    ids = _token_ids(tok)
    if arch == "gpt2":  # c_attn / c_proj / c_fc are Conv1D: weights stored (in, out)
        cls = GPT2LMHeadModel
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, initializer_range=INIT_RANGE, **ids)
    else:
        config_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        cfg = config_cls(**TINY, **ids, max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def save(model, tok, out_dir: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save(tiny_model("llama", 0, tokenizer), tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory, tokenizer) -> Path:
    out = save(tiny_model("llama", 0, tokenizer), tokenizer, tmp_path_factory.mktemp("llama-sharded"), SHARD_SIZE)
    assert len(list(out.glob("model-*.safetensors"))) >= 2, "the sharded fixture must have several shards"
    return out


@pytest.fixture(scope="session")
def other_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """Same architecture as ``tiny_llama_dir``, other weights: another base model."""
    return save(tiny_model("llama", 1, tokenizer), tokenizer, tmp_path_factory.mktemp("llama-other"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer) -> Path:
    return save(tiny_model("qwen2", 0, tokenizer), tokenizer, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    return save(tiny_model("gpt2", 0, tokenizer), tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def model_dirs(tiny_llama_dir, tiny_qwen2_dir, tiny_gpt2_dir) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "gpt2": tiny_gpt2_dir}


@pytest.fixture(scope="session")
def reverse_task(tmp_path_factory) -> dict[str, Path]:
    """The suite's ``reverse`` task as JSONL files: 64 train, 32 validation examples."""
    from adapters_zoo.tasks import make_split, suite_tasks, write_jsonl

    task = next(t for t in suite_tasks("conflicting") if t.name == "reverse")
    out = tmp_path_factory.mktemp("reverse-task")
    return {
        "train": write_jsonl(out / "train.jsonl", make_split(task, "train", 64)),
        "validation": write_jsonl(out / "validation.jsonl", make_split(task, "validation", 32)),
    }


@pytest.fixture
def count_gets(monkeypatch):
    """``count_gets(registry)``: the refs of every ``registry.get`` from now on, in order."""

    def install(registry) -> list[str]:
        calls: list[str] = []
        get = registry.get

        def counted(ref: str):
            calls.append(ref)
            return get(ref)

        monkeypatch.setattr(registry, "get", counted)
        return calls

    return install
