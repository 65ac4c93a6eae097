"""A JSON file written atomically, staged under the caller's lock and written outside it.

The registries change under the store lock; writing their file there would make every
request wait on the disk. So a change *stages* the new document (serialized, numbered)
under the lock, and the caller *flushes* after releasing it. Flushes may race: each
writes only if its staged number is newer than the file's, so the file never goes back
to an older state. Writes are tmp + rename: a crash leaves the old or the new file.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class JsonFile:
    """Invariant: ``_written <= _staged``; the file holds document number ``_written``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._text = ""
        self._staged = 0        # number of the newest staged document
        self._written = 0       # number of the document on disk
        self._write_lock = threading.Lock()

    def read(self) -> object | None:
        """The file's document, or None when there is no file (or no path)."""
        if self.path is None or not self.path.exists():
            return None
        return json.loads(self.path.read_text())

    def stage(self, document: object) -> None:
        """Record the new state (cheap: one ``json.dumps``). Call under the owner's lock."""
        if self.path is not None:
            self._text = json.dumps(document, indent=1)
            self._staged += 1

    def flush(self) -> None:
        """Write the newest staged document if the file is behind. Call without the
        owner's lock."""
        if self.path is None:
            return
        with self._write_lock:
            number, text = self._staged, self._text
            if number <= self._written:
                return
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            self._written = number
