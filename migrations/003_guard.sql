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

-- The check without a query: undo.guarded(application_name) is the first guard (by pattern)
-- whose glob the name matches, or NULL; generated from undo.guards whenever they change (the
-- trigger below), as one inlinable SQL expression: a constant NULL with no guard, a CASE of the
-- patterns otherwise. undo.tag() inlines it into its own plan, which PostgreSQL re-plans when
-- the function is replaced: a session opened before a guard is refused after it. Inlined with
-- the caller's search_path, so every operator and type in it is qualified.
CREATE OR REPLACE FUNCTION undo.make_guarded() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    body text;
BEGIN
    SELECT 'SELECT CASE' || string_agg(format(' WHEN app OPERATOR(pg_catalog.~~) %L::pg_catalog.text'
                                              ' THEN %L::pg_catalog.text', like_pattern, pattern),
                                       '' ORDER BY pattern) || ' END'
      INTO body FROM undo.guards;
    EXECUTE format('CREATE OR REPLACE FUNCTION undo.guarded(app pg_catalog.text)'
                   ' RETURNS pg_catalog.text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
                   coalesce(body, 'SELECT NULL::pg_catalog.text'));
    REVOKE ALL ON FUNCTION undo.guarded(text) FROM PUBLIC;
END
$fn$;
REVOKE ALL ON FUNCTION undo.make_guarded() FROM PUBLIC;
SELECT undo.make_guarded();

CREATE OR REPLACE FUNCTION undo.guards_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM undo.make_guarded();
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION undo.guards_changed() FROM PUBLIC;
CREATE OR REPLACE TRIGGER guards_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON undo.guards FOR EACH STATEMENT EXECUTE FUNCTION undo.guards_changed();

-- A write a guard refused: recorded by a non-transactional message (prefix undo.guard: it
-- outlives the rollback), signed like every message of undo's, with the session part, the
-- application, the xid, the statement, the guard, the time (the server's clock) and a random
-- nonce: capture stores a nonce once, so a refusal emitted again is never a second trusted one.
-- Then the transaction fails. Called by undo.tag(), as undo's owner.
CREATE OR REPLACE FUNCTION undo.refuse(g text, rel oid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    why text := (SELECT gd.reason FROM undo.guards gd WHERE gd.pattern = g);
    app text := current_setting('application_name');
BEGIN
    PERFORM pg_logical_emit_message(false, 'undo.guard', undo.sign('undo.guard', concat(
        '{', undo.session_fields(),
        ',"application_name":', to_json(app),
        ',"xid":', pg_current_xact_id(),
        ',"statement":', coalesce(to_json(current_query())::text, 'null'),
        ',"guard":', to_json(g),
        ',"reason":', coalesce(to_json(why)::text, 'null'),
        ',"at":', to_json(to_char(clock_timestamp() AT TIME ZONE 'UTC',
                                  'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
        ',"nonce":', to_json(gen_random_uuid()::text), '}')));
    RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
        MESSAGE = format('undo guard %s: application %s may not write to %s%s', g, app,
                         rel::regclass, coalesce(' (' || why || ')', '')),
        HINT = 'nothing this transaction did is kept; if the write is intended, remove the'
               ' guard: undo guard remove ' || g;
END
$fn$;
REVOKE ALL ON FUNCTION undo.refuse(text, oid) FROM PUBLIC;
