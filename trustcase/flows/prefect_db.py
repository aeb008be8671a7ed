"""The local Prefect database, brought up to date before an ephemeral Prefect server starts on it.

Without a Prefect server (PREFECT_API_URL unset), every trustcase process starts its own ephemeral server
on the SQLite database in PREFECT_HOME, and each server migrates that database as it starts. Two processes
starting together on a fresh database race in those migrations (alembic: "Online migration expected to
match one row"). So the migrations run here first, under an exclusive lock on a file beside the database;
the servers then find it up to date and have nothing to migrate.
"""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path


def sqlite_path() -> Path | None:
    """The database file of the ephemeral server, or None when a Prefect server (or another database) is used."""
    import prefect.settings

    s = prefect.settings.get_current_settings()
    if s.api.url:
        return None  # a Prefect server owns its database and its migrations
    url = s.server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
    if not url.startswith("sqlite") or ":memory:" in url or ":///" not in url:
        return None
    return Path(url.split(":///", 1)[1])


def ensure_local_database() -> None:
    """Create or migrate the ephemeral server's SQLite database, one process at a time. A stamp beside it
    records the Prefect version that migrated it last, so that the usual case costs a file read."""
    import prefect

    path = sqlite_path()
    if path is None:
        return
    stamp = path.with_name(path.name + ".trustcase-migrated")

    def current() -> bool:
        return path.is_file() and stamp.is_file() and stamp.read_text() == prefect.__version__

    if current():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".trustcase-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if current():  # another process migrated it while this one waited
            return
        from prefect.server.database import provide_database_interface

        asyncio.run(provide_database_interface().create_db())  # alembic upgrade to this Prefect's head
        stamp.write_text(prefect.__version__)
