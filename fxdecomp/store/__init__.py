"""Component stores: extract once to disk (resumable, torchrun-parallel), read lazily anywhere.

``fxdecomp extract`` writes a store (``fxdecomp.store.extract``); ``open_store(path)`` reads it
(``fxdecomp.store.reader``); the on-disk format, checksums and the writer lock are in
``fxdecomp.store.format``.
"""
from fxdecomp.store.format import (StoreCorruptError, StoreError, StoreIncompleteError,
                                   StoreLockedError, StoreMismatchError)
from fxdecomp.store.reader import ComponentStore, StoreBatch, open_store

__all__ = ["open_store", "ComponentStore", "StoreBatch", "StoreError", "StoreCorruptError",
           "StoreIncompleteError", "StoreLockedError", "StoreMismatchError"]
