"""What the fetch learned of each host's rate, kept across shards (`host_rates`).

A fetch loads the rates of the hosts in its rows before it starts and saves the rates it
learned when it ends (see `facecaption.fetch.web.throttle`): shard 2 starts where shard 1
ended. Two queries per shard, whatever the number of hosts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine


class HostRateStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self, hosts: Iterable[str]) -> dict[str, float]:
        """The learned rate of each of `hosts` that has one."""
        wanted = sorted(set(hosts))
        if not wanted:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT host, rate FROM host_rates WHERE host = ANY(:hosts)"),
                {"hosts": wanted},
            )
            return {row.host: float(row.rate) for row in rows}

    def save(self, rates: dict[str, float]) -> None:
        """Keep `rates` (host -> requests/s) in place of what each host had."""
        kept = {host: rate for host, rate in rates.items() if rate > 0}
        if not kept:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO host_rates (host, rate)"
                    " SELECT key, CAST(value AS double precision)"
                    " FROM jsonb_each_text(CAST(:rates AS jsonb))"
                    " ON CONFLICT (host) DO UPDATE SET rate = EXCLUDED.rate, updated_at = now()"
                ),
                {"rates": json.dumps(kept)},
            )
