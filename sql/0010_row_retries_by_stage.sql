-- The per-row retry budget across runs, for every stage that has one (fetch rows, caption
-- faces), in place of 0006's fetch-only table.

-- Each piece of a stage's work that failed transiently and that a later run may try again:
-- per (shard, stage, key) how many runs have tried it, when the last one did, and when the
-- next one may (the pause doubles with each run). The key is what the stage names its rows
-- by: the source row number for fetch, the face id for caption. A key leaves when its row
-- gets a final status, `gave_up` included (the stage's artifact keeps the last error).
CREATE TABLE row_retries (
    shard_id text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    stage    text NOT NULL,
    key      text NOT NULL,
    runs     integer NOT NULL,
    tried_at timestamptz NOT NULL,
    due_at   timestamptz NOT NULL,
    PRIMARY KEY (shard_id, stage, key)
);

INSERT INTO row_retries (shard_id, stage, key, runs, tried_at, due_at)
SELECT shard_id, 'fetch', row::text, runs, tried_at, due_at FROM fetch_row_retries;

DROP TABLE fetch_row_retries;
