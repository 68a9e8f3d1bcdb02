"""iServe's one exception tree. Every error that crosses the bus is an ``IServeError`` subclass with a
stable ``code`` and a message that says what to fix; ``to_reply``/``from_reply`` convert to and from
the wire's ``ErrorReply``.

    IServeError
    ├── BadRequest            bad_request          malformed or invalid message
    ├── NotFound              not_found            unknown model, deployment, worker or profile
    ├── Conflict              conflict             a different checkpoint under a name already taken
    ├── CheckpointError       bad_checkpoint       missing config.json, truncated/corrupt safetensors, missing tensors
    ├── UnsupportedModel      unsupported_model    architecture iServe cannot run or profile
    ├── Infeasible            infeasible           no configuration satisfies the intent on the free GPUs
    ├── PromptTooLong         prompt_too_long      prompt + max_tokens exceed the deployment's context
    ├── NotReady              not_ready            model not profiled yet, deployment still launching
    ├── Unavailable           unavailable          no service/agent/worker answered
    ├── Timeout               timeout              the request ran out of time
    ├── Overloaded            overloaded           the deployment's queue is full: retry later (HTTP 429)
    ├── WorkerDied            worker_died          the worker serving the request exited
    ├── Cancelled             cancelled            the client cancelled the request
    └── InternalError         internal             a bug: the message includes the exception
"""

from __future__ import annotations

from .messages import ErrorReply


class IServeError(Exception):
    code = "internal"

    def __init__(self, message: str, *, request_id: str = ""):
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, message=self.message, request_id=self.request_id)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class BadRequest(IServeError):
    code = "bad_request"


class NotFound(IServeError):
    code = "not_found"


class Conflict(IServeError):
    code = "conflict"


class CheckpointError(IServeError):
    code = "bad_checkpoint"


class UnsupportedModel(IServeError):
    code = "unsupported_model"


class Infeasible(IServeError):
    code = "infeasible"


class PromptTooLong(IServeError):
    code = "prompt_too_long"


class NotReady(IServeError):
    code = "not_ready"


class Unavailable(IServeError):
    code = "unavailable"


class Timeout(IServeError):
    code = "timeout"


class Overloaded(IServeError):
    code = "overloaded"


class WorkerDied(IServeError):
    code = "worker_died"


class Cancelled(IServeError):
    code = "cancelled"


class InternalError(IServeError):
    code = "internal"


_BY_CODE: dict[str, type[IServeError]] = {cls.code: cls for cls in IServeError.__subclasses__()}


def from_reply(reply: ErrorReply) -> IServeError:
    cls = _BY_CODE.get(reply.code, IServeError)
    err = cls(reply.message, request_id=reply.request_id)
    if cls is IServeError:
        err.code = reply.code
    return err
