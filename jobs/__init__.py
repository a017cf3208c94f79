"""Run store, queue, worker and run lifecycle. Front ends reach the engine through here."""

from engine.errors import CherryError

__all__ = ["CherryError"]
