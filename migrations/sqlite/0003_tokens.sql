-- Access tokens, managed by the control plane itself. Only the SHA-256 of a token is kept;
-- `id` is the first 16 hex digits of that hash, the handle for listing and revoking.
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    services    TEXT    NOT NULL,
    secret_hash BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT    NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
);
