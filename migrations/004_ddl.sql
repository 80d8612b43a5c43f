-- undo: DDL on the record. Event triggers (made by init, superuser only) send every DDL command
-- on an audited schema or an audited table into the stream, with the session's attribution,
-- signed like a tag, in the command's own transaction (a transactional message, prefix
-- undo.ddl). They also say what makes capture of a table incomplete, which capture records as
-- a gap of that table:
--   state:   after DDL concerning an audited table, what is wrong with it now
--            (undo.table_problems: unlogged, replica identity not full, the tag trigger not
--            undo's, a table under it not audited); a problem gone closes its open gap;
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

-- What makes capture of an audited table incomplete now (empty: nothing), as a JSON list:
-- undo.table_problems (001), the one definition.
CREATE OR REPLACE FUNCTION undo.capture_problems(rel oid) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(jsonb_agg(p.problem ORDER BY p.code, p.problem), '[]')
      FROM undo.table_problems(ARRAY[rel]) p
$fn$;

-- The table a DDL command's object belongs to: a table's own OID; an index's, a trigger's, a
-- rule's, a policy's, a constraint's or a default's table (NULL for anything else).
CREATE OR REPLACE FUNCTION undo.ddl_relation(cls oid, obj oid) RETURNS oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE cls
        WHEN 'pg_class'::regclass THEN
            coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = obj), obj)
        WHEN 'pg_trigger'::regclass THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = obj)
        WHEN 'pg_rewrite'::regclass THEN (SELECT r.ev_class FROM pg_rewrite r WHERE r.oid = obj)
        WHEN 'pg_policy'::regclass THEN (SELECT p.polrelid FROM pg_policy p WHERE p.oid = obj)
        WHEN 'pg_constraint'::regclass THEN
            (SELECT nullif(k.conrelid, 0) FROM pg_constraint k WHERE k.oid = obj)
        WHEN 'pg_attrdef'::regclass THEN (SELECT a.adrelid FROM pg_attrdef a WHERE a.oid = obj)
    END
$fn$;

