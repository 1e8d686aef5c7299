"""``create_app(settings)``: the lifespan builds the store, services and job manager onto ``app.state``."""

from __future__ import annotations

import logging
import re
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .api.auth import ApiKeys, install_auth
from .api.batches.router import router as batches_router
from .api.batches.service import BatchService
from .api.body import validation_error_to_service_error
from .api.body_limit import BodyLimitMiddleware
from .api.chat_completions.router import router as stored_completions_router
from .api.chat_completions.service import StoredCompletionService
from .api.content_type import require_json
from .api.conversations.router import router as conversations_router
from .api.conversations.service import ConversationService
from .api.evals.router import router as evals_router
from .api.evals.service import EvalService
from .api.files.router import router as files_router
from .api.files.service import FileService
from .api.fine_tuning.router import router as fine_tuning_router
from .api.fine_tuning.service import FineTuningService
from .api.graders.router import router as graders_router
from .api.graders.service import GraderService
from .api.inference.router import router as inference_router
from .api.inference.service import InferenceService
from .api.inference.tokenize import router as tokenize_router
from .api.limits import MULTIPART_OVERHEAD_BYTES
from .api.models.router import router as models_router
from .api.models.service import ModelService
from .api.openapi import document_errors
from .api.ops.metrics import HttpMetricsMiddleware, ServiceMetrics
from .api.ops.request_id import RequestIdMiddleware
from .api.ops.router import metrics_router, ready_router
from .api.permissions.router import router as permissions_router
from .api.responses.router import router as responses_router
from .api.responses.service import ResponseService
from .api.sqft.router import router as sqft_router
from .api.sqft.service import SqftService
from .api.uploads.router import router as uploads_router
from .api.uploads.service import MAX_PART_BYTES, UploadService
from .errors import InvalidRequestError, ServiceError, UserError
from .jobs.manager import JobManager
from .jobs.runner import build_runner
from .logs import current_request_id
from .settings import Settings
from .store.chat_completions import ChatCompletionStore
from .store.conversations import ConversationStore
from .store.db import Database
from .store.evals import EvalStore
from .store.events import EventStore
from .store.files import FileStore
from .store.ids import now
from .store.jobs import JobStore
from .store.permissions import PermissionStore
from .store.responses import ResponseStore
from .store.uploads import UploadStore

log = logging.getLogger(__name__)


def _error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
        headers=headers,
    )


def _allowed_methods(request: Request) -> str | None:
    """The methods the schema documents for the request's path (``GET`` ones also take ``HEAD``); None
    for a path the schema leaves out. As in OpenAPI, a concrete path (``/v1/fine_tuning/jobs/retrieve``)
    comes before a template that also matches it (``/v1/fine_tuning/jobs/{job_id}``)."""
    paths = request.app.openapi()["paths"]
    path = request.url.path
    if path in paths:
        matches = [paths[path]]
    else:
        matches = [
            operations
            for template, operations in paths.items()
            if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path)
        ]
    methods = {method.upper() for operations in matches for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)) or None


