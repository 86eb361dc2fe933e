"""The tiny random-weight GGUF used by tests, demos and `builtin:tiny-test` (DESIGN.md).

A llama-architecture model with a byte-level vocabulary (260 tokens: unk, bos, eos, 256 byte tokens, pad), 2 layers,
64 dims: real llama.cpp inference at hundreds of tokens per second, meaningless text, ~470 KB. Deterministic: the same
seed gives the same file, byte for byte, so its sha256 can be pinned.
"""

from __future__ import annotations

import os
from pathlib import Path

VOCAB = 260
DIM = 64
LAYERS = 2
HEADS = 4
FFN = 128
CONTEXT = 2048
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_gguf(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the tiny model to `path` atomically (temp file + rename) and return the path."""
    import gguf  # agent extra; imported here so `nanofleet --help` stays light
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("nanofleet-tiny-test")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_vocab_size(VOCAB)
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256)), b"<pad>"]
    types = [2, 3, 3, *([6] * 256), 3]  # UNKNOWN, CONTROL, CONTROL, BYTE..., CONTROL
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(259)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def weights(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    weights("token_embd.weight", VOCAB, DIM)
    w.add_tensor("output_norm.weight", np.ones(DIM, np.float32))
    weights("output.weight", VOCAB, DIM)
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(DIM, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(DIM, np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weights(p + n + ".weight", DIM, DIM)
        weights(p + "ffn_gate.weight", FFN, DIM)
        weights(p + "ffn_up.weight", FFN, DIM)
        weights(p + "ffn_down.weight", DIM, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
