"""The point-of-care web app: a JSON API around `Predictor` plus a no-build page (static/).

Each uploaded image is encoded ONCE; its embedding lives in a bounded LRU cache under an id, and
every prompt on it runs only the mask decoder (as does the automatic mode, when the model has that
head). The predictor is not re-entrant, so every model
call (encode or decode) holds one lock; the cache has its own lock so that health checks and
cache look-ups never wait for an encoding. Every request first passes `guard.Guard` (Host
allow-list, optional token, body limits, the client's session: each client has its own cache).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from uniultra import __version__
from uniultra.data.spacing import check_spacing
from uniultra.inference.measurements import measurements_table
from uniultra.inference.presence_gate import CALIBRATED_GATE, PresenceGate
from uniultra.inference.propagation import Propagation, propagate
from uniultra.inference.zoom import tap_modality_for, tight_boxes_for
from uniultra.serve.apidocs import DOCS_CSS, DOCS_CSS_PATH, reference_html
from uniultra.serve.dicom_seg import SegError, write_seg
from uniultra.serve.guard import DEFAULT_ALLOWED_HOSTS, DecodeSlots, Guard
from uniultra.serve.sessions import SessionCache
from uniultra.serve.uploads import UploadError, decode_label_map, decode_upload, display_png, mask_png, upload_stem

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_CACHE_SIZE = 8  # per client
DEFAULT_TOTAL_CACHE_SIZE = 32  # all clients together (embeddings take MBs each)
DEFAULT_MAX_DECODES = 2
DEFAULT_DECODE_WAIT_S = 10.0
DEFAULT_MAX_PIXELS = 40_000_000
# Multipart framing around the file (boundaries, part headers) on top of the file's own bytes.
_MULTIPART_SLACK = 64 * 1024
UPLOAD_PATH = "/api/images"
MAX_POINTS = 256
SEG_SUFFIX = "/seg.dcm"

ERRORS = {
    400: "the bytes cannot be decoded as an image",
    401: "missing or wrong access token (when the server has one)",
    404: "unknown image id (never uploaded, deleted, or evicted from the cache)",
    409: "the model has no automatic (no-prompt) head, or the image is not a DICOM (SEG export)",
    413: "upload or image too large",
    415: "unsupported file type",
    422: "invalid prompt (outside the image, degenerate box, labels not matching points, ...)",
    503: "the server is busy decoding other uploads; try again (see Retry-After)",
}


# --- API schema ---------------------------------------------------------------------------------

class ErrorResponse(BaseModel):
    detail: str = Field(description="What is wrong, in words a user can act on")


class ImageInfo(BaseModel):
    id: str = Field(description="Image id for the predict, mask and image endpoints")
    width: int = Field(description="Image width in pixels (x runs from 0 to width)")
    height: int = Field(description="Image height in pixels (y runs from 0 to height)")
    format: str = Field(description="Format the upload was decoded as: png, jpeg or dicom")
    frames: int = Field(default=1, description="Frames of the image: more than 1 for a cine loop (a multi-frame "
                                               "DICOM uploaded without `frame=`); pick one with `frame` in requests")
    encode_ms: float = Field(description="Time spent computing the image embedding, in milliseconds")
    image_url: str = Field(description="8-bit PNG rendering of the image for display (DICOM and 16-bit included)")
    pixel_spacing_mm: list[float] | None = Field(
        default=None, description="[row_mm, col_mm] from the DICOM header (PixelSpacing or ultrasound regions); "
                                  "null when the file does not say")


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
    tight_box: bool = Field(
        default=False, description="The box touches the object (a reference mask's or a detector's box, not one "
                                   "drawn by hand): a zoomed model answers it as exact (its exact-box tokens, or "
                                   "the box loosened by a few pixels first) and cuts the answer to the box; "
                                   "422 for other models",
    )
    modality: str | None = Field(
        default=None,
        description="A tap (points only, no box) on a zoomed model with an automatic head: the head's channel "
                    "(one of /api/health's `modalities`) whose mask locates the tapped object; null: the tap is "
                    "answered without it. 422 with a box or for other models",
        examples=["ddti"],
    )
    spacing: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(
        default=None, min_length=1, max_length=2,
        description="Pixel size in mm, [row_mm, col_mm] or [mm] for square pixels (overrides a DICOM's); with a "
                    "spacing the response lists each object's measurements",
        examples=[[0.1, 0.1]],
    )
    frame: int | None = Field(
        default=None, ge=0, description="Frame of a cine loop to segment (0-based; default: the last one used, "
                                        "at first 0); switching frames re-encodes that frame")


class PropagateRequest(PredictRequest):
    """Prompts on `frame`; every other frame of the loop is prompted with the previous frame's mask box."""


