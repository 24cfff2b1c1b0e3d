-- Takedown requests and their audit trail, and the record of every release export.

-- One row per request: what was asked, when, and (once applied) when and what it changed.
CREATE TABLE takedown_requests (
    request_id   bigserial PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now(),
    requested_by text,
    reason       text,
    urls         jsonb NOT NULL DEFAULT '[]'::jsonb,
    sha256s      jsonb NOT NULL DEFAULT '[]'::jsonb,
    applied_at   timestamptz,
    matched      jsonb,                  -- {"rows": n, "shards": [...], "sha256s": [...]}
    outputs      jsonb                   -- release files written and removed when applied
);

-- The URLs and image sha256s under takedown, for lookups by value (fetch skips them).
CREATE TABLE takedown_items (
    kind       text NOT NULL CHECK (kind IN ('url', 'sha256')),
    value      text NOT NULL,
    request_id bigint NOT NULL REFERENCES takedown_requests (request_id),
    PRIMARY KEY (kind, value, request_id)
);
CREATE INDEX takedown_items_value ON takedown_items (value);

-- Source rows found to be under a takedown (by URL, by sha256, or by the sha256 of a URL's
-- image), per shard: the export stage's fingerprint covers them, so affected shards re-export.
CREATE TABLE takedown_matches (
    request_id bigint NOT NULL REFERENCES takedown_requests (request_id),
    shard_id   text NOT NULL REFERENCES shards (shard_id) ON DELETE CASCADE,
    key        text NOT NULL,
    url        text,
    sha256     text,
    PRIMARY KEY (request_id, shard_id, key)
);
CREATE INDEX takedown_matches_shard ON takedown_matches (shard_id);

-- One row per release export: what it was built from and which files it changed.
CREATE TABLE exports (
    export_id       bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    release_uri     text NOT NULL,
    manifest_sha256 text NOT NULL,
    rows            bigint NOT NULL,
    files_written   jsonb NOT NULL,
    files_removed   jsonb NOT NULL,
    files_kept      jsonb NOT NULL,
    built_from      jsonb NOT NULL,      -- {shard_id: export fingerprint}
    takedown_ids    jsonb NOT NULL       -- requests whose matches were excluded
);
