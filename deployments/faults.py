"""How a stage's failure reaches a client: one mapping from exceptions to HTTP status, message and whether the
request may be sent again (a lost replica: yes, once; it never shows a client Ray's internals)."""

import logging

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from pipeline.errors import InvalidRequest, Overloaded

from .availability import StageUnavailable
from .stream import StageError

log = logging.getLogger("ray.serve")

# A replica, its worker or its node went away (kill -9, OOM, node loss) or is restarting: the request did nothing
# wrong and another replica (or the replacement) can take it.
REPLICA_LOST = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.LocalRayletDiedError,
    ray_errors.ObjectLostError,  # a stage's output died with its replica
    serve_errors.DeploymentUnavailableError,
    serve_errors.ReplicaUnavailableError,
)
OVERLOADED = (Overloaded, serve_errors.BackPressureError)


def _causes(exc: BaseException):
    """The exception and what it wraps (Ray wraps a replica's exception in RayTaskError; its original is .cause)."""
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc, seen = getattr(exc, "cause", None) or exc.__cause__, seen + 1


def classify(exc: BaseException, request_id: str = "") -> StageError:
    """The client-facing view of a failure from any stage (encoder, trimmer, decoder) or of its Ray transport."""
    for e in _causes(exc):
        if isinstance(e, InvalidRequest):
            return StageError(400, str(e))
        if isinstance(e, OVERLOADED):
            return StageError(503, "the server is overloaded; try again later")
        if isinstance(e, StageUnavailable):  # its node died: nothing to retry on until a replica is back
            return StageError(503, str(e))
        if isinstance(e, REPLICA_LOST):
            log.warning("request %s: stage replica lost (%s)", request_id, type(e).__name__)
            return StageError(503, "a serving replica was lost; try again shortly", retryable=True)
    log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
    return StageError(500, f"internal error (request {request_id})" if request_id else "internal error")