class AutoRequest(BaseModel):
    modality: str | None = Field(
        default=None,
        description="Modality channel of the automatic head (one of /api/health's `modalities`); "
                    "null when the model has a single channel",
        examples=["busi"],
    )
    spacing: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(
        default=None, min_length=1, max_length=2,
        description="Pixel size in mm, [row_mm, col_mm] or [mm] for square pixels (overrides a DICOM's); with a "
                    "spacing the response lists each object's measurements",
        examples=[[0.1, 0.1]],
    )
    frame: int | None = Field(default=None, ge=0, description="Frame of a cine loop, as in /predict")
    presence_gate: Annotated[float, Field(ge=0, le=1)] | Literal["calibrated", "off"] = Field(
        default=CALIBRATED_GATE,
        description="Presence probability below which the answer is empty ('nothing here'): 'calibrated' (the "
                    "model's own gate, /api/health's `presence_gate`), 'off' (always answer) or a number in "
                    "[0, 1] (higher: more normal scans answered empty, more faint targets missed); 422 for an "
                    "export that applies its gate inside its graph",
        examples=["calibrated", 0.5],
    )


class ObjectMeasurement(BaseModel):
    index: int = Field(description="1-based object number (8-connected components in raster order)")
    pixels: int = Field(description="Pixels of the object")
    centroid_xy: list[float] = Field(description="Centre [x, y] in image pixels")
    area_mm2: float = Field(description="Area in mm^2")
    longest_diameter_mm: float = Field(description="Longest diameter (max Feret) in mm")
    orthogonal_diameter_mm: float = Field(description="Extent perpendicular to the longest diameter, in mm")
    perimeter_mm: float = Field(description="Length of the outline (holes included) in mm")


class PredictResponse(BaseModel):
    id: str = Field(description="Image id")
    width: int = Field(description="Mask width in pixels (= image width)")
    height: int = Field(description="Mask height in pixels (= image height)")
    score: float = Field(description="Predicted IoU of the returned mask; in automatic mode the presence "
                                     "probability (how sure the model is that the target is present)")
    scores: list[float] = Field(description="Predicted IoU of every candidate (3 with multimask, else 1)")
    foreground_pixels: int = Field(description="Number of mask pixels")
    mask_png_base64: str = Field(description="The mask as a base64 8-bit gray PNG, 0 = background, 255 = object")
    mask_url: str = Field(description="URL of the latest mask of this image as PNG (for download)")
    box: list[float] | None = Field(description="The box that was used, in image pixels")
    points: list[list[float]] = Field(description="The points that were used, in image pixels")
    labels: list[int] = Field(description="The labels of the points")
    decode_ms: float = Field(description="Time spent in the decoder and mask post-processing, in milliseconds")
    pixel_spacing_mm: list[float] | None = Field(
        default=None, description="[row_mm, col_mm] used for the measurements (the request's, else the DICOM's)")
    presence_gate: float | None = Field(
        default=None, description="Automatic mode: the presence probability below which the answer was to be "
                                  "empty (null: no gate, a prompted answer, or a user's predictor that does "
                                  "not say)")
    measurements: list[ObjectMeasurement] | None = Field(
        default=None, description="Per object of the mask: area, diameters and perimeter in mm; null without "
                                  "a pixel spacing")


class FrameMask(BaseModel):
    frame: int = Field(description="Frame index (0-based)")
    score: float = Field(description="Predicted IoU of the mask")
    foreground_pixels: int = Field(description="Number of mask pixels")
    mask_png_base64: str = Field(description="The mask as a base64 8-bit gray PNG, 0 = background, 255 = object")
    box: list[float] | None = Field(description="The box this frame was prompted with (the user's on the "
                                                "prompted frame, else the previous mask's box, enlarged)")
    measurements: list[ObjectMeasurement] | None = Field(default=None, description="As in /predict")


