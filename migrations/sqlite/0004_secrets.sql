-- Keys the control plane makes for itself, shared by every replica on the database: today
-- the key that signs page tokens. The first replica to start inserts it; the others read it.
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
