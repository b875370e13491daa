-- Origin sets: named lists of allowed origins that policies reference as `set:NAME`.
--
-- A set write is one global revision, like a policy write: it takes the `head` row, writes
-- the set, its revision and its audit event in one transaction. `origin_set_refs` says which
-- policies reference which sets; the write of a policy keeps its rows current, so a set
-- write finds its referrers, and a set in use cannot be deleted, without reading every
-- policy.

CREATE TABLE origin_sets (
    name         TEXT COLLATE "C" PRIMARY KEY,
    spec         TEXT    NOT NULL,
    revision     BIGINT NOT NULL,
    create_time  BIGINT NOT NULL,
    update_time  BIGINT NOT NULL,
    update_actor TEXT    NOT NULL
);

-- Every committed set change; `spec` is NULL for a deletion. `affected` lists the services
-- whose effective policy changed, comma-separated.
CREATE TABLE origin_set_revisions (
    revision       BIGINT PRIMARY KEY,
    name           TEXT    NOT NULL,
    spec           TEXT,
    time           BIGINT NOT NULL,
    actor          TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    audit_sequence BIGINT NOT NULL,
    affected       TEXT    NOT NULL
);
CREATE INDEX origin_set_revisions_by_name ON origin_set_revisions (name, revision);

CREATE TABLE origin_set_refs (
    set_name TEXT COLLATE "C" NOT NULL,
    service  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (set_name, service)
);
CREATE INDEX origin_set_refs_by_service ON origin_set_refs (service);

-- An origin set write names the set, and the services it affected, in its audit event. Older
-- events keep both empty, and their hashes are computed as before.
ALTER TABLE audit_events ADD COLUMN origin_set TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_events ADD COLUMN affected_services TEXT NOT NULL DEFAULT '';