class PropagateResponse(BaseModel):
    id: str = Field(description="Image id")
    frames: list[FrameMask] = Field(description="One mask per frame, in frame order")
    pixel_spacing_mm: list[float] | None = Field(default=None, description="As in /predict")
    decode_ms: float = Field(description="Time spent encoding and decoding every frame, in milliseconds")


class Health(BaseModel):
    status: str = Field(description="'ok' when the server answers")
    version: str = Field(description="UniUltra version")
    model: str = Field(description="Model preset name")
    image_size: int = Field(description="Model input size in pixels")
    cached_images: int = Field(description="Images of this client whose embedding is cached now")
    cache_size: int = Field(description="Most embeddings kept per client; its least recently used is dropped first")
    cached_images_total: int = Field(description="Embeddings cached now for all clients together")
    total_cache_size: int = Field(description="Most embeddings kept for all clients together")
    max_upload_bytes: int = Field(description="Largest accepted upload in bytes")
    auto: bool = Field(description="Whether the model segments without prompts (POST /api/images/{id}/auto)")
    modalities: list[str] = Field(description="Modality channels of the automatic head to choose from "
                                              "(empty when one channel serves every image)")
    locates_taps: bool = Field(default=False, description="Whether a tap (points only) can name one of `modalities` "
                                                          "(predict's `modality`) to be located by the head")
    presence_gate: float | None = Field(
        default=None, description="The automatic head's own presence gate (chosen on the val splits; null: none, "
                                  "no head, or a user's predictor that does not say)")


# --- state ----------------------------------------------------------------------------------------

@dataclass
class _Entry:
    predictor: Any
    width: int
    height: int
    display_png: bytes
    mask_png: bytes | None = None
    spacing: tuple[float, float] | None = None  # (row_mm, col_mm) from the DICOM header
    name: str = "image"  # the upload's file name without extension, for download names
    frames: list[np.ndarray] | None = None  # every frame of a cine loop; the predictor holds `frame`
    frame: int = 0
    dicom: bytes | None = None  # the uploaded DICOM file: the source a SEG export references

    def use_frame(self, frame: int | None) -> None:
        """Encode `frame` if the predictor holds another one (call with the model lock held)."""
        if frame is None or frame == self.frame:
            return
        count = len(self.frames) if self.frames else 1
        if not 0 <= frame < count:
            raise HTTPException(422, f"frame {frame} out of range: the image has {count} frame(s)")
        self.predictor.set_image(self.frames[frame])
        self.frame = frame


# --- app ------------------------------------------------------------------------------------------

@dataclass
class _Server:
    """What the routes share: the predictor factory, the model's description, caches, locks, limits."""

    factory: Callable[[], Any]
    model_info: dict[str, Any]
    cache: SessionCache
    model_lock: threading.Lock
    decode_slots: DecodeSlots
    max_bytes: int
    max_pixels: int


