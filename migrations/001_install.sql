-- undo: objects installed in the source database by `undo init`.
-- Idempotent: every statement may run again on a database that already has them.
-- Everything lives in the schema "undo"; triggers are named undo_tag.

CREATE SCHEMA IF NOT EXISTS undo;
GRANT USAGE ON SCHEMA undo TO PUBLIC;

-- The key that signs tags. Only its owner (the role that ran `undo init`) may read it,
-- so a role that calls pg_logical_emit_message itself cannot produce a trusted tag.
CREATE TABLE IF NOT EXISTS undo.secret (
    single boolean PRIMARY KEY DEFAULT true CHECK (single),
    key bytea NOT NULL
);
REVOKE ALL ON undo.secret FROM PUBLIC;
INSERT INTO undo.secret (key)
SELECT pg_catalog.decode(
    pg_catalog.replace(pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, '-', ''),
    'hex')
ON CONFLICT DO NOTHING;
-- HMAC-SHA256 (RFC 2104) from the built-in sha256, no extension: a key zero-padded to the
-- 64-byte block, XOR 0x36 (inner pad) and XOR 0x5c (outer pad); HMAC(k, m) =
-- sha256(opad || sha256(ipad || m)). The master key's pads are computed once.
CREATE OR REPLACE FUNCTION undo.hmac_pad(k bytea, x integer) RETURNS bytea
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT decode(string_agg(lpad(to_hex(get_byte(b, n) # x), 2, '0'), '' ORDER BY n), 'hex')
      FROM (SELECT k || decode(repeat('00', 64 - length(k)), 'hex') AS b) p,
           generate_series(0, 63) n
$fn$;
ALTER TABLE undo.secret ADD COLUMN IF NOT EXISTS ipad bytea;
ALTER TABLE undo.secret ADD COLUMN IF NOT EXISTS opad bytea;
UPDATE undo.secret SET ipad = undo.hmac_pad(key, 54), opad = undo.hmac_pad(key, 92)
 WHERE ipad IS NULL;

-- What is audited: schemas whose new tables the event trigger picks up, and the publication.
CREATE TABLE IF NOT EXISTS undo.config (
    single boolean PRIMARY KEY DEFAULT true CHECK (single),
    schemas text[] NOT NULL DEFAULT '{}',
    publication text
);
REVOKE ALL ON undo.config FROM PUBLIC;
GRANT SELECT ON undo.config TO PUBLIC;

-- One row per publication (pgoutput slot) made by init, with the schemas it audits: several
-- slots and stores on one database each keep their own (config.schemas is their union, for
-- the event trigger). config.publication held the only one before.
CREATE TABLE IF NOT EXISTS undo.publications (
    name text PRIMARY KEY,
    schemas text[] NOT NULL DEFAULT '{}'
);
REVOKE ALL ON undo.publications FROM PUBLIC;
GRANT SELECT ON undo.publications TO PUBLIC;
INSERT INTO undo.publications (name, schemas)
SELECT publication, schemas FROM undo.config WHERE publication IS NOT NULL
ON CONFLICT DO NOTHING;

-- One row per slot made by init (either decoder), so that uninstalling one slot knows whether
-- another store still needs the triggers, the key and this schema. Before it, a pgoutput slot
-- was known by its publication (named after the slot).
CREATE TABLE IF NOT EXISTS undo.slots (
    name text PRIMARY KEY,
    decoder text NOT NULL
);
REVOKE ALL ON undo.slots FROM PUBLIC;
GRANT SELECT ON undo.slots TO PUBLIC;
INSERT INTO undo.slots (name, decoder) SELECT name, 'pgoutput' FROM undo.publications
ON CONFLICT DO NOTHING;

-- Tables prepared by undo, with the replica identity they had before (restored on uninstall).
CREATE TABLE IF NOT EXISTS undo.audited (
    relid oid PRIMARY KEY,
    prior_identity "char" NOT NULL
);
REVOKE ALL ON undo.audited FROM PUBLIC;
GRANT SELECT ON undo.audited TO PUBLIC;

-- The session part of every tag: id (the %c of log_line_prefix), pid, start, user, client, all
-- read from the server, never from the caller; and the session's own signing key, HMAC(master
-- key, session part), as its two pads. Computed once per session (SECURITY DEFINER, to read the
-- master key; search_path pinned) and cached in the setting undo.session as hex(inner pad) ||
-- hex(outer pad) || session JSON. The session can read and write that setting, so it can sign
-- tags of its own session only: capture derives the key from the session part it is shown,
-- and a session part whose key the writer did not have (another session's) fails the HMAC.
CREATE OR REPLACE FUNCTION undo.session_tag() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    sec record;
    frag text;
    k bytea;
BEGIN
    SELECT s.ipad, s.opad INTO sec FROM undo.secret s;
    SELECT json_build_object(
               'session_id', to_hex(trunc(extract(epoch FROM a.backend_start))::bigint) || '.' || to_hex(a.pid),
               'pid', a.pid,
               'backend_start', a.backend_start,
               'user', session_user,
               'client_addr', host(a.client_addr),
               'client_port', a.client_port)::text
      INTO frag
      FROM pg_stat_get_activity(pg_backend_pid()) a;
    k := sha256(sec.opad || sha256(sec.ipad || convert_to(frag, 'UTF8')));
    frag := encode(undo.hmac_pad(k, 54), 'hex') || encode(undo.hmac_pad(k, 92), 'hex') || frag;
    PERFORM set_config('undo.session', frag, false);
    RETURN frag;
END
$fn$;
REVOKE ALL ON FUNCTION undo.session_tag() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION undo.session_tag() TO PUBLIC;
DROP FUNCTION IF EXISTS undo.signed_tag();

-- What an undo in progress says it undoes (undo.undoing, set by `undo session --apply`) as JSON
-- text; a value that is not JSON becomes a JSON string, so a tag always parses. STRICT: not
-- called at all when the setting is empty, as it is for every other transaction.
CREATE OR REPLACE FUNCTION undo.undoing_json(u text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN u::jsonb::text;
EXCEPTION WHEN others THEN
    RETURN to_json(u)::text;
END
$fn$;

-- The statement trigger's function: runs as the caller and emits one transactional message per
-- transaction: HMAC || session part || newline || transaction part (application_name, the full
-- 64-bit xid, the top-level statement and, for an undo, what it undid), the HMAC under the
-- session's key. The xid binds it to its transaction: capture refuses a tag whose xid is not
-- the transaction's (replayed). undo.tagged is transaction-local, so it is rolled back with a
-- savepoint that held the tag, and the tag is emitted again. A session that sets undo.tagged
-- itself erases its tag: capture records its writes as untrusted, reason missing.
-- Cost, per transaction (bench/capture, README): every expression of a PL/pgSQL function is
-- prepared again in each transaction, so the function is kept to few of them; and the trigger
-- has no WHEN clause, which PostgreSQL parses again for every statement: the first check
-- below does its job for less.
CREATE OR REPLACE FUNCTION undo.tag() RETURNS trigger
LANGUAGE plpgsql
AS $fn$
DECLARE
    s text;
    msg text;
    g record;
BEGIN
    IF pg_catalog.current_setting('undo.tagged', true) = '1' THEN
        RETURN NULL;  -- tagged already by an earlier statement of this transaction
    END IF;
    s := pg_catalog.current_setting('undo.session', true);
    IF s IS NULL OR pg_catalog.substr(s, 257, 1) IS DISTINCT FROM '{' THEN  -- none yet, or older
        s := undo.session_tag();
    END IF;
    -- A guarded application may not write (003_guard.sql): the transaction fails, and the
    -- attempt is recorded by a non-transactional message (it outlives the rollback), signed
    -- as a tag is, with the guard and the time.
    SELECT gd.pattern, gd.reason INTO g FROM undo.guards gd
     WHERE pg_catalog.current_setting('application_name') LIKE gd.like_pattern
     ORDER BY gd.pattern LIMIT 1;
    IF FOUND THEN
        msg := pg_catalog.substr(s, 257)
            || E'\n{"application_name":' || pg_catalog.to_json(pg_catalog.current_setting('application_name'))::text
            || ',"xid":' || pg_catalog.pg_current_xact_id()::text
            || ',"statement":' || coalesce(pg_catalog.to_json(pg_catalog.current_query())::text, 'null')
            || ',"guard":' || pg_catalog.to_json(g.pattern)::text
            || ',"reason":' || coalesce(pg_catalog.to_json(g.reason)::text, 'null')
            || ',"at":' || pg_catalog.to_json(pg_catalog.to_char(pg_catalog.clock_timestamp()
                   AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text || '}';
        PERFORM pg_catalog.pg_logical_emit_message(false, 'undo.guard',
                    pg_catalog.encode(pg_catalog.sha256(
                        pg_catalog.decode(pg_catalog.substr(s, 129, 128), 'hex') || pg_catalog.sha256(
                            pg_catalog.decode(pg_catalog.substr(s, 1, 128), 'hex')
                            || pg_catalog.convert_to(msg, 'UTF8'))), 'hex') || msg);
        RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
            MESSAGE = pg_catalog.format('undo guard %s: application %s may not write to %s%s',
                          g.pattern, pg_catalog.current_setting('application_name'),
                          TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
                          coalesce(' (' || g.reason || ')', '')),
            HINT = 'nothing this transaction did is kept; if the write is intended, remove the'
                   ' guard: undo guard remove ' || g.pattern;
    END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'undo',
                pg_catalog.encode(pg_catalog.sha256(
                    pg_catalog.decode(pg_catalog.substr(s, 129, 128), 'hex') || pg_catalog.sha256(
                        pg_catalog.decode(pg_catalog.substr(s, 1, 128), 'hex')
                        || pg_catalog.convert_to(m, 'UTF8'))), 'hex') || m),
            pg_catalog.set_config('undo.tagged', '1', true)
      FROM (SELECT pg_catalog.substr(s, 257)
                   || E'\n{"application_name":'
                   || pg_catalog.to_json(pg_catalog.current_setting('application_name'))::text
                   || ',"xid":' || pg_catalog.pg_current_xact_id()::text
                   || ',"statement":'
                   || coalesce(pg_catalog.to_json(pg_catalog.current_query())::text, 'null')
                   || ',"undo":' || coalesce(undo.undoing_json(
                          nullif(pg_catalog.current_setting('undo.undoing', true), '')), 'null')
                   || '}' AS m) tag;
    RETURN NULL;
END
$fn$;

-- The tables under a table (INHERIT, partitions, at every level), and the tables it is under.
CREATE OR REPLACE FUNCTION undo.descendants(rel oid) RETURNS SETOF oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE below(r) AS (
        SELECT inhrelid FROM pg_inherits WHERE inhparent = rel
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN below b ON i.inhparent = b.r)
    SELECT r FROM below
$fn$;
CREATE OR REPLACE FUNCTION undo.ancestors(rel oid) RETURNS SETOF oid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH RECURSIVE above(r) AS (
        SELECT inhparent FROM pg_inherits WHERE inhrelid = rel
        UNION SELECT i.inhparent FROM pg_inherits i JOIN above a ON i.inhrelid = a.r)
    SELECT r FROM above
$fn$;

-- What makes capture of an audited table incomplete, one row per problem (no row: nothing):
-- the one definition that `undo status` (unprepared_tables), `undo init` (audit_table puts
-- right what it can), the event trigger (004_ddl.sql: a table's state after DDL) and capture
-- (on every DDL record it reads) use. code: unlogged, identity, trigger, descendant.
-- The tag trigger is undo's only if it calls undo.tag(), by OID (a trigger of that name calling
-- another function is not it), fires before every statement (FOR EACH STATEMENT, BEFORE
-- INSERT OR UPDATE OR DELETE OR TRUNCATE: tgtype 62; no UPDATE OF columns, no WHEN) and is
-- ENABLE ALWAYS. A table under it (INHERIT, a partition) that is not audited itself gets rows
-- written through it that capture never sees.
CREATE OR REPLACE FUNCTION undo.table_problems(rels oid[])
RETURNS TABLE (relid oid, table_name text, code text, problem text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT c.oid, format('%I.%I', n.nspname, c.relname), p.code, p.problem
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
     CROSS JOIN LATERAL (
        SELECT 'unlogged', 'unlogged: its changes are not in the WAL'
         WHERE c.relpersistence <> 'p'
        UNION ALL
        SELECT 'identity', 'replica identity is not FULL: updates and deletes lose their old rows'
         WHERE c.relreplident <> 'f'
        UNION ALL
        SELECT 'trigger', 'the undo_tag trigger is missing, disabled or not undo''s (it must call'
                          ' undo.tag() before every statement, ENABLE ALWAYS): writes are untagged'
         WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t
                            WHERE t.tgrelid = c.oid AND t.tgname = 'undo_tag'
                              AND t.tgfoid = 'undo.tag()'::regprocedure AND t.tgenabled = 'A'
                              AND t.tgtype = 62 AND t.tgqual IS NULL
                              AND cardinality(t.tgattr::int2[]) = 0)
        UNION ALL
        SELECT 'descendant', format('rows written through it into %I.%I are not captured: %s',
                   dn.nspname, d.relname,
                   CASE WHEN d.relpersistence = 't' THEN 'it is temporary, not in the WAL'
                        WHEN d.relpersistence = 'u' THEN 'it is unlogged, not in the WAL'
                        WHEN d.relkind = 'f' THEN 'it is a foreign table'
                        ELSE 'it is not audited (run undo init)' END)
          FROM undo.descendants(c.oid) x
          JOIN pg_class d ON d.oid = x
          JOIN pg_namespace dn ON dn.oid = d.relnamespace
         WHERE NOT EXISTS (SELECT 1 FROM undo.audited a WHERE a.relid = x)
     ) p(code, problem)
     WHERE c.oid = ANY (rels)
     ORDER BY c.oid, p.code, p.problem
$fn$;

-- Prepares one table: REPLICA IDENTITY FULL, the tag trigger (ENABLE ALWAYS, so
-- session_replication_role = replica does not silence it), and publication membership; and
-- the tables under it (INHERIT, partitions, of any schema: rows written through it land in
-- them). A tag trigger that is not undo's (undo.table_problems) is made again, whatever it is.
DROP FUNCTION IF EXISTS undo.audit_table(regclass);  -- before publications had their own schemas
CREATE OR REPLACE FUNCTION undo.audit_table(rel regclass, pub text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    c record;
    target name;
    below oid;
    changed boolean := false;
BEGIN
    SELECT cl.relkind, cl.relreplident, cl.relispartition, cl.relpersistence, n.nspname, cl.relname
      INTO c FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace WHERE cl.oid = rel;
    -- A publication refuses unlogged and temporary tables (and foreign ones): their changes are
    -- not in the WAL. init warns about them; status lists them.
    IF NOT FOUND OR c.relkind NOT IN ('r', 'p') OR c.relpersistence <> 'p' THEN
        RETURN false;
    END IF;
    INSERT INTO undo.audited (relid, prior_identity) VALUES (rel, c.relreplident)
    ON CONFLICT DO NOTHING;
    IF c.relreplident <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
        changed := true;
    END IF;
    -- missing, disabled, calling another function, row-level, with a WHEN clause (one made by
    -- an earlier version had one: see undo.tag), ...: dropped and made again
    IF EXISTS (SELECT 1 FROM undo.table_problems(ARRAY[rel::oid]) p WHERE p.code = 'trigger') THEN
        EXECUTE format('DROP TRIGGER IF EXISTS undo_tag ON %s', rel);
        EXECUTE format('CREATE TRIGGER undo_tag BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE'
                       ' ON %s FOR EACH STATEMENT EXECUTE FUNCTION undo.tag()', rel);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER undo_tag', rel);
        changed := true;
    END IF;
    -- into the publication named (init), every publication auditing the table's schema, and
    -- every one of undo's that holds a table it is under (a table of another schema made to
    -- INHERIT an audited one, or attached as a partition of one)
    FOR target IN
        SELECT p.pubname FROM pg_publication p
         WHERE (p.pubname = pub OR p.pubname IN (SELECT u.name FROM undo.publications u
                                                  WHERE c.nspname = ANY (u.schemas))
                OR (p.pubname IN (SELECT u.name FROM undo.publications u)
                    AND EXISTS (SELECT 1 FROM pg_publication_rel pr
                                 WHERE pr.prpubid = p.oid
                                   AND pr.prrelid IN (SELECT undo.ancestors(rel)))))
           AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                            WHERE pr.prpubid = p.oid AND pr.prrelid = rel)
    LOOP
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', target, rel);
        changed := true;
    END LOOP;
    FOR below IN SELECT x FROM undo.descendants(rel) x
                  WHERE NOT EXISTS (SELECT 1 FROM undo.audited a WHERE a.relid = x) LOOP
        changed := undo.audit_table(below::regclass) OR changed;
    END LOOP;
    RETURN changed;
END
$fn$;
REVOKE ALL ON FUNCTION undo.audit_table(regclass, text) FROM PUBLIC;

-- Tables created later in an audited schema are prepared as they are created: undo.on_ddl
-- (004_ddl.sql).
