"""The admin API under ``/_sim/``: switch faults at runtime, read what was received.

GET /_sim/state     the instance's name and current faults (count = faulted requests left)
PUT /_sim/faults    replace the faults (absent fields take their defaults); 422 if invalid
PATCH /_sim/faults  change only the fields given
POST /_sim/reset    back to the initial faults, counters zeroed
GET /_sim/stats     requests received per endpoint and in total, faults served, concurrency,
                    requests aborted (the client went away before the whole answer) and
                    streams interrupted (by a newcomer, with interrupt_streams)
POST /_sim/stats/reset  counters and request log zeroed, faults kept
GET /_sim/requests  the latest requests received, oldest first: endpoint, wall-clock time,
                    the fault served and the JSON body (what a client really sent)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from simulator.asgi import Receive, Reply, Scope, Send, json_reply, read_body, send_reply
from simulator.faults import FaultSettings

if TYPE_CHECKING:
    from simulator.app import SimulatorApp


async def handle_admin(app: SimulatorApp, scope: Scope, receive: Receive, send: Send) -> None:
    body = await read_body(receive)
    await send_reply(send, _dispatch(app, scope["method"], scope["path"], body))


def _dispatch(app: SimulatorApp, method: str, path: str, body: bytes) -> Reply:
    if path == "/_sim/state" and method == "GET":
        return _state(app)
    if path == "/_sim/stats" and method == "GET":
        return json_reply(200, {"name": app.name} | app.stats.snapshot())
    if path == "/_sim/stats/reset" and method == "POST":
        app.stats.reset()
        return json_reply(200, {"name": app.name} | app.stats.snapshot())
    if path == "/_sim/requests" and method == "GET":
        return json_reply(200, {"name": app.name, "requests": app.stats.requests()})
    if path == "/_sim/reset" and method == "POST":
        app.faults.reset()
        app.stats.reset()
        app.slots.wake_all()  # requests waiting for a slot see the limit as it is now
        return _state(app)
    if path == "/_sim/faults" and method in ("PUT", "PATCH"):
        return _set_faults(app, method, body)
    return json_reply(404, {"detail": f"no admin endpoint {method} {path}"})


def _state(app: SimulatorApp) -> Reply:
    return json_reply(200, {"name": app.name, "faults": app.faults.snapshot()})


def _set_faults(app: SimulatorApp, method: str, body: bytes) -> Reply:
    try:
        changes: Any = json.loads(body or b"{}")
    except ValueError as exc:
        return json_reply(422, {"detail": f"body is not valid JSON: {exc}"})
    if not isinstance(changes, dict):
        return json_reply(422, {"detail": "body must be a JSON object of fault settings"})
    try:
        if method == "PUT":
            app.faults.replace(FaultSettings.model_validate(changes))
        else:
            app.faults.patch(changes)
    except ValidationError as exc:
        detail = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False)
        ]
        return json_reply(422, {"detail": detail})
    app.slots.wake_all()
    return _state(app)