def create_app(
    model_or_factory: Any,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    cache_size: int = DEFAULT_CACHE_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    serve_static: bool = True,
    total_cache_size: int = DEFAULT_TOTAL_CACHE_SIZE,
    allowed_hosts: Iterable[str] = DEFAULT_ALLOWED_HOSTS,
    token: str | None = None,
    max_decodes: int = DEFAULT_MAX_DECODES,
    decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
) -> FastAPI:
    """The web app for a `SAM2ImageModel`, an `AutoSegmenter` (adds the automatic mode), or a factory
    returning a fresh `Predictor`-like object (automatic mode when it has `predict_auto`).

    A factory is called once per uploaded image (the predictor then holds that image's embedding);
    all predictors made by it must be safe to use one at a time, which the app's lock guarantees.

    `cache_size` images are kept per client, `total_cache_size` for all; requests must name one of
    `allowed_hosts` ("*": any) and, with a `token`, carry it; at most `max_decodes` uploads are
    decoded at once, another waits up to `decode_wait_s` seconds, then gets 503.
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max upload size must be positive, got {max_upload_mb} MB")
    factory = _predictor_factory(model_or_factory)
    max_bytes = int(max_upload_mb * 2**20)
    server = _Server(factory=factory, model_info=_model_info(factory()),
                     cache=SessionCache(cache_size, max(total_cache_size, cache_size)), model_lock=threading.Lock(),
                     decode_slots=DecodeSlots(max_decodes, decode_wait_s), max_bytes=max_bytes, max_pixels=max_pixels)

    app = FastAPI(
        title="UniUltra",
        version=__version__,
        description="Interactive ultrasound segmentation. Upload an image once (its embedding is computed and "
                    "cached), then send box / point prompts, or none at all with a model that has an automatic "
                    "head: each runs only the mask decoder. Coordinates are image pixels, x = column, y = row.",
        docs_url=None, redoc_url=None,  # Swagger UI and ReDoc load from a CDN: our own /docs works offline
    )
    app.state.cache = server.cache
    app.state.model_lock = server.model_lock
    app.state.max_upload_bytes = max_bytes
    _add_protections(app, allowed_hosts, token, max_bytes, max_upload_mb)
    # The order of the routes is the order of the API reference (/docs, /openapi.json).
    _add_health_route(app, server)
    _add_upload_route(app, server)
    _add_segmentation_routes(app, server)
    _add_file_routes(app, server)
    _add_delete_route(app, server)
    _add_reference_routes(app)
    if serve_static:
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


_PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


def _add_protections(app: FastAPI, allowed_hosts: Iterable[str], token: str | None, max_bytes: int,
                     max_upload_mb: float) -> None:
    """The request guard, the browser security headers and the catch-all error handler."""
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, token=token, upload_path=UPLOAD_PATH,
                       upload_limit=max_bytes + _MULTIPART_SLACK, upload_limit_text=f"{max_upload_mb:g} MB",
                       file_suffix=SEG_SUFFIX)

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


def _add_health_route(app: FastAPI, server: _Server) -> None:
    model_info, cache, max_bytes = server.model_info, server.cache, server.max_bytes

    @app.get("/api/health", response_model=Health, summary="Server and model status")
    def health() -> Health:
        return Health(status="ok", version=__version__, model=model_info["name"], image_size=model_info["size"],
                      cached_images=len(cache), cache_size=cache.capacity, cached_images_total=cache.total(),
                      total_cache_size=cache.total_capacity, max_upload_bytes=max_bytes,
                      auto=model_info["auto"], modalities=model_info["modalities"],
                      locates_taps=model_info["locates_taps"], presence_gate=model_info["presence_gate"])


def _add_upload_route(app: FastAPI, server: _Server) -> None:
    factory, cache, model_lock, decode_slots = server.factory, server.cache, server.model_lock, server.decode_slots
    max_bytes, max_pixels = server.max_bytes, server.max_pixels

    @app.post(
        UPLOAD_PATH, response_model=ImageInfo, summary="Upload an image and compute its embedding once",
        responses=_error_responses(400, 413, 415, 503),
    )
    def upload_image(
        file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM file (a multi-frame DICOM: a cine loop)")],
        frame: Annotated[int | None, Query(ge=0, description="Only this frame of a multi-frame DICOM (without it "
                                                             "every frame is kept, as a cine loop)")] = None,
    ) -> ImageInfo:
        with decode_slots.hold():  # decoded pixels and embeddings take memory: a bounded number at once
            data = file.file.read(max_bytes + 1)
            try:
                decoded = decode_upload(data, file.content_type, file.filename, max_bytes=max_bytes,
                                        max_pixels=max_pixels, frame=frame, all_frames=True)
            except UploadError as exc:
                raise HTTPException(exc.status, str(exc)) from exc
            predictor = factory()
            start = time.perf_counter()
            with model_lock:
                predictor.set_image(decoded.image)
            encode_ms = 1000 * (time.perf_counter() - start)
            image_id = cache.add(_Entry(predictor, decoded.width, decoded.height, display_png(decoded.image),
                                        spacing=decoded.spacing, name=upload_stem(file.filename),
                                        frames=decoded.frames, dicom=data if decoded.kind == "dicom" else None))
        return ImageInfo(id=image_id, width=decoded.width, height=decoded.height, format=decoded.kind,
                         frames=len(decoded.frames) if decoded.frames else 1,
                         encode_ms=round(encode_ms, 1), image_url=f"{UPLOAD_PATH}/{image_id}/image.png",
                         pixel_spacing_mm=list(decoded.spacing) if decoded.spacing else None)


def _add_segmentation_routes(app: FastAPI, server: _Server) -> None:
    """Prompted, automatic and cine-loop segmentation of an uploaded image."""
    model_info, cache, model_lock = server.model_info, server.cache, server.model_lock

    @app.post(
        UPLOAD_PATH + "/{image_id}/predict", response_model=PredictResponse,
        summary="Segment with a box and/or points (runs only the decoder)", responses=_error_responses(404, 422),
    )
    def predict(image_id: str, request: PredictRequest) -> PredictResponse:
        entry = cache.get(image_id)
        box, points, labels = _prompt_arrays(request)
        start = time.perf_counter()
        try:
            with model_lock, tight_boxes_for(entry.predictor, request.tight_box and box is not None,
                                             model_info["name"]), \
                    tap_modality_for(entry.predictor, request.modality, box is None):
                entry.use_frame(request.frame)
                masks, scores, _ = entry.predictor.predict(box=box, points=points, labels=labels,
                                                           multimask=request.multimask)
        except ValueError as exc:  # the predictor's prompt validation
            raise HTTPException(422, _plain_numbers(str(exc))) from exc
        best = int(np.argmax(scores))
        return _mask_response(image_id, entry, masks[best], [float(s) for s in scores], start, request.spacing,
                              box=request.box, points=[list(p) for p in request.points], labels=request.labels)

    @app.post(
        UPLOAD_PATH + "/{image_id}/auto", response_model=PredictResponse,
        summary="Segment without any prompt (automatic head; runs only the decoder)",
        responses=_error_responses(404, 409, 422),
    )
    def predict_auto(image_id: str, request: AutoRequest) -> PredictResponse:
        entry = cache.get(image_id)
        if not model_info["auto"]:
            raise HTTPException(409, f"model {model_info['name']} has no automatic head: segment with a box or "
                                     "points, or serve a checkpoint from `uniultra auto train`")
        start = time.perf_counter()
        try:
            with model_lock:
                entry.use_frame(request.frame)
                mask, score, gate = _auto_answer(entry.predictor, request.modality, request.presence_gate)
        except ValueError as exc:  # unknown modality (the model lists the ones it knows), or a gate it refuses
            raise HTTPException(422, str(exc)) from exc
        return _mask_response(image_id, entry, mask, [score], start, request.spacing, box=None, points=[],
                              labels=[], presence_gate=gate)

    @app.post(
        UPLOAD_PATH + "/{image_id}/propagate", response_model=PropagateResponse,
        summary="Segment every frame of a cine loop from prompts on one frame",
        description="The prompted frame is segmented with the prompts; each following frame (then each earlier "
                    "one, going back) with the box of its neighbour's mask, enlarged by 10 % (+2 px) per side. "
                    "Encodes every frame: about one encoding time per frame.",
        responses=_error_responses(404, 422),
    )
    def propagate_loop(image_id: str, request: PropagateRequest) -> PropagateResponse:
        entry = cache.get(image_id)
        box, points, labels = _prompt_arrays(request)
        start_frame = _propagation_start(entry, request)
        start = time.perf_counter()
        try:
            with model_lock, tap_modality_for(entry.predictor, request.modality, box is None):
                result = _propagate(entry, start_frame, box, points, labels)
        except ValueError as exc:
            raise HTTPException(422, _plain_numbers(str(exc))) from exc
        spacing = check_spacing(request.spacing) if request.spacing else entry.spacing
        return _propagate_response(image_id, result, spacing, start)


def _add_file_routes(app: FastAPI, server: _Server) -> None:
    """The image's files: its masks as DICOM SEG, its latest mask and the image itself as PNG."""
    cache, max_bytes = server.cache, server.max_bytes

    @app.post(
        UPLOAD_PATH + "/{image_id}" + SEG_SUFFIX, response_class=Response,
        summary="Export a label map as DICOM SEG referencing the uploaded DICOM",
        description="Multipart: `labelmap`, an 8-bit gray PNG of the image's size (0 = background, k = object "
                    "k), and `labels`, a JSON list of the objects' names. Single-frame DICOM inputs only.",
        responses={200: {"content": {"application/dicom": {}}, "description": "DICOM SEG file"},
                   **_error_responses(404, 409, 422)},
    )
    def export_seg(
        image_id: str,
        labelmap: Annotated[UploadFile, File(description="8-bit gray PNG label map, image size")],
        labels: Annotated[str, Form(description='JSON list of object names, e.g. ["lesion", "node"]')],
    ) -> Response:
        entry = cache.get(image_id)
        if entry.dicom is None:
            raise HTTPException(409, "DICOM SEG needs a DICOM input: this image was not uploaded as DICOM")
        try:
            names = _names(labels)
            label_map = decode_label_map(labelmap.file.read(max_bytes + 1), (entry.height, entry.width))
            seg = write_seg(entry.dicom, label_map, names)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        except SegError as exc:
            raise HTTPException(422, str(exc)) from exc
        return Response(seg, media_type="application/dicom", headers={
            "Content-Disposition": f'attachment; filename="{entry.name}_seg.dcm"', "Cache-Control": "no-store"})

    @app.get(
        UPLOAD_PATH + "/{image_id}/mask.png", response_class=Response, summary="Download the latest mask as PNG",
        responses={**_PNG_RESPONSE, **_error_responses(404)},
    )
    def latest_mask(image_id: str) -> Response:
        entry = cache.get(image_id)
        if entry.mask_png is None:
            raise HTTPException(404, "no mask yet for this image: send a prompt to /predict first")
        return Response(entry.mask_png, media_type="image/png", headers={
            "Content-Disposition": f'attachment; filename="{entry.name}_mask.png"',
            "Cache-Control": "no-store"})

    @app.get(
        UPLOAD_PATH + "/{image_id}/image.png", response_class=Response, summary="The image as an 8-bit PNG",
        responses={**_PNG_RESPONSE, **_error_responses(404)},
    )
    def image_png(
        image_id: str,
        frame: Annotated[int | None, Query(ge=0, description="Frame of a cine loop (default 0)")] = None,
    ) -> Response:
        entry = cache.get(image_id)
        frames = entry.frames or []
        if frame and not frame < len(frames):
            raise HTTPException(422, f"frame {frame} out of range: the image has {max(len(frames), 1)} frame(s)")
        png = display_png(frames[frame]) if frame else entry.display_png
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _add_delete_route(app: FastAPI, server: _Server) -> None:
    @app.delete(UPLOAD_PATH + "/{image_id}", status_code=204, response_class=Response,
                summary="Forget an image and its embedding", responses=_error_responses(404))
    def delete_image(image_id: str) -> Response:
        server.cache.remove(image_id)
        return Response(status_code=204)


