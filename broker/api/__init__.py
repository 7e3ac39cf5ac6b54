"""The HTTP API: an app factory plus one router module per resource."""

from broker.api.app import create_app

__all__ = ["create_app"]
