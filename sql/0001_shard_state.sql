-- Shard state for facecaption: sources, shards, per-(shard, stage) state, attempt history.

CREATE TABLE sources (
    source_id     text PRIMARY KEY,          -- sha256 of the file's bytes
    uri           text NOT NULL,             -- where it was last planned from
    name          text NOT NULL,
    size_bytes    bigint NOT NULL,
    num_rows      bigint NOT NULL,
    shard_size    integer NOT NULL CHECK (shard_size > 0),
    columns       jsonb NOT NULL,            -- {"url": "URL", "caption": "TEXT", "sample_id": ...}
    registered_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shards (
    shard_id    text PRIMARY KEY,            -- {source_id[:12]}_{row_start:09d}_{row_end:09d}
    source_id   text NOT NULL REFERENCES sources (source_id),
    shard_index integer NOT NULL,
    row_start   bigint NOT NULL,
    row_end     bigint NOT NULL CHECK (row_end > row_start),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_id, shard_index)
);

CREATE TABLE shard_stages (
    shard_id    text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    stage       text NOT NULL,
    status      text NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempt     integer NOT NULL DEFAULT 0,
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz,
    counts      jsonb NOT NULL DEFAULT '{}'::jsonb,
    artifacts   jsonb NOT NULL DEFAULT '{}'::jsonb,   -- {"name": {"uri", "sha256", "bytes"}}
    last_error  text,
    fingerprint text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard_id, stage)
);
CREATE INDEX shard_stages_stage_status ON shard_stages (stage, status);

-- One row per event of an attempt (started, done, failed, abandoned). Never updated.
CREATE TABLE stage_events (
    event_id    bigserial PRIMARY KEY,
    shard_id    text NOT NULL,
    stage       text NOT NULL,
    attempt     integer NOT NULL,
    event       text NOT NULL CHECK (event IN ('started', 'done', 'failed', 'abandoned')),
    worker      text,
    at          timestamptz NOT NULL DEFAULT now(),
    duration_s  double precision,
    counts      jsonb,
    artifacts   jsonb,
    error       text,
    fingerprint text
);
CREATE INDEX stage_events_shard_stage ON stage_events (shard_id, stage, attempt);

CREATE FUNCTION stage_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stage_events is append-only';
END $$;

CREATE TRIGGER stage_events_no_rewrite BEFORE UPDATE OR DELETE ON stage_events
    FOR EACH ROW EXECUTE FUNCTION stage_events_append_only();