def _add_reference_routes(app: FastAPI) -> None:
    """The API reference page and its style sheet, served by the app itself (no CDN)."""

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_reference() -> HTMLResponse:
        return HTMLResponse(reference_html(app.openapi()))

    @app.get(DOCS_CSS_PATH, include_in_schema=False)
    def api_reference_style() -> Response:
        return Response(DOCS_CSS, media_type="text/css")


def _mask_response(image_id: str, entry: _Entry, mask: np.ndarray, scores: list[float], start: float,
                   spacing: list[float] | None, **prompts: Any) -> PredictResponse:
    """Keep the mask as the image's latest (for download) and describe it; `scores[0]` is the best."""
    png = mask_png(mask)
    entry.mask_png = png
    return PredictResponse(
        id=image_id, width=entry.width, height=entry.height, score=max(scores), scores=scores,
        foreground_pixels=int(mask.sum()), mask_png_base64=base64.b64encode(png).decode("ascii"),
        **_measurements(mask, check_spacing(spacing) if spacing else entry.spacing),
        mask_url=f"{UPLOAD_PATH}/{image_id}/mask.png", decode_ms=round(1000 * (time.perf_counter() - start), 1),
        **prompts,
    )


def _prompt_arrays(request: PredictRequest) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The request's box, points and labels as arrays, labels checked (the predictor checks the rest)."""
    box = np.asarray(request.box, dtype=np.float64) if request.box is not None else None
    points = np.asarray(request.points, dtype=np.float64).reshape(-1, 2) if request.points else None
    labels = np.asarray(request.labels, dtype=np.int64) if request.labels else None
    if labels is not None and points is None:
        raise HTTPException(422, f"{len(request.labels)} labels but no points: give one label per point")
    if labels is not None and not np.isin(labels, (0, 1)).all():
        raise HTTPException(422, f"point labels must be 1 (foreground) or 0 (background), got {request.labels}")
    return box, points, labels


