"""/docs (Swagger UI) and /redoc: pinned scripts with Subresource Integrity, or none at all.

FastAPI's defaults load ``swagger-ui-dist@5`` and ``redoc@2`` from a CDN: whatever those
tags point at on the day a page is opened runs with the page's origin, where an operator
pastes an API key. Here each asset is one exact version, and the browser refuses it unless
its bytes hash to the ``integrity`` value below. No favicon or web font from elsewhere
either. In production (``TIERQ_PRODUCTION=true``) the pages are not served at all; the
OpenAPI document itself (/openapi.json) stays.

To move to another version: fetch the files from the npm package (``npm pack
swagger-ui-dist@X``), and take ``openssl dgst -sha384 -binary FILE | openssl base64 -A``
of each; jsDelivr serves a package's files byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

CDN = "https://cdn.jsdelivr.net/npm"
NO_ICON = "data:,"  # an empty favicon: the browser asks no one for one


@dataclass(frozen=True)
class Asset:
    url: str
    integrity: str


SWAGGER_JS = Asset(
    f"{CDN}/swagger-ui-dist@5.35.0/swagger-ui-bundle.js",
    "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
)
SWAGGER_CSS = Asset(
    f"{CDN}/swagger-ui-dist@5.35.0/swagger-ui.css",
    "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
)
REDOC_JS = Asset(
    f"{CDN}/redoc@2.5.2/bundles/redoc.standalone.js",
    "sha384-70P5pmIdaQdVbxvjhrcTDv1uKcKqalZ3OHi7S2J+uzDl0PW8dO6L+pHOpm9EEjGJ",
)


def _with_integrity(html: str, attribute: str, asset: Asset) -> str:
    """FastAPI writes ``src="URL"`` / ``href="URL"``; the integrity goes right after it. A
    FastAPI that writes its pages otherwise fails here, at start, not silently."""
    written = f'{attribute}="{asset.url}"'
    if html.count(written) != 1:
        raise RuntimeError(f"docs page: {written} not found once in FastAPI's page")
    signed = f'{written} integrity="{asset.integrity}" crossorigin="anonymous"'
    return html.replace(written, signed)


def _swagger_page(openapi_url: str, title: str) -> str:
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=SWAGGER_JS.url,
        swagger_css_url=SWAGGER_CSS.url,
        swagger_favicon_url=NO_ICON,
    )
    html = _with_integrity(bytes(page.body).decode(), "src", SWAGGER_JS)
    return _with_integrity(html, "href", SWAGGER_CSS)


def _redoc_page(openapi_url: str, title: str) -> str:
    page = get_redoc_html(
        openapi_url=openapi_url,
        title=f"{title} - ReDoc",
        redoc_js_url=REDOC_JS.url,
        redoc_favicon_url=NO_ICON,
        with_google_fonts=False,
    )
    return _with_integrity(bytes(page.body).decode(), "src", REDOC_JS)


def install(app: FastAPI, production: bool) -> None:
    """Serve /docs and /redoc (the app was made with ``docs_url=None, redoc_url=None``)."""
    openapi_url = app.openapi_url
    if production or not openapi_url:
        return
    _swagger_page(openapi_url, app.title)  # FastAPI's markup checked now, at start
    _redoc_page(openapi_url, app.title)

    def document(request: Request) -> str:  # behind a proxy that strips a path prefix too
        return request.scope.get("root_path", "") + openapi_url

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(_swagger_page(document(request), app.title))

    async def redoc(request: Request) -> HTMLResponse:
        return HTMLResponse(_redoc_page(document(request), app.title))

    app.add_route("/docs", docs, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)