-- The audited tables a DDL command on this table concerns: the table, and those it is under.
CREATE OR REPLACE FUNCTION undo.audited_lineage(rel oid) RETURNS oid[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT ARRAY(SELECT a.relid FROM undo.audited a
                  WHERE a.relid = rel OR a.relid IN (SELECT undo.ancestors(rel))
                  ORDER BY a.relid)
$fn$;

-- The audited tables whose last state sent had a problem: their state is sent again after any
-- DDL, so that the DDL that puts one right closes its gap whatever its object (NO INHERIT or
-- DROP of a table under it that could not be audited: after those, nothing relates it to the
-- audited table any more).
CREATE TABLE IF NOT EXISTS undo.troubled (relid oid PRIMARY KEY);
REVOKE ALL ON undo.troubled FROM PUBLIC;

-- Every DDL command on an audited schema or an audited table (also CREATE TRIGGER, CREATE and
-- DROP RULE, policies: their objects have no schema, they are related to their table; and
-- INHERIT, PARTITION OF: a table of any schema put under an audited one) is recorded, and the
-- state of each audited table it concerns after it is sent: what undo.table_problems finds
-- then (capture opens a gap for each problem, closes a table's gaps that are gone). A table put
-- under an audited one is prepared on the spot (audit_table); one that cannot be (unlogged,
-- temporary, foreign) is a problem of the audited table above it.
CREATE OR REPLACE FUNCTION undo.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    schemas text[] := (SELECT c.schemas FROM undo.config c);
    commands jsonb := '[]';
    states jsonb := '[]';
    tables oid[] := '{}';  -- audited tables the DDL concerns
    above oid[];
    r record;
    u record;
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
        FOR r IN SELECT d.*, undo.ddl_relation(d.classid, d.objid) AS rel
                   FROM pg_event_trigger_ddl_commands() d
                  WHERE NOT d.in_extension LOOP
            IF r.object_type = 'table' AND r.schema_name = ANY (schemas)
               AND NOT EXISTS (SELECT 1 FROM undo.audited WHERE relid = r.objid) THEN
                PERFORM undo.audit_table(r.objid::regclass);  -- created, or moved in
            END IF;
            above := undo.audited_lineage(r.rel);
            -- a table put under an audited one (INHERIT, PARTITION OF, ATTACH PARTITION)
            PERFORM undo.audit_table(x::regclass)
               FROM unnest(above) a, undo.descendants(a) x
              WHERE NOT EXISTS (SELECT 1 FROM undo.audited WHERE relid = x);
            IF r.schema_name = ANY (schemas) OR above <> '{}' THEN
                commands := commands || jsonb_build_object('command', r.command_tag,
                                'object_type', r.object_type, 'object', r.object_identity,
                                'oid', r.objid);
                tables := tables || above;
            END IF;
            -- an enum's labels renamed (ALTER TYPE ... RENAME VALUE, in any schema): the values
            -- of every audited column of that type (or an array of it) change in place, with no
            -- row change in the stream
            IF r.command_tag = 'ALTER TYPE' AND r.object_type = 'type' THEN
                FOR u IN SELECT DISTINCT c.oid, format('%I.%I', n.nspname, c.relname) AS ident
                           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                           JOIN pg_namespace n ON n.oid = c.relnamespace
                           JOIN pg_type t ON t.oid = r.objid AND t.typtype = 'e'
                          WHERE a.atttypid IN (t.oid, t.typarray) AND NOT a.attisdropped
                            AND c.oid IN (SELECT relid FROM undo.audited) LOOP
                    commands := commands || jsonb_build_object('command', r.command_tag,
                                    'object_type', r.object_type, 'object', r.object_identity,
                                    'oid', r.objid);
                    states := states || jsonb_build_object('table', u.ident, 'oid', u.oid,
                                  'rewrite', true, 'problems', jsonb_build_array(
                                      'its enum type ' || r.object_identity || ' was altered:'
                                      || ' values may have changed without row changes in the'
                                      || ' stream'));
                END LOOP;
            END IF;
        END LOOP;
    ELSIF tg_event = 'sql_drop' THEN
        -- a trigger's, rule's, policy's or constraint's table, by the names of its address
        FOR r IN SELECT d.*, CASE WHEN d.object_type IN ('trigger', 'rule', 'policy',
                                                         'table constraint')
                                       AND cardinality(d.address_names) = 3
                                  THEN to_regclass(format('%I.%I', d.address_names[1],
                                                          d.address_names[2])) END AS rel
                   FROM pg_event_trigger_dropped_objects() d LOOP
            above := undo.audited_lineage(r.rel);
            IF r.original AND (r.schema_name = ANY (schemas) OR above <> '{}') THEN
                commands := commands || jsonb_build_object('command', tg_tag,
                                'object_type', r.object_type, 'object', r.object_identity,
                                'oid', r.objid);
            END IF;
            tables := tables || above;
        END LOOP;
    ELSIF tg_event = 'table_rewrite' THEN
        FOR r IN SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS ident FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = pg_event_trigger_table_rewrite_oid()
                    AND c.oid IN (SELECT relid FROM undo.audited) LOOP
            states := states || jsonb_build_object('table', r.ident, 'oid', r.oid, 'rewrite', true,
                          'problems', jsonb_build_array('rewritten by ' || tg_tag
                              || ': values may have changed without row changes in the stream'));
        END LOOP;
    END IF;
    IF tg_event <> 'table_rewrite' THEN
        tables := tables || ARRAY(SELECT t.relid FROM undo.troubled t);
        states := states || coalesce((
            SELECT jsonb_agg(jsonb_build_object('table', format('%I.%I', n.nspname, c.relname),
                                 'oid', c.oid, 'problems', undo.capture_problems(c.oid))
                             ORDER BY c.oid)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = ANY (tables)), '[]');
        DELETE FROM undo.troubled t WHERE t.relid = ANY (tables);
        INSERT INTO undo.troubled (relid)
        SELECT (x ->> 'oid')::oid FROM jsonb_array_elements(states) x
         WHERE x -> 'problems' <> '[]'
        ON CONFLICT DO NOTHING;
    END IF;
    PERFORM set_config('undo.in_ddl', '', true);
    IF commands <> '[]' OR states <> '[]' THEN
        PERFORM undo.emit_ddl(jsonb_build_object('ddl', commands, 'state', states));
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION undo.on_ddl() FROM PUBLIC;
