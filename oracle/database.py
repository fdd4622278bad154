"""Example databases shared by every run of a campaign: ``--database URL``.

``URL`` is a directory (Hypothesis's ``DirectoryBasedExampleDatabase``: one machine, or a
shared file system) or ``redis://host:port/N`` (Hypothesis's ``RedisExampleDatabase``: any
number of machines; needs the ``redis`` client, ``pip install 'pyimago[campaign]'``).

Two things live there:

* Hypothesis's own entries (the shrunk choice sequence of every failure, keyed by the state
  machine, hence by the target's name), which every later run with the same database replays
  before generating anything new;
* pyimago's replay records (under :data:`REPLAYS_KEY`): each failure's chain and operation
  list as a replay file's JSON, plus where and when it was found, so that
  ``pyimago replay --database URL`` can list and rerun them without Hypothesis, the target's
  source or the machine that found them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Final

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from .replay import Replay, load_replay

__all__ = [
    "CAMPAIGN_EXTRA",
    "REPLAYS_KEY",
    "DatabaseError",
    "SavedReplay",
    "open_database",
    "redact",
    "save_replay",
    "save_replay_files",
    "saved_replays",
]

#: The extra that brings the redis client in.
CAMPAIGN_EXTRA: Final = "campaign"

#: Where pyimago's replay records live in a shared database (a key no Hypothesis test has:
#: Hypothesis's keys are raw SHA-384 digests, with suffixes).
REPLAYS_KEY: Final = b"pyimago.replays"

_REDIS: Final = "redis://"


class DatabaseError(ValueError):
    """A ``--database`` value that cannot be used (the message names it)."""


def redact(url: str) -> str:
    """``url`` as messages and summaries show it: a redis password replaced by ``***``."""
    if not url.startswith(_REDIS) or "@" not in url:
        return url
    userinfo, rest = url[len(_REDIS):].split("@", 1)
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{_REDIS}{user}:***@{rest}"


def _open_redis(url: str) -> ExampleDatabase:
    shown = redact(url)
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError as exc:
        raise DatabaseError(
            f"--database {shown}: redis databases need the redis client; install the "
            f"'{CAMPAIGN_EXTRA}' extra: pip install 'pyimago[{CAMPAIGN_EXTRA}]'"
        ) from exc
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        client.ping()
    except (ValueError, redis.RedisError) as exc:
        raise DatabaseError(f"--database {shown}: cannot use this redis server: {exc}") from exc
    return RedisExampleDatabase(client)


def open_database(url: str) -> ExampleDatabase:
    """The example database ``url`` names: a directory (created if missing) or
    ``redis://host:port/N`` (checked to answer).  Raises :class:`DatabaseError`."""
    if not isinstance(url, str) or not url.strip():
        raise DatabaseError(f"--database {url!r}: name a directory or redis://host:port/N")
    if url.startswith(_REDIS):
        return _open_redis(url)
    if "://" in url:
        raise DatabaseError(
            f"--database {url}: unknown scheme {url.split('://', 1)[0]!r}; "
            "use a directory or redis://host:port/N"
        )
    if os.path.exists(url) and not os.path.isdir(url):
        raise DatabaseError(f"--database {url}: exists and is not a directory")
    try:
        os.makedirs(url, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"--database {url}: cannot create the directory: {exc}") from exc
    return DirectoryBasedExampleDatabase(url)


@dataclass(frozen=True, slots=True)
class SavedReplay:
    """A replay record read back from a database, with where and when it was found."""

    replay: Replay
    host: str
    found_at: float
    worker: str | None
    raw: bytes

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.found_at))
        who = self.host if self.worker is None else f"{self.host} ({self.worker})"
        failure = (self.replay.failure or "").splitlines()[0] if self.replay.failure else "?"
        return (
            f"{self.replay.target or '?'}: {len(self.replay.ops)} operations on "
            f"{len(self.replay.chain.layers)} layer(s), found {when} on {who}: {failure}"
        )


def save_replay(db: ExampleDatabase, replay: Replay, *, worker: str | None = None) -> None:
    """Store ``replay`` in ``db`` for ``pyimago replay --database``."""
    record: dict[str, Any] = {
        "replay": replay.to_json(),
        "host": socket.gethostname(),
        "found_at": time.time(),
        "worker": worker,
    }
    db.save(REPLAYS_KEY, json.dumps(record, sort_keys=True).encode())


def save_replay_files(db: ExampleDatabase, paths: list[str], *, worker: str | None = None) -> None:
    """Store the replay files at ``paths`` (a failing run's) in ``db``."""
    for path in paths:
        save_replay(db, load_replay(path), worker=worker)


def saved_replays(db: ExampleDatabase) -> list[SavedReplay]:
    """The replay records in ``db``, oldest first; a failure saved by several workers is
    listed once (its first finding), unreadable entries are skipped."""
    found: dict[str, SavedReplay] = {}
    for raw in db.fetch(REPLAYS_KEY):
        try:
            record = json.loads(raw)
            saved = SavedReplay(
                Replay.from_json(record["replay"]),
                str(record.get("host", "?")),
                float(record.get("found_at", 0.0)),
                record.get("worker"),
                raw,
            )
        except (ValueError, KeyError, TypeError):
            continue
        same = json.dumps(saved.replay.to_json(), sort_keys=True)
        if same not in found or saved.found_at < found[same].found_at:
            found[same] = saved
    return sorted(found.values(), key=lambda s: (s.found_at, s.raw))
