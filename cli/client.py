"""Client commands: talk to a running tierq API over HTTP (TIERQ_URL, TIERQ_KEY)."""

from __future__ import annotations

import json
import os

import click
import httpx

TERMINAL = {"succeeded", "failed", "cancelled", "dead"}


def _client() -> httpx.Client:
    key = os.environ.get("TIERQ_KEY")
    if not key:
        raise click.ClickException("set TIERQ_KEY to an API key (tierq keys create NAME)")
    base = os.environ.get("TIERQ_URL", "http://127.0.0.1:8000")
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=70)


def _checked(response: httpx.Response) -> dict:  # type: ignore[type-arg]
    if response.status_code >= 400:
        raise click.ClickException(f"{response.status_code}: {response.text}")
    return response.json()


@click.command()
@click.argument("message")
@click.option(
    "--model", default=None, help="A model GET /v1/models lists (default: the first one)."
)
@click.option("--conversation", default=None, help="Append to this conversation.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the answer.")
def submit(message: str, model: str | None, conversation: str | None, wait: bool) -> None:
    """Submit a chat message as a durable job; print the answer (or the job id)."""
    with _client() as client:
        model = model or _checked(client.get("/v1/models"))["data"][0]["id"]
        body: dict = {"model": model, "messages": [{"role": "user", "content": message}]}  # type: ignore[type-arg]
        if conversation:
            body["conversation_id"] = conversation
        job = _checked(client.post("/v1/jobs", json=body))
        click.echo(f"job {job['id']} {job['status']}", err=True)
        while wait and job["status"] not in TERMINAL:
            job = _checked(client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}))
    if not wait:
        click.echo(job["id"])
        return
    _print_outcome(job)


def _print_outcome(job: dict) -> None:  # type: ignore[type-arg]
    served = job["served_by"]
    click.echo(
        f"{job['status']} on tier {served['tier']} backend {served['backend']} "
        f"(quality {served['quality']}, {served['attempts']} attempts)",
        err=True,
    )
    if job["result"]:
        click.echo(job["result"]["choices"][0]["message"]["content"])
    elif job["error"]:
        click.echo(job["error"])


@click.command()
@click.argument("job_id")
def status(job_id: str) -> None:
    """Print a job as JSON."""
    with _client() as client:
        click.echo(json.dumps(_checked(client.get(f"/v1/jobs/{job_id}")), indent=2))


@click.command()
@click.argument("job_id")
def watch(job_id: str) -> None:
    """Follow a job live (its event stream) until it ends; print the answer."""
    with _client() as client:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            for line in response.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    _print_event(event)
        _print_outcome(_checked(client.get(f"/v1/jobs/{job_id}")))


def _print_event(event: dict) -> None:  # type: ignore[type-arg]
    details = " ".join(
        f"{k}={v}" for k, v in event.items() if k not in ("job_id", "at", "kind") and v is not None
    )
    click.echo(f"{event['at']} {event.get('kind', '')} {details}".rstrip())


client_commands = [submit, status, watch]
