"""The demo base model: a character tokenizer, tiny Llama builders and a seeded pretraining.

- ``build_tokenizer()``: one token per character (printable ASCII and newline) plus
  ``<pad> <s> </s> <unk>``; ``<s>`` is prepended on encode; saved as ``tokenizer.json``
  so ``AutoTokenizer.from_pretrained(dir)`` works offline. Its chat template renders a
  conversation as the raw prompts the tasks use (user text, then assistant text + eos),
  so a chat request ``flip:abc=`` asks what the completion ``flip:abc=`` asks.
- ``build_tiny_model(seed)`` / ``save_tiny_model(dir, seed)``: a random, very small
  Llama for tests (hidden 32, 2 layers, grouped-query attention so k/v are not square).
- ``pretrain_base(dir, seed, quick=...)``: the demo base (hidden 128, 4 layers) trained
  on every op of ``adapters_zoo.tasks`` under the op's own key (``rev:abc=cba``), on
  train-split inputs only. The suites ask for the same ops under new prefixes
  (``flip:abc=``), which the base has never seen: it scores low on them as asked, and an
  adapter only has to route a new prefix to a skill the base has.

Everything is deterministic given the seed (same thread count, same machine).
"""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from adapters_zoo.data import IGNORE_INDEX, pad_batch
from adapters_zoo.files import canonicalize_file
from adapters_zoo.loop import Schedule, optimize
from adapters_zoo.tasks import EOS, Task, pretraining_example, pretraining_tasks

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())  # newline + ASCII 32..126
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
DEMO_MAX_POSITIONS = 256  # task sequences are < 40 tokens; room for chat turns
PRETRAIN_FORMAT = 3  # bump when the pretraining data or loop changes: invalidates caches


# --- tokenizer ------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer; ``encode`` prepends ``<s>``, ``decode`` joins characters."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # decoder-only generation
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=DEMO_MAX_POSITIONS,
    )


# --- models ---------------------------------------------------------------------------


def _config(tokenizer: PreTrainedTokenizerFast, defaults: dict, overrides: dict) -> LlamaConfig:
    settings = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": DEMO_MAX_POSITIONS,
        "tie_word_embeddings": False,  # lm_head is its own linear layer, adaptable like the rest
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **defaults,
        **overrides,
    }
    return LlamaConfig(**settings)


TINY_DEFAULTS = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query: k_proj/v_proj are (16, 32), not square
}
DEMO_DEFAULTS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def tiny_config(**overrides) -> LlamaConfig:
    return _config(build_tokenizer(), TINY_DEFAULTS, overrides)


def _model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model.eval()


def build_tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama (float32, eval mode); ``overrides`` go to ``LlamaConfig``."""
    return _model(tiny_config(**overrides), seed)


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for weights in out_dir.glob("*.safetensors"):
        canonicalize_file(weights)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_tiny_model(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny Llama and the tokenizer in the transformers layout (safetensors)."""
    return save_model(build_tiny_model(seed, **overrides), build_tokenizer(), out_dir)


# --- pretraining ----------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSettings:
    seed: int
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50  # steps of linear warmup, then cosine to lr / 10
    weight_decay: float = 0.01
    threads: int = 2
    model: dict | None = None  # LlamaConfig overrides on DEMO_DEFAULTS
    format: int = PRETRAIN_FORMAT


QUICK_STEPS = 1500
FULL_STEPS = 6000


def _batch(tokenizer, rng: random.Random, tasks: list[Task], batch_size: int) -> dict[str, torch.Tensor]:
    """Prompt+completion sequences, right padded; labels only on the completion."""
    examples = [pretraining_example(rng.choice(tasks), rng) for _ in range(batch_size)]
    prompts = tokenizer([ex["prompt"] for ex in examples])["input_ids"]
    completions = tokenizer([ex["completion"] for ex in examples], add_special_tokens=False)["input_ids"]
    rows = [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions)]
    return pad_batch(rows, tokenizer.pad_token_id, "cpu")


def _cached(out_dir: Path, settings: PretrainSettings) -> bool:
    marker = out_dir / "pretrain.json"
    if not marker.is_file() or not (out_dir / "model.safetensors").is_file():
        return False
    try:
        return json.loads(marker.read_text())["settings"] == json.loads(json.dumps(asdict(settings)))
    except (ValueError, KeyError):
        return False


def pretrain_base(
    out_dir: str | Path,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    model_overrides: dict | None = None,
    progress: bool = True,
    threads: int = 2,
) -> Path:
    """Pretrain the demo base into ``out_dir`` (transformers layout), or reuse it.

    ``steps`` defaults to ``QUICK_STEPS`` (about two minutes on 2 CPU cores) when
    ``quick``, else ``FULL_STEPS``. A directory whose ``pretrain.json`` records the same
    settings is returned as is; the marker is written last, so a run that died midway
    is redone. ``threads`` is part of the settings (float sums depend on it); on a machine
    shared with other jobs 1 thread can be several times faster than 2.
    """
    out_dir = Path(out_dir)
    steps = steps if steps is not None else (QUICK_STEPS if quick else FULL_STEPS)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    settings = PretrainSettings(seed=seed, steps=steps, threads=threads, model=model_overrides or None)
    if _cached(out_dir, settings):
        return out_dir
    (out_dir / "pretrain.json").unlink(missing_ok=True)

    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    try:
        start = time.perf_counter()
        model, tokenizer, last_loss = _train(settings, progress)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)

    save_model(model.eval(), tokenizer, out_dir)
    record = {"settings": asdict(settings), "final_loss": last_loss, "seconds": round(seconds, 1)}
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _train(settings: PretrainSettings, progress: bool) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, float]:
    tokenizer = build_tokenizer()
    model = _model(_config(tokenizer, DEMO_DEFAULTS, settings.model or {}), settings.seed).train()
    rng = random.Random(f"pretrain:{settings.seed}")
    tasks = pretraining_tasks()

    def loss_fn(step: int) -> torch.Tensor:
        return model(**_batch(tokenizer, rng, tasks, settings.batch_size)).loss

    schedule = Schedule(settings.steps, settings.lr, settings.warmup, floor=0.1)
    losses = optimize(model.parameters(), loss_fn, schedule, betas=(0.9, 0.98), weight_decay=settings.weight_decay,
                      progress="pretrain demo base" if progress else None,
                      on_step=lambda step, loss: {"loss": f"{loss:.3f}"} if step % 10 == 0 else None)
    loss_value = losses[-1]
    return model, tokenizer, loss_value
