"""How much RAM a model needs: weights (file size) + KV cache for every slot + compute buffers.

Used to refuse a load that would get the agent OOM-killed. The KV size comes from the GGUF header when it can be
read (layers × context × kv-width × 2 tensors × f16); otherwise a tenth of the file size stands in.
"""

from __future__ import annotations

from pathlib import Path

COMPUTE_OVERHEAD = 48 * 2**20


def _kv_bytes(path: Path, n_ctx_total: int) -> int | None:
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        arch = _field(reader, "general.architecture")
        if isinstance(arch, bytes | bytearray | memoryview):
            arch = bytes(arch).decode()
        layers = int(_field(reader, f"{arch}.block_count"))
        emb = int(_field(reader, f"{arch}.embedding_length"))
        heads = int(_field(reader, f"{arch}.attention.head_count"))
        kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv") or heads)
    except Exception:
        return None
    return 2 * layers * n_ctx_total * (emb * kv_heads // max(heads, 1)) * 2


def _field(reader: object, key: str) -> object:
    f = reader.fields[key]  # type: ignore[attr-defined]
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode()
    return value[0]


def estimate_bytes(path: Path, n_ctx: int, n_parallel: int) -> int:
    size = path.stat().st_size
    kv = _kv_bytes(path, n_ctx * n_parallel)
    return size + (kv if kv is not None else size // 10) + COMPUTE_OVERHEAD
