"""The service's search records on disk: one small JSON file per search, replaced atomically.

A record is what a restarted service needs to list a search again and to carry on with it (see
:meth:`~diffsearch.service.searches.SearchRecord.to_json`); the run itself is in its run folder.
Each write goes to a temporary file beside the record, is flushed to disk, then renamed over it
with ``os.replace``, so a service killed at any moment leaves either the old record or the new
one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("diffsearch.service")

RECORDS = "searches"
"""The folder of the records inside the data dir: ``DATA_DIR/searches/<search id>.json``."""


class RecordFiles:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.folder = data_dir / RECORDS
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, search_id: str, data: dict[str, Any]) -> None:
        target = self.folder / f"{search_id}.json"
        temporary = self.folder / f".{search_id}.json.tmp"
        with temporary.open("w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)

    def ids(self) -> list[str]:
        """Every search id with a record file, readable or not (ids are never reused)."""
        ids = (path.stem for path in self.folder.glob("s[0-9]*.json"))
        return sorted((i for i in ids if i[1:].isdigit()), key=lambda i: int(i[1:]))

    def load(self) -> Iterator[dict[str, Any]]:
        """Every readable record, oldest id first. An unreadable one is logged and skipped: one
        damaged file must not keep the service from starting."""
        for search_id in self.ids():
            data = self.load_one(search_id)
            if data is not None:
                yield data

    def load_one(self, search_id: str) -> dict[str, Any] | None:
        """One search's record; None when it has none, or an unreadable one (logged)."""
        path = self.folder / f"{search_id}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("skipping the search record %s: %s", path, error)
            return None
        if not isinstance(data, dict):
            log.warning("skipping the search record %s: not a JSON object", path)
            return None
        return data
