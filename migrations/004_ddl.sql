-- undo: DDL on the record. Event triggers (made by init, superuser only) send every DDL command
-- on an audited schema into the stream, with the session's attribution, signed like a tag, in
-- the command's own transaction (a transactional message, prefix undo.ddl). They also say what
-- makes capture of a table incomplete, which capture records as a gap of that table:
--   state:   after an ALTER TABLE of an audited table, what is wrong with it now (unlogged:
--            its changes are not in the WAL; replica identity not full: no old rows; the tag
--            trigger not ENABLE ALWAYS: its writes are untagged); an empty list closes the
--            table's open gaps;
--   rewrite: the table is rewritten (ALTER COLUMN ... TYPE ... USING, SET LOGGED/UNLOGGED,
--            ...): values may change without any row change in the stream.
-- A table moved into an audited schema (ALTER TABLE ... SET SCHEMA) is prepared on the spot,
-- as a created one is. Each command carries its object's OID: with wal2json, which names
-- tables, capture learns from a DROP that a table it looked up by that name was another one.
-- Idempotent, like 001.

-- One DDL record: signed by undo's owner (undo.sign, 001) over the session part (from the
-- server, undo.session_fields), application_name, the xid, the statement and what the event
-- trigger found; never from a setting the session can write.
CREATE OR REPLACE FUNCTION undo.emit_ddl(body jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pg_logical_emit_message(true, 'undo.ddl', undo.sign('undo.ddl', concat(
        '{', undo.session_fields(), ',', substr((jsonb_build_object(
            'application_name', current_setting('application_name'),
            'xid', pg_current_xact_id()::text::bigint,
            'statement', current_query()) || body)::text, 2))));
END
$fn$;
REVOKE ALL ON FUNCTION undo.emit_ddl(jsonb) FROM PUBLIC;

-- What makes capture of an audited table incomplete now (empty: nothing).
CREATE OR REPLACE FUNCTION undo.capture_problems(rel oid) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(jsonb_agg(p), '[]') FROM (
        SELECT 'unlogged: its changes are not in the WAL' AS p
          FROM pg_class WHERE oid = rel AND relpersistence <> 'p'
        UNION ALL
        SELECT 'replica identity is not FULL: updates and deletes lose their old rows'
          FROM pg_class WHERE oid = rel AND relreplident <> 'f'
        UNION ALL
        SELECT 'the undo_tag trigger is disabled or missing: writes are untagged'
         WHERE NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'undo_tag'
                            AND tgenabled = 'A')) x
$fn$;

CREATE OR REPLACE FUNCTION undo.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    schemas text[] := (SELECT c.schemas FROM undo.config c);
    commands jsonb := '[]';
    states jsonb := '[]';
    r record;
    -- marks DDL that undo itself runs from here (audit_table) while it runs: a value no
    -- session can set on its own to hide its DDL (it needs the key), and only for this
    -- transaction
    inside text := encode(sha256((SELECT s.key FROM undo.secret s)
                                 || convert_to(pg_current_xact_id()::text, 'UTF8')), 'hex');
BEGIN
    IF current_setting('undo.in_ddl', true) = inside THEN
        RETURN;
    END IF;
    PERFORM set_config('undo.in_ddl', inside, true);
    IF tg_event = 'ddl_command_end' THEN
        FOR r IN SELECT d.* FROM pg_event_trigger_ddl_commands() d
                  WHERE (d.schema_name = ANY (schemas) OR d.objid IN (SELECT relid FROM undo.audited))
                    AND NOT d.in_extension LOOP
            commands := commands || jsonb_build_object('command', r.command_tag,
                            'object_type', r.object_type, 'object', r.object_identity,
                            'oid', r.objid);
            IF r.object_type = 'table' THEN
                IF r.schema_name = ANY (schemas)
                   AND NOT EXISTS (SELECT 1 FROM undo.audited WHERE relid = r.objid) THEN
                    PERFORM undo.audit_table(r.objid::regclass);  -- created, or moved in
                END IF;
                IF r.command_tag = 'ALTER TABLE' AND EXISTS (SELECT 1 FROM undo.audited
                                                             WHERE relid = r.objid) THEN
                    states := states || jsonb_build_object('table', r.object_identity,
                                  'problems', undo.capture_problems(r.objid));
                END IF;
            END IF;
        END LOOP;
    ELSIF tg_event = 'sql_drop' THEN
        FOR r IN SELECT d.* FROM pg_event_trigger_dropped_objects() d
                  WHERE d.schema_name = ANY (schemas) AND d.original LOOP
            commands := commands || jsonb_build_object('command', tg_tag,
                            'object_type', r.object_type, 'object', r.object_identity,
                            'oid', r.objid);
        END LOOP;
    ELSIF tg_event = 'table_rewrite' THEN
        FOR r IN SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS ident FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = pg_event_trigger_table_rewrite_oid()
                    AND c.oid IN (SELECT relid FROM undo.audited) LOOP
            states := states || jsonb_build_object('table', r.ident, 'rewrite', true,
                          'problems', jsonb_build_array('rewritten by ' || tg_tag
                              || ': values may have changed without row changes in the stream'));
        END LOOP;
    END IF;
    PERFORM set_config('undo.in_ddl', '', true);
    IF commands <> '[]' OR states <> '[]' THEN
        PERFORM undo.emit_ddl(jsonb_build_object('ddl', commands, 'state', states));
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION undo.on_ddl() FROM PUBLIC;
