"""Where each model source lives in the agent's cache folder (`<data_dir>/models`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from nanofleet.config import ModelSpec

BUILTINS = {"tiny-test": "tiny-test.gguf"}


@dataclass(frozen=True, slots=True)
class ModelFile:
    name: str                 # what /v1/models and telemetry call it
    path: Path                # where the GGUF is (or will be)
    url: str | None = None    # download URL for remote sources
    sha256: str | None = None
    builtin: str | None = None  # name of a generated builtin model


@dataclass(frozen=True, slots=True)
class CachedFile:
    name: str
    path: Path
    size: int
    partial: bool  # a download in progress or interrupted (resumable)


def url_for(source: str) -> str:
    """`hf://owner/repo/path/file.gguf` → the Hugging Face resolve URL; http(s) URLs unchanged."""
    if source.startswith("hf://"):
        owner, repo, *rest = source[len("hf://"):].split("/")
        if not rest:
            raise ValueError(f"{source!r}: expected hf://owner/repo/path/to/file.gguf")
        return f"https://huggingface.co/{owner}/{repo}/resolve/main/{'/'.join(rest)}"
    return source


def cache_name(url: str, sha256: str | None) -> str:
    base = Path(urlparse(url).path).name or "model.gguf"
    if not base.endswith(".gguf"):  # e.g. the controller's /artifacts/<sha256>: still a model in the cache listing
        base += ".gguf"
    tag = (sha256 or hashlib.sha256(url.encode()).hexdigest())[:12]
    return f"{tag}-{base}"


def resolve(spec: ModelSpec, cache_dir: Path) -> ModelFile:
    source = spec.source
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTINS:
            raise ValueError(f"model.source: unknown builtin model {name!r} (known: {', '.join(BUILTINS)})")
        return ModelFile(name, cache_dir / BUILTINS[name], sha256=spec.sha256, builtin=name)
    if source.startswith("file:"):
        path = Path(source[len("file:"):]).expanduser()
        return ModelFile(path.stem, path, sha256=spec.sha256)
    url = url_for(source)
    path = cache_dir / cache_name(url, spec.sha256)
    return ModelFile(Path(urlparse(url).path).stem, path, url=url, sha256=spec.sha256)


def part_path(final: Path) -> Path:
    """The download-in-progress name: hidden, beside the final one, never mistaken for a model."""
    return final.with_name(f".{final.name}.part")


def list_cache(cache_dir: Path) -> list[CachedFile]:
    if not cache_dir.is_dir():
        return []
    out = []
    for p in sorted(cache_dir.iterdir()):
        if p.is_file() and p.name.endswith(".part"):
            out.append(CachedFile(p.name[1:-len(".part")], p, p.stat().st_size, True))
        elif p.is_file() and p.suffix == ".gguf":
            out.append(CachedFile(p.name, p, p.stat().st_size, False))
    return out


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def cache_report(cache_dir: Path) -> str:
    files = list_cache(cache_dir)
    lines = [f"{f.name:<48} {human_size(f.size):>10}{'  (partial download)' if f.partial else ''}" for f in files]
    total = sum(f.size for f in files)
    lines.append(f"{len(files)} file(s), {human_size(total)} in {cache_dir}")
    return "\n".join(lines)
