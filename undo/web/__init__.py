"""The dashboard: a small WSGI application, server-rendered, with no network fetch."""

from undo.web.app import make_app, serve

__all__ = ["make_app", "serve"]
