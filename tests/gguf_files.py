"""Synthetic GGUF files written with the ``gguf`` writer: a decoder of a given architecture and size.

Weights are seeded random; matrices are stored in ``qtype`` (norms and biases in F32), a tiny
byte-level BPE tokenizer (256 byte tokens + two specials) and a chat template ride along.
``repeat_block`` makes big files cheap to write: the matrices are one quantized row tiled.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize
from transformers.convert_slow_tokenizer import bytes_to_unicode

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
SPECIALS = ["<|end|>", "<|pad|>"]
# per architecture: (per-layer tensors beyond llama's, whether Q/K get biases)
_EXTRA = {"llama": [], "mistral": [], "qwen2": ["bias"], "qwen3": ["qk_norm"],
          "gemma3": ["qk_norm", "post_norms"]}


def write_gguf(path: Path, arch: str = "llama", *, hidden: int = 64, ffn: int = 128, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, vocab: int | None = None, qtype=gguf.GGMLQuantizationType.Q8_0,
               tied: bool = True, seed: int = 0, repeat_rows: bool = False, tensor_types: dict | None = None) -> Path:
    """Write a GGUF decoder to ``path``; ``tensor_types`` overrides the type of named tensors."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    tokens = [*bytes_to_unicode().values(), *SPECIALS]
    vocab = vocab or len(tokens)
    gguf_arch = "llama" if arch == "mistral" else arch
    w = gguf.GGUFWriter(str(path), gguf_arch)
    w.add_name("Mistral tiny" if arch == "mistral" else f"{arch} tiny")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(vocab)
    if arch == "gemma3":
        w.add_sliding_window(64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens + [f"<unused{i}>" for i in range(vocab - len(tokens))])
    w.add_token_types([1] * 256 + [3] * (vocab - 256))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.add_pad_token_id(257)
    w.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int) -> None:
        kind = (tensor_types or {}).get(name, qtype)
        if repeat_rows:  # one random row, quantized once, tiled: a big tensor at no cost
            row = quantize(rng.standard_normal((1, cols), dtype=np.float32) * 0.05, kind)
            data = np.ascontiguousarray(np.broadcast_to(row, (rows, row.shape[1])))
        else:
            x = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.3).astype(np.float32)
            data = x if kind == gguf.GGMLQuantizationType.F32 else quantize(x, kind)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=kind)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    vector("output_norm.weight", hidden)
    if not tied:
        matrix("output.weight", vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}"
        vector(f"{b}.attn_norm.weight", hidden)
        matrix(f"{b}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"{b}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"{b}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"{b}.attn_output.weight", hidden, heads * head_dim)
        vector(f"{b}.ffn_norm.weight", hidden)
        matrix(f"{b}.ffn_gate.weight", ffn, hidden)
        matrix(f"{b}.ffn_up.weight", ffn, hidden)
        matrix(f"{b}.ffn_down.weight", hidden, ffn)
        if "bias" in _EXTRA[arch]:
            for proj, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                w.add_tensor(f"{b}.attn_{proj}.bias", (0.1 * rng.standard_normal(n * head_dim)).astype(np.float32))
        if "qk_norm" in _EXTRA[arch]:
            vector(f"{b}.attn_q_norm.weight", head_dim)
            vector(f"{b}.attn_k_norm.weight", head_dim)
        if "post_norms" in _EXTRA[arch]:
            vector(f"{b}.post_attention_norm.weight", hidden)
            vector(f"{b}.post_ffw_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
