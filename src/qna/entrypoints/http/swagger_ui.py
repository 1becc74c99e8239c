"""GET /docs: Swagger UI over /openapi.json, its files served by this service itself.

The files are the copy of Swagger UI that the flask-swagger-ui package ships (only its
files: the page is ours), so the page needs no other host: it works offline and in an
air-gapped deployment, and a visitor's browser tells no CDN that it read our docs.
"""

from __future__ import annotations

import base64
import hashlib
import html
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

DISTRIBUTION = "flask-swagger-ui"
# Its release follows Swagger UI's (5.34.0 ships Swagger UI 5.34.0), and a new one is a
# new URL for every file: a browser may keep them for a year without asking again.
VERSION = version(DISTRIBUTION)
ASSET_MAX_AGE_S = 365 * 24 * 3600

# The files the page loads, and their types: a requested name is looked up here, never
# joined to a path, so no request reaches any other file. The icon spares the browser
# asking for /favicon.ico, which would need a token and spend the rate budget.
ASSET_TYPES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}


def asset_path(name: str) -> Path:
    # A package installed as files (pip always installs so): send_file needs a path.
    return Path(str(files("flask_swagger_ui").joinpath("dist", name)))


# Relative URLs, as "openapi.json" is: from /docs, "docs/..." is /docs/..., and behind a
# proxy that serves the API under /prefix the page still loads /prefix/docs/... .
_ASSETS = f"docs/swagger-ui/{html.escape(VERSION)}"
# validatorUrl null: else, on a public host, Swagger UI shows a badge whose image
# comes from validator.swagger.io (sending it this document's URL).
_START = 'SwaggerUIBundle({url: "openapi.json", dom_id: "#docs", validatorUrl: null});'

DOCS_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>qna API</title>
  <link rel="icon" type="image/png" href="{_ASSETS}/favicon-32x32.png">
  <link rel="stylesheet" href="{_ASSETS}/swagger-ui.css">
</head>
<body>
  <div id="docs"></div>
  <noscript>The API is described in <a href="openapi.json">openapi.json</a>.</noscript>
  <script src="{_ASSETS}/swagger-ui-bundle.js"></script>
  <script>{_START}</script>
</body>
</html>
"""


def _script_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


# The page may load and run only what this service serves (its one inline script by its
# hash), and talk only to it ("Try it out" sends to the same origin). Swagger UI draws
# its icons from data: URLs in its stylesheet, and sets its inline styles through the
# DOM, which style-src leaves alone: no 'unsafe-inline' (Chromium reports no violation
# with every operation open, the Authorize dialog used, and a request tried out). Its
# forms never submit: they call the API by fetch. Only a page of this service may
# frame it: framed by another site, a click meant for it could land in the Authorize
# dialog or on "Execute" (clickjacking).
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"script-src 'self' {_script_hash(_START)}",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'self'",
    ]
)
