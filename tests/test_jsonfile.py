"""The registries' JSON file: staged under the owner's lock, written outside it, never
going back to an older document when flushes race."""

from __future__ import annotations

import json
import threading

from cachesvc.node.jsonfile import JsonFile


def test_stage_then_flush_writes_the_newest(tmp_path):
    f = JsonFile(tmp_path / "models.json")
    assert f.read() is None
    f.stage([1])
    assert f.read() is None                      # staged only: nothing on disk yet
    f.stage([1, 2])
    f.flush()
    assert f.read() == [1, 2]
    f.flush()                                    # nothing newer: no write
    assert not (tmp_path / "models.tmp").exists()


def test_racing_flushes_never_regress(tmp_path):
    f = JsonFile(tmp_path / "p.json")
    lock = threading.Lock()

    def writer(start: int) -> None:
        for i in range(start, start + 200):
            with lock:
                f.stage({"n": i})
            f.flush()
    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = json.loads((tmp_path / "p.json").read_text())
    with lock:
        f.flush()
    assert last == json.loads(f._text)           # the file holds the last staged document


def test_no_path_is_memory_only():
    f = JsonFile(None)
    f.stage({"a": 1})
    f.flush()
    assert f.read() is None
