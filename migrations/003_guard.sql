-- undo: guards, application names (glob patterns) that may not write to audited tables.
-- The check runs in undo.tag() (001), once per writing transaction. A seatbelt against
-- accidents, not a security boundary: a session chooses its own application_name.
-- Idempotent, like 001.

-- A glob (* any run, ? one character) as a LIKE pattern.
CREATE OR REPLACE FUNCTION undo.glob_like(glob text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT replace(replace(replace(replace(replace(glob, '\', '\\'), '%', '\%'), '_', '\_'),
                   '*', '%'), '?', '_')
$fn$;

-- Changed only by the owner (the role that ran `undo init`); read by every writer's trigger.
CREATE TABLE IF NOT EXISTS undo.guards (
    pattern text PRIMARY KEY,
    reason text,
    like_pattern text NOT NULL GENERATED ALWAYS AS (undo.glob_like(pattern)) STORED,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.statement_timestamp(),
    created_by name NOT NULL DEFAULT session_user
);
REVOKE ALL ON undo.guards FROM PUBLIC;
GRANT SELECT ON undo.guards TO PUBLIC;