def _propagation_start(entry: _Entry, request: PropagateRequest) -> int:
    """The frame the prompts are on (the request's, else the one the predictor holds), checked."""
    if request.tight_box:
        raise HTTPException(422, "tight_box is for one frame (predict): the boxes propagated to the other "
                                 "frames are loosened on purpose")
    count = len(entry.frames) if entry.frames else 1
    start_frame = entry.frame if request.frame is None else request.frame
    if not 0 <= start_frame < count:
        raise HTTPException(422, f"frame {start_frame} out of range: the image has {count} frame(s)")
    return start_frame


def _propagate(entry: _Entry, start_frame: int, box, points, labels) -> Propagation:
    """Propagation over the entry's frames (a single image is a loop of one)."""
    if entry.frames is None:  # one image: already encoded, decode only
        masks, scores, _ = entry.predictor.predict(box=box, points=points, labels=labels)
        best = int(np.argmax(scores))
        return Propagation([np.asarray(masks[best], bool)], [float(scores[best])],
                           [list(box) if box is not None else None])
    result = propagate(entry.predictor, entry.frames, start_frame, box, points, labels)
    # The loop runs forward to the end, then back to frame 0: the predictor holds the last one seen.
    entry.frame = 0 if start_frame > 0 else len(entry.frames) - 1
    return result


