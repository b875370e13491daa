-- Access tokens, managed by the control plane itself. Only the SHA-256 of a token is kept;
-- `id` is the first 16 hex digits of that hash, the handle for listing and revoking.
CREATE TABLE tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    services    TEXT    NOT NULL,
    secret_hash BYTEA    NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT    NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);
