"""The point-of-care web app: a JSON API around `Predictor` plus a no-build page (static/).

Each uploaded image is encoded ONCE; its embedding lives in a bounded LRU cache under an id, and
every prompt on it runs only the mask decoder (as does the automatic mode, when the model has that
head). The predictor is not re-entrant, so every model
call (encode or decode) holds one lock; the cache has its own lock so that health checks and
cache look-ups never wait for an encoding.
"""

from __future__ import annotations

import base64
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from uniultra import __version__
from uniultra.serve.uploads import UploadError, decode_upload, display_png, mask_png

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_CACHE_SIZE = 8
DEFAULT_MAX_PIXELS = 40_000_000
# Multipart framing around the file (boundaries, part headers) on top of the file's own bytes.
_MULTIPART_SLACK = 64 * 1024
UPLOAD_PATH = "/api/images"
MAX_POINTS = 256

ERRORS = {
    400: "the bytes cannot be decoded as an image",
    404: "unknown image id (never uploaded, deleted, or evicted from the cache)",
    409: "the model has no automatic (no-prompt) head",
    413: "upload or image too large",
    415: "unsupported file type",
    422: "invalid prompt (outside the image, degenerate box, labels not matching points, ...)",
}


# --- API schema ---------------------------------------------------------------------------------

class ErrorResponse(BaseModel):
    detail: str = Field(description="What is wrong, in words a user can act on")


class ImageInfo(BaseModel):
    id: str = Field(description="Image id for the predict, mask and image endpoints")
    width: int = Field(description="Image width in pixels (x runs from 0 to width)")
    height: int = Field(description="Image height in pixels (y runs from 0 to height)")
    format: str = Field(description="Format the upload was decoded as: png, jpeg or dicom")
    encode_ms: float = Field(description="Time spent computing the image embedding, in milliseconds")
    image_url: str = Field(description="8-bit PNG rendering of the image for display (DICOM and 16-bit included)")


class PredictRequest(BaseModel):
    box: list[float] | None = Field(
        default=None, min_length=4, max_length=4,
        description="Box [x0, y0, x1, y1] in image pixels (x = column, y = row), 0 <= x0 < x1 <= width, "
                    "0 <= y0 < y1 <= height; null for points only",
        examples=[[40, 30, 160, 140]],
    )
    points: list[Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list, max_length=MAX_POINTS,
        description="Clicks [[x, y], ...] in image pixels (pixel indices)",
        examples=[[[100, 80]]],
    )
    labels: list[int] = Field(
        default_factory=list, max_length=MAX_POINTS,
        description="One label per point: 1 = foreground (positive), 0 = background",
        examples=[[1]],
    )
    multimask: bool = Field(
        default=False, description="Let the decoder propose 3 masks and return the best-scoring one",
    )


class AutoRequest(BaseModel):
    modality: str | None = Field(
        default=None,
        description="Modality channel of the automatic head (one of /api/health's `modalities`); "
                    "null when the model has a single channel",
        examples=["busi"],
    )


class PredictResponse(BaseModel):
    id: str = Field(description="Image id")
    width: int = Field(description="Mask width in pixels (= image width)")
    height: int = Field(description="Mask height in pixels (= image height)")
    score: float = Field(description="Predicted IoU of the returned mask; in automatic mode the highest "
                                     "patch probability (how sure the model is that the target is present)")
    scores: list[float] = Field(description="Predicted IoU of every candidate (3 with multimask, else 1)")
    foreground_pixels: int = Field(description="Number of mask pixels")
    mask_png_base64: str = Field(description="The mask as a base64 8-bit gray PNG, 0 = background, 255 = object")
    mask_url: str = Field(description="URL of the latest mask of this image as PNG (for download)")
    box: list[float] | None = Field(description="The box that was used, in image pixels")
    points: list[list[float]] = Field(description="The points that were used, in image pixels")
    labels: list[int] = Field(description="The labels of the points")
    decode_ms: float = Field(description="Time spent in the decoder and mask post-processing, in milliseconds")


class Health(BaseModel):
    status: str = Field(description="'ok' when the server answers")
    version: str = Field(description="UniUltra version")
    model: str = Field(description="Model preset name")
    image_size: int = Field(description="Model input size in pixels")
    cached_images: int = Field(description="Images whose embedding is cached now")
    cache_size: int = Field(description="Most embeddings kept; the least recently used is dropped first")
    max_upload_bytes: int = Field(description="Largest accepted upload in bytes")
    auto: bool = Field(description="Whether the model segments without prompts (POST /api/images/{id}/auto)")
    modalities: list[str] = Field(description="Modality channels of the automatic head to choose from "
                                              "(empty when one channel serves every image)")


# --- state ----------------------------------------------------------------------------------------

@dataclass
class _Entry:
    predictor: Any
    width: int
    height: int
    display_png: bytes
    mask_png: bytes | None = None


