"""The model registry: a content-addressed store of immutable versions, aliases that move, and the event log of
every move (`registry.py`); the store (`store.py`) and the database (`database.py`, SQLite or PostgreSQL)."""

from tunelab.registry.registry import Registry, default_root

__all__ = ["Registry", "default_root"]
