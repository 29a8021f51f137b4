"""`uniultra serve`: the point-of-care web app (JSON API + a no-build page).

Needs the `serve` extra (fastapi, uvicorn, python-multipart): `pip install 'uniultra[serve]'`.
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See `uniultra.serve.app.create_app` (imported lazily: fastapi is an optional dependency)."""
    from uniultra.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
