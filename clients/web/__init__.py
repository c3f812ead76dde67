"""The browser viewer (``her2scope web``): the OpenCV viewer's content in a web page, for any number of browsers.

- ``model``: the page's content as JSON, from the viewer's own state and content functions (pure).
- ``access``: where it listens, TLS, and the control token (read-only unless started with ``--control``).
- ``server``: one follower of the daemon in a thread of its own, the aiohttp server, and the fan-out to every
  browser (latest wins, per browser).
- ``static/``: the page (plain HTML, CSS and JavaScript; nothing is loaded from elsewhere).
"""

from her2scope.clients.web.access import AccessError, authorized, check_binding, control_token, is_loopback, tls_context
from her2scope.clients.web.model import css, page_settings, view_model
from her2scope.clients.web.server import ClientChannel, Hub, WebError, WebSettings, make_app, serve

__all__ = [
    "AccessError",
    "ClientChannel",
    "Hub",
    "WebError",
    "WebSettings",
    "authorized",
    "check_binding",
    "control_token",
    "css",
    "is_loopback",
    "make_app",
    "page_settings",
    "serve",
    "tls_context",
    "view_model",
]
