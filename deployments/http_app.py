"""The ingress's FastAPI app: every error in OpenAI's shape (ApiError and the handlers), an OpenAPI document without
FastAPI's generic 422, and the guard middleware, which finds the serving replica's own Guard."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from pipeline.errors import InvalidRequest

from .api import error_body, schema_error_body
from .faults import log
from .limits import Guard, GuardMiddleware
from .stream import StageError


class ApiError(Exception):
    """Ends a request with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, retry_after: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after, self.param = status, message, retry_after, param

    @classmethod
    def invalid(cls, exc: InvalidRequest) -> "ApiError":
        """A refused request (deployments/validation.py): 400 naming the field at fault."""
        return cls(400, str(exc), param=exc.param)

    @classmethod
    def of(cls, error: StageError, retry_after_s: int) -> "ApiError":
        """A stage's failure as the request's answer; a 429 or 503 says when to try again."""
        return cls(error.status, error.message, retry_after_s if error.status in (429, 503) else None)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(error_body(self.status, self.message, self.param), status_code=self.status,
                            headers=headers)


class OpenAIApp(FastAPI):
    def openapi(self) -> dict:
        """FastAPI's document without its generic 422 (this server answers a bad body with 400; see error_responses)."""
        schema = super().openapi()
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        return schema


def replica_guard() -> Guard | None:
    """The Guard of the Ingress replica serving this request (each replica builds its own from its AppConfig)."""
    return getattr(serve.get_replica_context().servable_object, "guard", None)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, an unparsable body, the guard's 408/413) in the OpenAI shape."""
    message = exc.detail if isinstance(exc.detail, str) else "invalid request"
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged, and a 500 without internals."""
    log.error("unhandled %s on %s: %s", type(exc).__name__, request.url.path, exc)
    return JSONResponse(error_body(500, "internal error"), status_code=500)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON or a schema violation: 400 naming the field, as OpenAI answers."""
    return JSONResponse(schema_error_body(exc.errors()), status_code=400)


def make_app(description: str) -> FastAPI:
    """The app `@serve.ingress` wraps; its routes are the Ingress deployment's methods."""
    # No trailing-slash redirect: Starlette builds its Location from the Host header, which a client controls.
    app = OpenAIApp(title="crosstrim", description=description, redirect_slashes=False)
    app.add_middleware(GuardMiddleware, guard_of=replica_guard)
    for exc_class, handler in ((ApiError, _api_error), (HTTPException, _http_error), (Exception, _unexpected),
                               (RequestValidationError, _validation_error)):
        app.add_exception_handler(exc_class, handler)
    return app
