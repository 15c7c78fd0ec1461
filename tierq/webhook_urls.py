"""Webhook URLs: the guard against server-side request forgery.

A webhook URL is checked when it is submitted and again before every delivery. At submit,
the request field (``WebhookURL``) checks the syntax and a literal address, and the
endpoint then calls ``check_url`` off the event loop for a host name's addresses. At
delivery, ``pin`` resolves the host again, refuses non-public addresses, and connects to
exactly the address it checked. ``TIERQ_WEBHOOK_ALLOW_PRIVATE`` lifts the address checks
(``tierq.webhooks.WebhookSettings``).
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, Field

from tierq.webhooks import WebhookSettings, webhook_settings


class UnsafeWebhookURL(ValueError):
    """The URL is malformed, or its host is (or resolves to) a non-public address."""


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not receive webhooks, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return _non_public(mapped)
    for attribute, reason in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(address, attribute):
            return reason
    if not address.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT), documentation ranges
        return "non-public"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written (lowercase), without brackets
    port: int
    url: str


def parse_url(url: str) -> Target:
    """Syntax only: http or https, a host, no credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookURL(f"not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeWebhookURL("must be an http:// or https:// URL")
    if not parts.hostname:
        raise UnsafeWebhookURL("must name a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookURL("must not contain credentials; receivers verify the signature")
    try:  # an internationalized name in its ASCII form: what DNS and the Host header use
        host = parts.hostname.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise UnsafeWebhookURL("the host is not a valid name") from exc
    default = 443 if scheme == "https" else 80
    return Target(scheme, host, port or default, url)


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def resolve(target: Target) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address the host resolves to (raises OSError when it does not resolve)."""
    literal = _literal(target.host)
    if literal is not None:
        return [literal]
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise OSError(f"{target.host} has no address")
    return found


def refuse_non_public(
    target: Target, addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> None:
    """Refuse if any address is non-public: one bad record is enough to be steered there."""
    for address in addresses:
        reason = _non_public(address)
        if reason is None:
            continue
        if _literal(target.host) is not None:
            raise UnsafeWebhookURL(
                f"{address} is a {reason} address; webhooks are sent only to public addresses"
            )
        raise UnsafeWebhookURL(
            f"{target.host} resolves to {address}, a {reason} address; webhooks are sent "
            "only to public addresses"
        )


@lru_cache
def _resolver_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


def check_syntax(url: str, settings: WebhookSettings | None = None) -> Target:
    """What can be checked without the network: the syntax, and a host that is a literal
    address (unless private targets are allowed). Raises UnsafeWebhookURL."""
    settings = settings or webhook_settings()
    target = parse_url(url)
    literal = _literal(target.host)
    if literal is not None and not settings.allow_private:
        refuse_non_public(target, [literal])
    return target


def check_url(url: str, settings: WebhookSettings | None = None) -> str:
    """Submit-time check of a webhook URL: the syntax, then (unless private targets are
    allowed) every address its host resolves to. Raises UnsafeWebhookURL.

    Blocks for DNS, up to ``resolve_timeout``: call it from a worker thread, never on an
    event loop. A host that does not resolve (yet) is accepted, since the delivery worker
    checks the resolved address again before every request (DNS can change between submit
    and delivery) and sends only to that address.
    """
    settings = settings or webhook_settings()
    target = check_syntax(url, settings)
    if settings.allow_private or _literal(target.host) is not None:
        return url
    future = _resolver_pool().submit(resolve, target)
    try:
        addresses = future.result(timeout=settings.resolve_timeout)
    except (OSError, FutureTimeout, UnicodeError):
        return url
    refuse_non_public(target, addresses)
    return url


def _validate(url: str) -> str:
    # Syntax only: request bodies are validated on the API's event loop, where waiting for
    # DNS would stall every other request. The endpoint resolves the host in a thread.
    try:
        check_syntax(url)
    except UnsafeWebhookURL as exc:
        raise ValueError(str(exc)) from None
    return url


# The request field: a 422 naming `webhook_url` when the URL is malformed or a non-public
# literal address; endpoints then call check_url (off the event loop) for host names.
# The schema states the http(s) rule for OpenAPI readers and fuzzers; the validator checks
# it (with a message that says what to send) and refuses non-public hosts, which no schema
# can say.
WebhookURL = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://", "format": "uri"},
    ),
    AfterValidator(_validate),
]


@dataclass(frozen=True)
class PinnedRequest:
    url: str  # the URL with its host replaced by the checked address
    headers: dict[str, str]  # Host: the original host
    extensions: dict[str, Any]  # TLS server name (SNI and certificate check): the original host


def pin(url: str, settings: WebhookSettings) -> PinnedRequest:
    """Delivery-time check: resolve now, refuse non-public addresses (unless allowed), and
    connect to exactly the address that was checked, so a DNS answer that changes between
    the check and the connection (rebinding) cannot redirect the request."""
    target = parse_url(url)
    addresses = resolve(target)
    if not settings.allow_private:
        refuse_non_public(target, addresses)
    address = addresses[0]
    parts = urlsplit(url)
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{host}:{target.port}"
    pinned = urlunsplit((target.scheme, netloc, parts.path or "/", parts.query, ""))
    default = 443 if target.scheme == "https" else 80
    shown = f"[{target.host}]" if ":" in target.host else target.host
    host_header = shown if target.port == default else f"{shown}:{target.port}"
    extensions: dict[str, Any] = {}
    if target.scheme == "https" and _literal(target.host) is None:
        extensions["sni_hostname"] = target.host
    return PinnedRequest(pinned, {"host": host_header}, extensions)
