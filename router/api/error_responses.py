"""How an exception raised while answering a request becomes the response, in the API's own error format.

ErrorResponses is the innermost layer of the router app: it answers an exception from the routes with the
app's exception handlers (FastAPI's `add_exception_handler` / `@app.exception_handler`), looked up by the
exception's class along its MRO, an HTTPException also by its status code. The router registers
ERROR_HANDLERS: APIError with its own status, Starlette's HTTPException (404 unknown path, 405 wrong
method), ClientDisconnect as 499 (nginx's "client closed request": nobody reads it, the request metrics
count it) and anything else as a logged 500. Once a response has started, nothing can be answered any
more: the exception is logged and re-raised, and the server closes the connection.

It wraps `send` in a plain function, so that a streamed event passes no extra coroutine on its way out.
"""

from __future__ import annotations

import inspect
import logging
from typing import Awaitable, Callable, Mapping

from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k2serve.router.errors import APIError, error_body, validation_message

log = logging.getLogger(__name__)

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response] | Response]


class ErrorResponses:
    """ASGI middleware: an exception from `app` is answered by the matching handler of `handlers`."""

    def __init__(self, app: ASGIApp, handlers: Mapping[type[Exception] | int, ExceptionHandler]):
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        def send_started(message: Message) -> Awaitable[None]:  # a plain function: no frame per event
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)
        try:
            await self.app(scope, receive, send_started)
        except Exception as exc:
            handler = self._handler(exc)
            if started or handler is None:
                log.exception("unhandled error on %s", scope["path"])
                raise
            response = await _call(handler, Request(scope, receive), exc)
            await response(scope, receive, send)

    def _handler(self, exc: Exception) -> ExceptionHandler | None:
        if isinstance(exc, HTTPException) and exc.status_code in self.handlers:
            return self.handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None


async def _call(handler: ExceptionHandler, request: Request, exc: Exception) -> Response:
    """Starlette's contract: a handler is a coroutine function or a plain function (run in a thread)."""
    if inspect.iscoroutinefunction(handler):
        return await handler(request, exc)
    return await run_in_threadpool(handler, request, exc)


def _answer(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, err), status_code=err.status)


async def api_error(request: Request, exc: APIError) -> Response:
    return _answer(request, exc)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return _answer(request, APIError(exc.status_code, str(exc.detail)))


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    return _answer(request, APIError(400, validation_message(exc.errors())))


async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return _answer(request, APIError(499, "the client closed the request"))


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _answer(request, APIError(500, "internal server error"))


ERROR_HANDLERS: Mapping[type[Exception], ExceptionHandler] = {
    APIError: api_error, HTTPException: http_error, RequestValidationError: invalid_request,
    ClientDisconnect: client_gone, Exception: internal_error,
}
