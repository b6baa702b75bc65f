"""The web dashboard's files (``agent/web/``), served by the agent as they are: no build step.

The page reads the same API as the CLI (``/v1/overview``, ``/v1/checkpoints/G``) and acts
through it. A browser cannot speak to a Unix socket, so the dashboard is for the opt-in TCP
listener (``--api 127.0.0.1:PORT``, or ``https://`` off loopback), where every request needs
the token: ``ferry dashboard-url`` prints a ``/login?token=...`` address that sets it as an
HttpOnly, SameSite=Strict cookie (access.py).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
HEADERS: List[Tuple[bytes, bytes]] = [
    (b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]


class Page:
    """A static file to send: its bytes, content type and headers."""

    def __init__(self, body: bytes, ctype: str) -> None:
        self.body = body
        self.ctype = ctype
        self.headers = HEADERS


class Files:
    """The dashboard's files, read once at start; only these names are ever served."""

    def __init__(self, directory: str = WEB) -> None:
        self.files: Dict[str, Page] = {}
        for name in sorted(os.listdir(directory)):
            ext = os.path.splitext(name)[1]
            path = os.path.join(directory, name)
            if ext in TYPES and os.path.isfile(path):
                with open(path, "rb") as f:
                    self.files[name] = Page(f.read(), TYPES[ext])

    def page(self, path: str) -> Optional[Page]:
        if path in ("/", "/index.html"):
            return self.files.get("index.html")
        if path.startswith("/ui/"):
            return self.files.get(path[4:])
        return None
