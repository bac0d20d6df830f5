"""The Litestar side of the proxy: the public routes (public.py, embeddings.py) and the admin API
(admin.py, one Controller behind the admin key). Routed requests usually skip Litestar (asgi.py)."""

from .admin import AdminController
from .public import RELAYED, ROUTES

__all__ = ["RELAYED", "ROUTES", "AdminController"]