def _propagate_response(image_id: str, result: Propagation, spacing: tuple[float, float] | None,
                        start: float) -> PropagateResponse:
    return PropagateResponse(
        id=image_id, pixel_spacing_mm=list(spacing) if spacing else None,
        decode_ms=round(1000 * (time.perf_counter() - start), 1),
        frames=[FrameMask(frame=i, score=score, foreground_pixels=int(mask.sum()), box=box_i,
                          mask_png_base64=base64.b64encode(mask_png(mask)).decode("ascii"),
                          measurements=_measurements(mask, spacing)["measurements"])
                for i, (mask, score, box_i) in enumerate(zip(result.masks, result.scores, result.boxes,
                                                             strict=True))])


def _names(text: str) -> list[str]:
    try:
        names = json.loads(text)
    except ValueError as exc:
        raise HTTPException(422, f"labels must be a JSON list of names: {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) > 255:
        raise HTTPException(422, "labels must be a JSON list of at most 255 names (strings)")
    return names


def _measurements(mask: np.ndarray, spacing: tuple[float, float] | None) -> dict[str, Any]:
    if spacing is None:
        return {"pixel_spacing_mm": None, "measurements": None}
    return {"pixel_spacing_mm": list(spacing), "measurements": measurements_table(mask, spacing)}


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
    if config is not None:
        name, size = config.name, config.image_size
    else:  # an export (onnxruntime, OpenVINO): its metadata names the model
        metadata = getattr(predictor, "metadata", None) or {}
        name, size = (metadata.get("model") or {}).get("preset", "unknown"), metadata.get("image_size", 0)
    auto = callable(getattr(predictor, "predict_auto", None))
    selects = getattr(predictor, "selects_modality", None)
    return {"name": str(name), "size": int(size or 0),
            "auto": auto, "modalities": list(getattr(predictor, "modality_choices", ())) if auto else [],
            "locates_taps": bool(auto and selects is not None and selects(tap=True)),
            "presence_gate": _own_presence_gate(predictor) if auto else None}


def _own_presence_gate(predictor: Any) -> float | None:
    """The predictor's own gate; None for a user's predictor that does not say (no `resolve_presence_gate`)."""
    resolve = getattr(predictor, "resolve_presence_gate", None)
    return resolve() if callable(resolve) else None


def _auto_answer(predictor: Any, modality: str | None, gate: PresenceGate) -> tuple[np.ndarray, float, float | None]:
    """(mask, presence score, gate in force) of one automatic answer.

    A user's own predictor with a `predict_auto(modality)` of its own (no per-call gate) answers only
    the 'calibrated' gate, i.e. its own; another gate is refused (ValueError -> 422) rather than ignored.
    """
    if callable(getattr(predictor, "resolve_presence_gate", None)):
        mask, score, _ = predictor.predict_auto(modality, presence_gate=gate)
        return mask, score, predictor.resolve_presence_gate(gate)
    if gate != CALIBRATED_GATE:
        raise ValueError(f"this server's predictor ({type(predictor).__name__}) has no per-call presence gate: "
                         "ask with presence_gate 'calibrated' (its own)")
    mask, score, _ = predictor.predict_auto(modality)
    return mask, score, None
