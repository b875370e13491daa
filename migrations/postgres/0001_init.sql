-- Corsair control-plane schema (PostgreSQL).
--
-- `head` is the single row every write transaction updates first: it holds the global
-- revision counter and the head of the audit chain, so writers are serialized and the chain
-- never forks. Times are Unix microseconds; audit times never decrease with sequence.

CREATE TABLE head (
    id            SMALLINT PRIMARY KEY CHECK (id = 1),
    revision      BIGINT NOT NULL,
    last_sequence BIGINT NOT NULL,
    last_hash     BYTEA    NOT NULL,
    last_time     BIGINT NOT NULL
);
INSERT INTO head (id, revision, last_sequence, last_hash, last_time)
VALUES (1, 0, 0, decode(repeat($$00$$, 32), $$hex$$), 0);

-- The live policy of each service.
CREATE TABLE policies (
    service      TEXT COLLATE "C" PRIMARY KEY,
    spec         TEXT    NOT NULL,
    revision     BIGINT NOT NULL,
    create_time  BIGINT NOT NULL,
    update_time  BIGINT NOT NULL,
    update_actor TEXT    NOT NULL
);

-- Every committed change; `spec` is NULL for a deletion.
CREATE TABLE policy_revisions (
    revision       BIGINT PRIMARY KEY,
    service        TEXT    NOT NULL,
    spec           TEXT,
    time           BIGINT NOT NULL,
    actor          TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    audit_sequence BIGINT NOT NULL
);
CREATE INDEX policy_revisions_by_service ON policy_revisions (service, revision);

CREATE TABLE audit_events (
    sequence       BIGINT PRIMARY KEY,
    time           BIGINT NOT NULL,
    actor          TEXT    NOT NULL,
    method         TEXT    NOT NULL,
    service        TEXT    NOT NULL,
    revision       BIGINT NOT NULL,
    before_spec    TEXT,
    after_spec     TEXT,
    changed_fields TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    peer           TEXT    NOT NULL,
    outcome        TEXT    NOT NULL,
    error          TEXT    NOT NULL,
    prev_hash      BYTEA    NOT NULL,
    hash           BYTEA    NOT NULL
);
CREATE INDEX audit_by_time    ON audit_events (time, sequence);
CREATE INDEX audit_by_service ON audit_events (service, time, sequence);
CREATE INDEX audit_by_actor   ON audit_events (actor, time, sequence);
CREATE INDEX audit_by_method  ON audit_events (method, time, sequence);
