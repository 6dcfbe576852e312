"""Bearer-token check as plain ASGI middleware (BaseHTTPMiddleware would wrap streams)."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class APIKeyMiddleware:
    """Reject requests without `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        token = auth[7:] if auth[:7].lower() == b"bearer " else b""
        if hmac.compare_digest(token, self.key):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(401, "invalid or missing API key", None, "invalid_api_key"))
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})
