-- A retry budget per fetch row across runs.

-- Each fetch row that failed transiently (timeout, connection refused, DNS failure, 5xx, 429,
-- ...) and that a later run may fetch again: how many runs have tried it, when the last one
-- did, and when the next one may (the pause doubles with each run). A row leaves when it
-- gets a final status, `gave_up` included (its row in fetch.parquet keeps the last error).
CREATE TABLE fetch_row_retries (
    shard_id text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    row      bigint NOT NULL,
    runs     integer NOT NULL,
    tried_at timestamptz NOT NULL,
    due_at   timestamptz NOT NULL,
    PRIMARY KEY (shard_id, row)
);

-- When a done stage's `retryable` work is next due (NULL: at once). Work selection reads it
-- with the stage row, so a shard whose only unfinished rows are still pausing is not work.
ALTER TABLE shard_stages ADD COLUMN retry_at timestamptz;
