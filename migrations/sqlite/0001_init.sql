-- Corsair control-plane schema (SQLite).
--
-- `head` is the single row every write transaction updates first: it holds the global
-- revision counter and the head of the audit chain, so writers are serialized and the chain
-- never forks. Times are Unix microseconds; audit times never decrease with sequence.

CREATE TABLE head (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    revision      INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    last_hash     BLOB    NOT NULL,
    last_time     INTEGER NOT NULL
);
INSERT INTO head (id, revision, last_sequence, last_hash, last_time)
VALUES (1, 0, 0, zeroblob(32), 0);

-- The live policy of each service.
CREATE TABLE policies (
    service      TEXT    PRIMARY KEY,
    spec         TEXT    NOT NULL,
    revision     INTEGER NOT NULL,
    create_time  INTEGER NOT NULL,
    update_time  INTEGER NOT NULL,
    update_actor TEXT    NOT NULL
);

-- Every committed change; `spec` is NULL for a deletion.
CREATE TABLE policy_revisions (
    revision       INTEGER PRIMARY KEY,
    service        TEXT    NOT NULL,
    spec           TEXT,
    time           INTEGER NOT NULL,
    actor          TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    audit_sequence INTEGER NOT NULL
);
CREATE INDEX policy_revisions_by_service ON policy_revisions (service, revision);

CREATE TABLE audit_events (
    sequence       INTEGER PRIMARY KEY,
    time           INTEGER NOT NULL,
    actor          TEXT    NOT NULL,
    method         TEXT    NOT NULL,
    service        TEXT    NOT NULL,
    revision       INTEGER NOT NULL,
    before_spec    TEXT,
    after_spec     TEXT,
    changed_fields TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    peer           TEXT    NOT NULL,
    outcome        TEXT    NOT NULL,
    error          TEXT    NOT NULL,
    prev_hash      BLOB    NOT NULL,
    hash           BLOB    NOT NULL
);
CREATE INDEX audit_by_time    ON audit_events (time, sequence);
CREATE INDEX audit_by_service ON audit_events (service, time, sequence);
CREATE INDEX audit_by_actor   ON audit_events (actor, time, sequence);
CREATE INDEX audit_by_method  ON audit_events (method, time, sequence);