def single_query_values(request: Request) -> None:
    """Every query parameter of this API takes one value: a repeated one is a 400 naming it, rather
    than the last value silently winning (what a proxy or a log reads may be another one)."""
    for key in request.query_params:
        if len(values := request.query_params.getlist(key)) > 1:
            raise InvalidRequestError(f"query parameter `{key}` is given {len(values)} times; give it once", param=key)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=exc.to_dict(), headers=getattr(exc, "headers", None))

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return _error(400, exc.message, "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error_to_service_error(list(exc.errors()), exc.body)
        return JSONResponse(status_code=err.status_code, content=err.to_dict())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.status_code != 404 else f"Unknown route: {request.method} {request.url.path}"
        headers = exc.headers
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            # RFC 9110: `Allow` lists every method of the path; Starlette names only the first route's.
            headers = {**(headers or {}), "Allow": allowed}
        return _error(exc.status_code, message, "invalid_request_error", headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # Starlette renders this outside every middleware the app adds, so the request id is added here.
        request_id = current_request_id()
        headers = {"X-Request-ID": request_id} if request_id else None
        return _error(500, f"internal error: {type(exc).__name__}", "server_error", headers=headers)


def _retire_stored(days: float, completions: ChatCompletionStore, responses: ResponseStore) -> None:
    """Delete the stored chat completions and responses older than ``days`` (SQFT_STORED_RETENTION_DAYS)."""
    before = int(time.time() - days * 86400)
    gone = completions.delete_before(before), responses.delete_before(before)
    if any(gone):
        log.info("retention: deleted %d stored chat completion(s) and %d stored response(s)", *gone)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.ensure_dirs()
        db = Database(settings.db_path)
        file_store = FileStore(db, settings.files_dir)
        jobs, events = JobStore(db), EventStore(db)
        manager = JobManager(settings, jobs, events, file_store, runner=build_runner(settings))
        file_service = FileService(
            file_store,
            settings.upload_limit_bytes,
            in_use=lambda fid: [j.id for j in jobs.referencing_file(fid)],
            max_files=settings.max_files,
        )
        app.state.settings = settings
        app.state.db = db
        app.state.file_service = file_service
        upload_store = UploadStore(db, settings.uploads_dir)
        upload_store.recover()
        upload_store.expire(now())  # what ran out of time while the service was down
        app.state.upload_service = UploadService(upload_store, file_service)
        app.state.job_manager = manager
        app.state.model_service = ModelService(settings, jobs, file_store, manager, PermissionStore(db))
        app.state.fine_tuning_service = FineTuningService(
            jobs, events, file_service, manager, models=app.state.model_service
        )
        app.state.sqft_service = SqftService(
            settings, app.state.fine_tuning_service, file_service, jobs, events, manager
        )
        app.state.batch_service = BatchService(jobs, events, file_service, manager, app.state.model_service)
        # The engine inside is created, and torch imported, only when the first inference request comes.
        stored = ChatCompletionStore(db)
        app.state.stored_completion_service = StoredCompletionService(stored)
        app.state.eval_service = EvalService(
            EvalStore(db), jobs, events, file_service, manager, app.state.model_service, stored
        )
        app.state.inference_service = InferenceService(settings, app.state.model_service, stored)
        responses = ResponseStore(db)
        # A background response a stopped service was generating has no generation left to end it.
        if failed := responses.fail_unfinished("the service stopped before this background response was answered"):
            log.info("marked %d unfinished background response(s) failed", failed)
        app.state.conversation_service = ConversationService(ConversationStore(db))
        app.state.response_service = ResponseService(
            app.state.inference_service, responses, app.state.conversation_service
        )
        app.state.grader_service = GraderService(app.state.model_service, app.state.inference_service)
        app.state.metrics.watch_store(db, manager)
        app.state.metrics.watch_inference(lambda: app.state.inference_service.created_engine)
        if settings.stored_retention_days > 0:
            manager.sweeps.append(lambda: _retire_stored(settings.stored_retention_days, stored, responses))
        manager.start()
        log.info("sqft-service %s: data in %s", __version__, settings.data_dir.resolve())
        try:
            yield
        finally:
            app.state.response_service.shutdown()
            app.state.inference_service.shutdown()
            manager.shutdown()
            app.state.metrics.unwatch_store()
            db.close()

    app = FastAPI(
        title="sqft-service",
        version=__version__,
        description="OpenAI-compatible fine-tuning with SQFT (NLS elastic adapters, SparsePEFT) on stock peft.",
        lifespan=lifespan,
        dependencies=[Depends(single_query_values)],
    )
    install_error_handlers(app)
    # Added before auth so that auth wraps it: an unauthenticated request is refused before its body is read.
    app.add_middleware(
        BodyLimitMiddleware,
        max_json_bytes=settings.max_json_bytes,
        max_media_json_bytes=max(settings.max_media_json_bytes, settings.max_json_bytes),
        max_upload_body_bytes=settings.upload_limit_bytes + MULTIPART_OVERHEAD_BYTES,
        max_part_body_bytes=min(MAX_PART_BYTES, settings.upload_limit_bytes) + MULTIPART_OVERHEAD_BYTES,
    )
    keys = ApiKeys.parse(settings.api_key)
    app.state.projects = keys.projects  # the projects a model may be shared with (api/permissions)
    auth = install_auth(app, keys, open_paths=("/health", "/ready"))
    # Outside auth and the body limit, so their 401s and 413s are counted and carry the request id too.
    app.state.metrics = ServiceMetrics()
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)
    # The files router takes multipart uploads; every other router's bodies are JSON.
    json_only = [*auth, Depends(require_json)]
    app.include_router(files_router, dependencies=auth)
    app.include_router(uploads_router, dependencies=auth)  # JSON routes but the parts' multipart
    app.include_router(fine_tuning_router, dependencies=json_only)
    app.include_router(sqft_router, dependencies=json_only)
    app.include_router(models_router, dependencies=json_only)
    app.include_router(inference_router, dependencies=json_only)
    app.include_router(tokenize_router, dependencies=json_only)
    app.include_router(stored_completions_router, dependencies=json_only)
    app.include_router(batches_router, dependencies=json_only)
    app.include_router(responses_router, dependencies=json_only)
    app.include_router(conversations_router, dependencies=json_only)
    app.include_router(evals_router, dependencies=json_only)
    app.include_router(graders_router, dependencies=json_only)
    app.include_router(permissions_router, dependencies=json_only)
    app.include_router(ready_router)
    app.include_router(metrics_router, dependencies=auth)

    build_openapi = app.openapi

    def openapi() -> dict:
        # FastAPI's schema plus the errors every route can answer (401/400/413/415/404), without its 422.
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(build_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", tags=["service"])
    def health() -> dict:
        counts: dict[str, dict[str, int]] = {}
        for row in app.state.db.query("SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status"):
            counts.setdefault(row["kind"], {})[row["status"]] = row["n"]
        return {"status": "ok", "version": __version__, "jobs": counts.get("fine_tune", {}), "jobs_by_kind": counts}

    return app
