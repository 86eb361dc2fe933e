"""Model files: where a `ModelSpec.source` lives in the cache, downloading with resume and sha256, memory estimates."""

from nanofleet.agent.models.download import ChecksumMismatch, DownloadError, ModelFileError, pull
from nanofleet.agent.models.files import CachedFile, ModelFile, cache_report, list_cache, resolve
from nanofleet.agent.models.memory import estimate_bytes

__all__ = [
    "CachedFile", "ChecksumMismatch", "DownloadError", "ModelFile", "ModelFileError", "cache_report",
    "estimate_bytes", "list_cache", "pull", "resolve",
]
