-- Scale to LAION-Face size: source versions (re-planning reads no data; a file changed in
-- place is refused), per-shard report statistics stored once by the export stage, and an
-- index of fetched images that takedowns are matched against without reading artifacts.

-- What the filesystem said about each planned file (size, mtime, ETag...) when its content
-- hash was last taken: an unchanged version is the same source without reading a byte.
CREATE TABLE source_files (
    uri        text PRIMARY KEY,
    source_id  text NOT NULL REFERENCES sources (source_id),
    size_bytes bigint NOT NULL,
    modified   text,                       -- mtime / Last-Modified, as the filesystem gives it
    etag       text,                       -- ETag / md5 / crc32c / generation, when given
    checked_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX source_files_source ON source_files (source_id);

-- Statistics a stage reports beyond its counts (histograms, sketches, quality samples), for
-- the dataset report: one row per (shard, stage), from its last finished attempt.
CREATE TABLE stage_stats (
    shard_id   text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    stage      text NOT NULL,
    attempt    integer NOT NULL,
    stats      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard_id, stage)
);

-- Every kept fetched row (ok or duplicate): its normalised URL and image sha256. Takedowns
-- are matched here. URLs can be longer than a btree entry allows: hash index.
CREATE TABLE fetched_images (
    shard_id text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    key      text NOT NULL,
    url      text NOT NULL,
    sha256   text NOT NULL,
    PRIMARY KEY (shard_id, key)
);
CREATE INDEX fetched_images_url ON fetched_images USING hash (url);
CREATE INDEX fetched_images_sha256 ON fetched_images (sha256);

-- Which fetch output (its fetch.parquet sha256) each shard's index rows describe, so that
-- shards fetched before this index existed are indexed once, and only those.
CREATE TABLE fetched_images_indexed (
    shard_id       text PRIMARY KEY REFERENCES shards (shard_id) ON DELETE CASCADE,
    parquet_sha256 text NOT NULL,
    indexed_at     timestamptz NOT NULL DEFAULT now()
);
