-- The request rate the fetch learned for each host (requests/s): where its adaptive rate
-- ended after the host last pushed back (429/503, timeouts, slow answers). A shard's fetch
-- starts each host it meets here from this rate instead of discovering it again; it saves
-- what it learned when it ends (the last shard to end wins).
CREATE TABLE host_rates (
    host       text PRIMARY KEY,
    rate       double precision NOT NULL CHECK (rate > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
