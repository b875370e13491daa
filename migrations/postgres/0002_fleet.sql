-- Fleet status: one row per sidecar, written by the control-plane replica it is connected
-- to. A row is only overwritten by a connection at least as recent (`connected_since`), so a
-- late write from a replica the sidecar has left never hides where it is now.
CREATE TABLE sidecars (
    sidecar_id          TEXT COLLATE "C" PRIMARY KEY,
    services            TEXT    NOT NULL,
    version             TEXT    NOT NULL,
    host                TEXT    NOT NULL,
    control_plane       TEXT    NOT NULL,
    connected_since     BIGINT NOT NULL,
    last_seen           BIGINT NOT NULL,
    last_sent_revision  BIGINT NOT NULL,
    last_acked_revision BIGINT NOT NULL,
    state               TEXT    NOT NULL,
    nack_error          TEXT    NOT NULL,
    disconnected_at     BIGINT
);
CREATE INDEX sidecars_by_state ON sidecars (state, sidecar_id);
