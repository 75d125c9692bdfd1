"""One job per output: a lock file in the output location, so a second job into it is refused at once.

`OUT/.l2c-lock.json` names the holder (command, host, pid, start time). On a filesystem it is created
exclusively (O_EXCL); in an object store it is written, then read back to see who won. A lock whose holder
is a dead process on this host (kill -9) is taken over; one held from another host is respected until the
file is removed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from l2c import atomic
from l2c.errors import L2CError
from l2c.storage import Store

LOCK = ".l2c-lock.json"
log = logging.getLogger(__name__)


class Locked(L2CError):
    """Another job holds the output location."""


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell: trust it
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


class OutputLock:
    """Held from `acquire` to `release` (also a context manager)."""

    def __init__(self, store: Store, info: dict):
        self.store, self.info = store, info

    @classmethod
    def acquire(cls, store: Store, command: str) -> OutputLock:
        info = {"token": uuid.uuid4().hex, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        data = json.dumps(info) + "\n"
        for _ in range(3):
            holder = cls._holder(store)
            if holder is not None and _alive(holder):
                raise Locked(
                    f"{store.display()} is in use by another {holder.get('command', 'l2c')} job (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, since {holder.get('started')}); wait for it to finish, or remove "
                    f"{store.display(LOCK)} if that job is gone"
                )
            if holder is not None:  # its process died (kill -9): take the lock over
                log.warning("taking over %s from pid %s, which is gone", store.display(LOCK), holder.get("pid"))
                store.remove(LOCK)
            if store.local:
                try:
                    fd = os.open(store.path(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY, atomic.file_mode())
                except FileExistsError:
                    continue  # someone else was quicker: look again
                with os.fdopen(fd, "w") as f:
                    f.write(data)
            else:
                store.write_text(LOCK, data)
                time.sleep(0.2)
            if (cls._holder(store) or {}).get("token") == info["token"]:
                return cls(store, info)
        raise Locked(f"could not take the lock {store.display(LOCK)}: other jobs keep starting into the same output")

    @staticmethod
    def _holder(store: Store) -> dict | None:
        try:
            text = store.read_text(LOCK)
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"host": "?", "pid": "?", "started": "?", "command": "l2c"}  # being written: held

    def release(self) -> None:
        if (self._holder(self.store) or {}).get("token") == self.info["token"]:
            self.store.remove(LOCK)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
