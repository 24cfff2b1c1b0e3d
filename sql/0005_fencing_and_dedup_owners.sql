-- What each stage ran on, cross-shard dedup by a rule instead of by arrival, and fenced release
-- publishes.

-- The inputs a done stage's fingerprint covers (its input stage's checksums, settings, model
-- identities, ...), as JSON: a stage that reads several earlier stages together checks that
-- each ran on the outputs the one before it holds now, and a re-run may keep the final parts
-- of outputs whose inputs changed only across shards.
ALTER TABLE shard_stages ADD COLUMN inputs jsonb;

-- Every (shard, key) holding an image's bytes, one key per shard (its first row with them).
-- `image_hashes` keeps the owner of each sha256: the smallest (shard_id, key) of its holders,
-- whichever shard fetched first. Its rows are also the per-image locks that registrations
-- take in sha256 order.
CREATE TABLE image_holders (
    sha256   text NOT NULL,
    shard_id text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    key      text NOT NULL,
    PRIMARY KEY (sha256, shard_id)
);
CREATE INDEX image_holders_shard ON image_holders (shard_id);
INSERT INTO image_holders (sha256, shard_id, key) SELECT sha256, shard_id, key FROM image_hashes;

-- Raised whenever the owner of an image this shard holds changes: its fetch outputs name the
-- old owner, so its fetch fingerprint covers this number and the shard goes stale.
ALTER TABLE shards ADD COLUMN dedup_epoch bigint NOT NULL DEFAULT 0;

-- One row per release publish, in order. Only the newest may rename files into release/
-- (fencing: a publish whose lock was lost cannot overwrite a newer one's files), and the
-- newest removes the temporary files that older ones left there.
CREATE TABLE release_attempts (
    attempt    bigserial PRIMARY KEY,
    worker     text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