class ImageCache:
    """Bounded LRU of encoded images, keyed by random ids."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache size must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, entry: _Entry) -> str:
        image_id = secrets.token_urlsafe(12)
        with self._lock:
            self._items[image_id] = entry
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> _Entry:
        with self._lock:
            entry = self._items.get(image_id)
            if entry is None:
                raise HTTPException(404, f"unknown image id {image_id!r}: upload the image again "
                                         f"(the server keeps the last {self.capacity} images)")
            self._items.move_to_end(image_id)
            return entry

    def remove(self, image_id: str) -> None:
        with self._lock:
            if self._items.pop(image_id, None) is None:
                raise HTTPException(404, f"unknown image id {image_id!r}")


# --- app ------------------------------------------------------------------------------------------

def create_app(
    model_or_factory: Any,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    cache_size: int = DEFAULT_CACHE_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    serve_static: bool = True,
) -> FastAPI:
    """The web app for a `SAM2ImageModel`, an `AutoSegmenter` (adds the automatic mode), or a factory
    returning a fresh `Predictor`-like object (automatic mode when it has `predict_auto`).

    A factory is called once per uploaded image (the predictor then holds that image's embedding);
    all predictors made by it must be safe to use one at a time, which the app's lock guarantees.
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max upload size must be positive, got {max_upload_mb} MB")
    factory = _predictor_factory(model_or_factory)
    model_info = _model_info(factory())
    max_bytes = int(max_upload_mb * 2**20)
    cache = ImageCache(cache_size)
    model_lock = threading.Lock()

    app = FastAPI(
        title="UniUltra",
        version=__version__,
        description="Interactive ultrasound segmentation. Upload an image once (its embedding is computed and "
                    "cached), then send box / point prompts, or none at all with a model that has an automatic "
                    "head: each runs only the mask decoder. Coordinates are image pixels, x = column, y = row.",
    )
    app.state.cache = cache
    app.state.model_lock = model_lock
    app.state.max_upload_bytes = max_bytes
    app.add_middleware(_BodyLimit, path=UPLOAD_PATH, limit=max_bytes + _MULTIPART_SLACK)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; frame-ancestors 'none'",
        )
        return response

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client; the server goes on serving.
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}

    @app.get("/api/health", response_model=Health, summary="Server and model status")
    def health() -> Health:
        return Health(status="ok", version=__version__, model=model_info["name"], image_size=model_info["size"],
                      cached_images=len(cache), cache_size=cache.capacity, max_upload_bytes=max_bytes,
                      auto=model_info["auto"], modalities=model_info["modalities"])

    @app.post(
        UPLOAD_PATH, response_model=ImageInfo, summary="Upload an image and compute its embedding once",
        responses=error_responses(400, 413, 415),
    )
    def upload_image(
        file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM file (one frame)")],
        frame: Annotated[int | None, Query(ge=0, description="Frame of a multi-frame DICOM")] = None,
    ) -> ImageInfo:
        data = file.file.read(max_bytes + 1)
        try:
            decoded = decode_upload(data, file.content_type, file.filename, max_bytes=max_bytes,
                                    max_pixels=max_pixels, frame=frame)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        predictor = factory()
        start = time.perf_counter()
        with model_lock:
            predictor.set_image(decoded.image)
        encode_ms = 1000 * (time.perf_counter() - start)
        image_id = cache.add(_Entry(predictor, decoded.width, decoded.height, display_png(decoded.image)))
        return ImageInfo(id=image_id, width=decoded.width, height=decoded.height, format=decoded.kind,
                         encode_ms=round(encode_ms, 1), image_url=f"{UPLOAD_PATH}/{image_id}/image.png")

    @app.post(
        UPLOAD_PATH + "/{image_id}/predict", response_model=PredictResponse,
        summary="Segment with a box and/or points (runs only the decoder)", responses=error_responses(404, 422),
    )
    def predict(image_id: str, request: PredictRequest) -> PredictResponse:
        entry = cache.get(image_id)
        box = np.asarray(request.box, dtype=np.float64) if request.box is not None else None
        points = np.asarray(request.points, dtype=np.float64).reshape(-1, 2) if request.points else None
        labels = np.asarray(request.labels, dtype=np.int64) if request.labels else None
        if labels is not None and points is None:
            raise HTTPException(422, f"{len(request.labels)} labels but no points: give one label per point")
        if labels is not None and not np.isin(labels, (0, 1)).all():
            raise HTTPException(422, f"point labels must be 1 (foreground) or 0 (background), got {request.labels}")
        start = time.perf_counter()
        try:
            with model_lock:
                masks, scores, _ = entry.predictor.predict(box=box, points=points, labels=labels,
                                                           multimask=request.multimask)
        except ValueError as exc:  # the predictor's prompt validation
            raise HTTPException(422, _plain_numbers(str(exc))) from exc
        best = int(np.argmax(scores))
        return _mask_response(image_id, entry, masks[best], [float(s) for s in scores], start,
                              box=request.box, points=[list(p) for p in request.points], labels=request.labels)

    @app.post(
        UPLOAD_PATH + "/{image_id}/auto", response_model=PredictResponse,
        summary="Segment without any prompt (automatic head; runs only the decoder)",
        responses=error_responses(404, 409, 422),
    )
    def predict_auto(image_id: str, request: AutoRequest) -> PredictResponse:
        entry = cache.get(image_id)
        if not model_info["auto"]:
            raise HTTPException(409, f"model {model_info['name']} has no automatic head: segment with a box or "
                                     "points, or serve a checkpoint from `uniultra auto train`")
        start = time.perf_counter()
        try:
            with model_lock:
                mask, score, _ = entry.predictor.predict_auto(request.modality)
        except ValueError as exc:  # unknown modality: the model lists the ones it knows
            raise HTTPException(422, str(exc)) from exc
        return _mask_response(image_id, entry, mask, [score], start, box=None, points=[], labels=[])

    png_response = {200: {"content": {"image/png": {}}, "description": "PNG image"}}

    @app.get(
        UPLOAD_PATH + "/{image_id}/mask.png", response_class=Response, summary="Download the latest mask as PNG",
        responses={**png_response, **error_responses(404)},
    )
    def latest_mask(image_id: str) -> Response:
        entry = cache.get(image_id)
        if entry.mask_png is None:
            raise HTTPException(404, "no mask yet for this image: send a prompt to /predict first")
        return Response(entry.mask_png, media_type="image/png", headers={
            "Content-Disposition": f'attachment; filename="uniultra-mask-{image_id}.png"',
            "Cache-Control": "no-store"})

    @app.get(
        UPLOAD_PATH + "/{image_id}/image.png", response_class=Response, summary="The image as an 8-bit PNG",
        responses={**png_response, **error_responses(404)},
    )
    def image_png(image_id: str) -> Response:
        return Response(cache.get(image_id).display_png, media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.delete(UPLOAD_PATH + "/{image_id}", status_code=204, response_class=Response,
                summary="Forget an image and its embedding", responses=error_responses(404))
    def delete_image(image_id: str) -> Response:
        cache.remove(image_id)
        return Response(status_code=204)

    if serve_static:
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def _mask_response(image_id: str, entry: _Entry, mask: np.ndarray, scores: list[float], start: float,
                   **prompts: Any) -> PredictResponse:
    """Keep the mask as the image's latest (for download) and describe it; `scores[0]` is the best."""
    png = mask_png(mask)
    entry.mask_png = png
    return PredictResponse(
        id=image_id, width=entry.width, height=entry.height, score=max(scores), scores=scores,
        foreground_pixels=int(mask.sum()), mask_png_base64=base64.b64encode(png).decode("ascii"),
        mask_url=f"{UPLOAD_PATH}/{image_id}/mask.png", decode_ms=round(1000 * (time.perf_counter() - start), 1),
        **prompts,
    )


def _plain_numbers(message: str) -> str:
    """`np.float64(3.0)` -> `3.0` in messages built from numpy scalars."""
    return re.sub(r"np\.(?:float|int)\d+\(([^()]*)\)", r"\1", message)


def _predictor_factory(model_or_factory: Any) -> Callable[[], Any]:
    import torch

    from uniultra.inference.loading import predictor_for

    if isinstance(model_or_factory, torch.nn.Module):
        model = model_or_factory.eval()
        return lambda: predictor_for(model)
    if callable(model_or_factory):
        return model_or_factory
    raise TypeError(f"create_app expects a model or a predictor factory, got {type(model_or_factory).__name__}")


def _model_info(predictor: Any) -> dict[str, Any]:
    config = getattr(getattr(predictor, "model", None), "config", None)
    auto = callable(getattr(predictor, "predict_auto", None))
    return {"name": str(getattr(config, "name", "unknown")), "size": int(getattr(config, "image_size", 0) or 0),
            "auto": auto, "modalities": list(getattr(predictor, "modality_choices", ())) if auto else []}


class _BodyLimit:
    """Refuse request bodies above `limit` bytes on `path` with 413, before any parsing.

    Works for a declared Content-Length (answered at once) and for chunked bodies (counted as
    they arrive and buffered up to the limit, then replayed to the app).
    """

    def __init__(self, app, path: str, limit: int) -> None:
        self.app, self.path, self.limit = app, path, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, int(declared))
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send, size)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: int) -> None:
        limit_mb = (self.limit - _MULTIPART_SLACK) / 2**20
        response = JSONResponse({"detail": f"upload of {size} bytes or more exceeds the limit of {limit_mb:g} MB"},
                                status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
