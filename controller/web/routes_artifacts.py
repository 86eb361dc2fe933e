"""`GET|HEAD /artifacts/{sha256}`: the bytes of an artifact for devices (controller/artifacts.py).

Devices authenticate with their gateway token (`Authorization: Bearer nft_…`), checked against the gateway's token
table, so `nanofleet revoke` closes this door too; the operator token works as well (to check a file by hand).
Starlette's FileResponse answers Range requests: `206` with `Content-Range` for `bytes=N-` / `bytes=N-M`, `416`
with `Content-Range: bytes */SIZE` past the end; the ETag is the sha256 (`If-Range` with it resumes safely).
Every refusal is counted (`ctx.artifact_counts["…"]`) and answered with the one JSON error body.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, Response

from nanofleet.controller.artifacts import ArtifactNotFound, ArtifactRefused

from . import schemas
from .context import Web
from .security import Unauthorized, WebError

router = APIRouter()
_ERR = {"model": schemas.ErrorOut}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the whole artifact"},
    206: {"content": {"application/octet-stream": {}}, "description": "the requested range"},
    401: {**_ERR, "description": "missing or wrong device token"},
    404: {**_ERR, "description": "no artifact with that sha256, or none served"},
    416: {"description": "range past the end (Content-Range: bytes */SIZE)"},
}
Sha = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="the artifact's sha256 (lowercase hex)")]


class _ArtifactResponse(FileResponse):
    """FileResponse in 1 MB sends instead of 64 KB: models are tens of MB to GB, and each send crosses the
    middleware and uvicorn's flow control (bench/bench_artifacts.py measured the difference)."""

    chunk_size = 1 << 20


def _caller(ctx: Web, request: Request) -> str:
    """`device:<id>` or `operator`; Unauthorized otherwise (counted by reason)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        ctx.artifact_counts["unauthenticated"] += 1
        raise Unauthorized("missing_token", "send 'Authorization: Bearer <device token>' (agent.yaml gateway_token)")
    why = "this controller checks no device tokens (started without --gateway-db)"
    if ctx.device_tokens is not None:
        try:
            return "device:" + ctx.device_tokens.check(token)
        except ArtifactRefused as exc:
            why = str(exc)
    if ctx.auth.check_token(token):
        return "operator"
    ctx.artifact_counts["denied"] += 1
    raise Unauthorized("invalid_token", why)


# a dependency, so the token is checked before the path is validated (a caller without one learns nothing of it)
Caller = Annotated[str, Depends(_caller)]


@router.head("/artifacts/{sha256}", tags=["artifacts"], operation_id="head_artifact", responses=_RESPONSES,
             summary="An artifact's size and ETag (devices: gateway token)")
@router.get("/artifacts/{sha256}", tags=["artifacts"], operation_id="get_artifact", responses=_RESPONSES,
            response_class=Response,
            summary="An artifact's bytes (devices: gateway token), with Range")
def get_artifact(ctx: Web, caller: Caller, sha256: Sha) -> Response:
    if ctx.artifacts is None:
        raise WebError(404, "artifacts_disabled", "this controller serves no artifacts")
    try:
        path = ctx.artifacts.path(sha256)
    except ArtifactNotFound as exc:
        ctx.artifact_counts["not_found"] += 1
        raise WebError(404, "artifact_not_found", str(exc)) from exc
    ctx.artifact_counts["served"] += 1
    return _ArtifactResponse(path, media_type="application/octet-stream", headers={"etag": f'"{sha256}"'},
                        stat_result=path.stat())
