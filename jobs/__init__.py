"""Run store, queue, worker and run lifecycle. Front ends reach the engine through here."""

from engine.errors import INTERRUPTED_EXIT, OOM_EXIT, USER_ERROR_EXIT, CherryError

__all__ = ["INTERRUPTED_EXIT", "OOM_EXIT", "USER_ERROR_EXIT", "CherryError"]
