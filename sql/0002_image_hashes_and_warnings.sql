-- Cross-shard dedup: the first (shard, key) that kept each image's bytes.
CREATE TABLE image_hashes (
    sha256     text PRIMARY KEY,
    shard_id   text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    key        text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX image_hashes_shard ON image_hashes (shard_id);

-- Warnings a stage puts in its shard summary (e.g. a high error rate).
ALTER TABLE shard_stages ADD COLUMN warnings jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE stage_events ADD COLUMN warnings jsonb;
