"""A fetch process of its own for tests of what processes share: `python fetch_worker.py
SETTINGS_JSON URL...` downloads the URLs with `fetch_rows` (the fetch stage's loop), after
printing `ready` and reading one line from stdin (so that a test starts several at once),
then prints a JSON line of statuses by count."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from yarl import URL

from facecaption.fetch.stage import SourceRow, Spool, fetch_rows
from facecaption.settings import FetchSettings


def main() -> None:
    limits = FetchSettings(**json.loads(sys.argv[1]))
    rows = [(SourceRow(i, url, None, None), URL(url)) for i, url in enumerate(sys.argv[2:])]
    print("ready", flush=True)
    sys.stdin.readline()
    with tempfile.TemporaryDirectory() as folder, Spool(Path(folder) / "spool") as spool:
        records = asyncio.run(fetch_rows(rows, limits, spool))
    print(json.dumps(Counter(r["status"] for r in records.values())), flush=True)


if __name__ == "__main__":
    main()
