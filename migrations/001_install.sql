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

-- Prepares one table: REPLICA IDENTITY FULL, the tag trigger (ENABLE ALWAYS, so
-- session_replication_role = replica does not silence it), and publication membership.
DROP FUNCTION IF EXISTS undo.audit_table(regclass);  -- before publications had their own schemas
CREATE OR REPLACE FUNCTION undo.audit_table(rel regclass, pub text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    c record;
    target name;
    changed boolean := false;
BEGIN
    SELECT cl.relkind, cl.relreplident, cl.relispartition, cl.relpersistence, n.nspname, cl.relname
      INTO c FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace WHERE cl.oid = rel;
    -- A publication refuses unlogged and temporary tables (and foreign ones): their changes are
    -- not in the WAL. init warns about them; status lists them.
    IF c.relkind NOT IN ('r', 'p') OR c.relpersistence <> 'p' THEN
        RETURN false;
    END IF;
    INSERT INTO undo.audited (relid, prior_identity) VALUES (rel, c.relreplident)
    ON CONFLICT DO NOTHING;
    IF c.relreplident <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
        changed := true;
    END IF;
    -- no WHEN clause (see undo.tag); one made by an earlier version had one, and is replaced
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'undo_tag'
                                               AND tgqual IS NULL) THEN
        EXECUTE format('CREATE OR REPLACE TRIGGER undo_tag BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE'
                       ' ON %s FOR EACH STATEMENT EXECUTE FUNCTION undo.tag()', rel);
        changed := true;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'undo_tag' AND tgenabled <> 'A') THEN
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER undo_tag', rel);
        changed := true;
    END IF;
    -- into the publication named (init), and every publication auditing the table's schema
    FOR target IN
        SELECT p.pubname FROM pg_publication p
         WHERE (p.pubname = pub OR p.pubname IN (SELECT u.name FROM undo.publications u
                                                  WHERE c.nspname = ANY (u.schemas)))
           AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                            WHERE pr.prpubid = p.oid AND pr.prrelid = rel)
    LOOP
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', target, rel);
        changed := true;
    END LOOP;
    RETURN changed;
END
$fn$;
REVOKE ALL ON FUNCTION undo.audit_table(regclass, text) FROM PUBLIC;

-- Tables created later in an audited schema are prepared as they are created: undo.on_ddl
-- (004_ddl.sql).
