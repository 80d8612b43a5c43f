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

-- Everything undo signs (tags, DDL records, guard refusals) is signed here, by functions that
-- run as undo's owner, from facts the server gives: nothing that signs is readable or writable
-- by code running in the session (a role's own code, or a table owner's trigger running in it).
-- The signature: HMAC-SHA256 under the master key (RFC 2104 on the built-in sha256 with the
-- pads above: no extension), over the message's prefix, a newline and its payload, so that a
-- message of one kind never passes as another; the message is the MAC in hex, then the payload.
-- Before this version each session signed with a key of its own, cached in the setting
-- undo.session, which any code in the session could read (and sign as that session after it
-- ended) or overwrite: that setting and undo.session_tag() are gone, and the tags they signed
-- no longer verify (capture stores them untrusted, forged).
DROP FUNCTION IF EXISTS undo.session_tag();
DROP FUNCTION IF EXISTS undo.signed_tag();

-- The session's start (backend_start, in µs since 1970), which only pg_stat_get_activity gives,
-- at a cost of tens of µs (it copies every backend's status). It is read once per session and
-- kept as this session's currval() of a sequence no other role may use: currval is the
-- session's own state, set only by setval (which needs UPDATE on the sequence: undo's owner
-- alone), so code in the session can neither read nor change it. The sequence's own value
-- means nothing. DISCARD ALL (a pooler's reset) forgets currval: it is read again. 0: the start
-- is not known (undo's owner is no superuser and may not see other roles' sessions), kept as
-- well, so that it is not looked for again in every transaction; the tag says null.
CREATE SEQUENCE IF NOT EXISTS undo.session_start MINVALUE 0;
ALTER SEQUENCE undo.session_start MINVALUE 0;
REVOKE ALL ON SEQUENCE undo.session_start FROM PUBLIC;
CREATE OR REPLACE FUNCTION undo.note_session_start() RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT setval('undo.session_start',
                  coalesce((extract(epoch FROM a.backend_start) * 1000000)::bigint, 0))
      FROM pg_stat_get_activity(pg_backend_pid()) a
$fn$;
REVOKE ALL ON FUNCTION undo.note_session_start() FROM PUBLIC;

-- The session part of a signed message, as JSON fields: pid, backend start (µs), user (the
-- session's login role), client address and port; all from the server. Capture derives the
-- session id from them: the %c of log_line_prefix, to_hex(seconds of backend_start) || '.' ||
-- to_hex(pid), the string the server log shows. undo.tag_statement() builds the same inline.
CREATE OR REPLACE FUNCTION undo.session_fields() RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v bigint;
BEGIN
    BEGIN
        v := currval('undo.session_start');
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        v := undo.note_session_start();
    END;
    RETURN concat('"pid":', pg_backend_pid(),
                  ',"backend_start":', CASE WHEN v > 0 THEN v::text ELSE 'null' END,
                  ',"user":', to_json(session_user::text),
                  ',"client_addr":', coalesce(to_json(host(inet_client_addr()))::text, 'null'),
                  ',"client_port":', coalesce(inet_client_port()::text, 'null'));
END
$fn$;
REVOKE ALL ON FUNCTION undo.session_fields() FROM PUBLIC;

-- prefix's message with this payload, signed: hex(HMAC(master key, prefix || LF || payload)) ||
-- payload. Owner-run code only (DDL records, refusals, the ledger): it signs what it is given.
CREATE OR REPLACE FUNCTION undo.sign(prefix text, payload text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT encode(sha256(s.opad || sha256(s.ipad || convert_to(prefix || E'\n' || payload, 'UTF8'))),
                  'hex') || payload
      FROM undo.secret s
$fn$;
REVOKE ALL ON FUNCTION undo.sign(text, text) FROM PUBLIC;

-- What an undo in progress says it undoes, as JSON text: undo.undoing, set by `undo session
-- --apply` (and its printed script) in the undo's own transaction as its transaction_timestamp(),
-- a space and the JSON; x is the tagged transaction's. A value set otherwise (for the session,
-- or in another transaction) is no claim: NULL. A value that is not JSON becomes a JSON string,
-- so a tag always parses. STRICT: not called at all when the setting was never set in the
-- session. Called by undo.tag_statement() as undo's owner, with the caller's search_path: every name is
-- qualified.
DROP FUNCTION IF EXISTS undo.undoing_json(text);
CREATE OR REPLACE FUNCTION undo.undoing_json(u text, x text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
AS $fn$
BEGIN
    IF NOT pg_catalog.starts_with(u, pg_catalog.concat(x, ' ')) THEN
        RETURN NULL;
    END IF;
    u := pg_catalog.substr(u, pg_catalog.length(x) OPERATOR(pg_catalog.+) 2);
    RETURN u::pg_catalog.jsonb::pg_catalog.text;
EXCEPTION WHEN others THEN
    RETURN pg_catalog.to_json(u)::pg_catalog.text;
END
$fn$;
REVOKE ALL ON FUNCTION undo.undoing_json(text, text) FROM PUBLIC;

-- How much of a transaction's statements the tag marks: undo.statements_mode(), 'each' (a
-- marker at each later statement, so that every change carries its own statement) or 'first'
-- (none: after the first, a statement only checks undo.tagged, and every change carries the
-- transaction's first statement). Set by `undo init --statements` through
-- undo.make_statements(), which only undo's owner may call; for the whole database (every
-- slot and store on it). Like undo.guarded() (003_guard.sql), the mode is no setting and no
-- query: a constant SQL function that undo.tag_statement() inlines into its plan (PostgreSQL
-- plans it again when the function is replaced, so a session opened before a switch follows
-- it from its next statement), in schema undo, where only undo's owner may create or replace
-- a function, and called schema-qualified. Anyone may call it: `undo status` and `check`
-- show the mode. A new install marks each statement; `undo init` again keeps the mode.
CREATE OR REPLACE FUNCTION undo.make_statements(mode text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF mode IS NULL OR mode NOT IN ('each', 'first') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('statements must be each or first, not %s', mode);
    END IF;
    IF to_regprocedure('undo.statements_mode()') IS NOT NULL THEN
        IF (SELECT p.prosrc FROM pg_proc p
             WHERE p.oid = 'undo.statements_mode()'::regprocedure)
           = format('SELECT %L::pg_catalog.text', mode) THEN
            RETURN false;  -- unchanged: no session's plans invalidated
        END IF;
    END IF;
    EXECUTE format('CREATE OR REPLACE FUNCTION undo.statements_mode() RETURNS pg_catalog.text'
                   ' LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
                   format('SELECT %L::pg_catalog.text', mode));
    RETURN true;
END
$fn$;
REVOKE ALL ON FUNCTION undo.make_statements(text) FROM PUBLIC;
SELECT undo.make_statements('each') WHERE to_regprocedure('undo.statements_mode()') IS NULL;

-- The key of the tag's own state (undo.tagged, undo.stmt below): 128 random bits in two
-- sequences no other role may read (their values are the key; they are never advanced). Read
-- with pg_sequence_last_value(), a function call, no query, that cannot fail for undo's owner
-- (currval, the session's own state, fails in a session that has not set it: a forged setting
-- would then make the victim's statement fail). Made once; `undo init` again keeps it.
CREATE SEQUENCE IF NOT EXISTS undo.state_key_a AS bigint MINVALUE -9223372036854775808;
CREATE SEQUENCE IF NOT EXISTS undo.state_key_b AS bigint MINVALUE -9223372036854775808;
REVOKE ALL ON SEQUENCE undo.state_key_a, undo.state_key_b FROM PUBLIC;
SELECT pg_catalog.setval(k, ('x' || pg_catalog.substr(pg_catalog.md5(
           pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text), 1, 16))
           ::bit(64)::bigint)
  FROM pg_catalog.unnest(ARRAY['undo.state_key_a', 'undo.state_key_b']::regclass[]) k
 WHERE pg_catalog.pg_sequence_last_value(k) IS NULL;

-- Whether g is the digest of a state bound to bound and set at a trigger depth from 1 to d:
-- undo.tag_statement() checks its own depth itself, and calls this only for the rest (a
-- cascade, a trigger's own write: at depth 2 or more, rare), so that its expressions are
-- prepared only then.
CREATE OR REPLACE FUNCTION undo.state_within(g pg_catalog.text, bound pg_catalog.bytea,
                                             d pg_catalog.int4) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    FOR i IN 1 .. d LOOP
        IF g OPERATOR(pg_catalog.=) pg_catalog.md5(bound OPERATOR(pg_catalog.||)
                                                   pg_catalog.int4send(i)) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$fn$;
REVOKE ALL ON FUNCTION undo.state_within(pg_catalog.text, pg_catalog.bytea, pg_catalog.int4)
    FROM PUBLIC;

-- The statement trigger's function, on every audited table. SECURITY DEFINER, so that it signs
-- as undo's owner (reading undo.secret); no SET clause (PostgreSQL saves and restores settings
-- around every call of a function that has one: tens of µs a call), so it runs with the
-- caller's search_path, and every name in it is schema-qualified: functions, types, and
-- operators as OPERATOR(pg_catalog.x) (a role's own ms.= or ms.~~ first on its path is never
-- used). EXECUTE is revoked from PUBLIC: a table owner cannot attach it to a table of hers
-- (PostgreSQL checks EXECUTE when a trigger is made, not when it fires); the triggers init made
-- fire for every role.
--
-- Per statement, it checks the guards first (before it trusts any state: a guarded application
-- is refused at every statement, whatever the settings say), then two transaction-local
-- settings, the tag's own state:
--   undo.stmt   this top-level statement is marked: a statement writing to several audited
--               tables (or a cascade) is marked once;
--   undo.tagged this transaction is tagged.
-- Any code in the session can read and write a setting (the role's own, or a table owner's
-- trigger or default running in it: a trigger that sorts before undo_tag sets them before
-- undo's trigger reads them). So neither holds a fact such code could write: each holds a
-- digest, md5 of the state key (undo.state_key_a/_b, which only undo's owner reads) and what
-- the state is bound to, which the trigger computes again to check it:
--   undo.stmt   the transaction's full xid, the statement_timestamp() and the trigger depth
--               (pg_trigger_depth()) it was set at; it counts at that depth and deeper (a
--               cascade, a trigger's own write to an audited table), never shallower;
--   undo.tagged 't' and the digest of the xid, when the tag was emitted right under the
--               client's statement (GET DIAGNOSTICS PG_CONTEXT: this function and undo.tag(),
--               nothing else): for the whole transaction; 'd' and the digest of the xid, the
--               statement and the depth, when it was emitted under other code (a function, a
--               trigger, a default, a DO block): for that statement, at that depth and deeper,
--               and under other code only (the context is read again in that case only).
-- A value written by other code is then one undo made for this very transaction (and
-- statement), or it counts for nothing: such code can at worst have a genuine tag or marker
-- emitted again, never skip one. The bindings are what keeps a value undo made from being put
-- back where it no longer holds: code that writes to an audited table inside a subtransaction
-- it rolls back (taking the tag or marker with it) can keep the values undo set there and write
-- them back, but they were set under its own code, so they hold only there (deeper, or in that
-- statement), not for the client's statements. Only the client itself, with a savepoint around
-- its own statement, can so erase its own tag (its writes are stored untagged, 'missing').
-- The transaction's first writing statement emits the tag: one transactional message (prefix
-- undo), signed, with the session part, application_name (the session's own claim), the xid,
-- current_query() (the top-level statement) and, for an undo, what it undoes. Each later
-- statement emits a marker (prefix undo.stmt, unsigned: its text), so that every change carries
-- the statement that made it; capture accepts markers only inside a transaction whose tag it
-- trusts (a tag emitted again is a statement of its own, like a marker). With
-- undo.statements_mode() 'first' (`undo init --statements first`), a later statement returns
-- once it has checked undo.tagged: no marker, no undo.stmt. Both settings are set with
-- is_local, so a rolled-back savepoint rolls them back with the messages it held, and the next
-- statement emits them again.
-- A guarded application may not write (003_guard.sql): undo.guarded() is generated from the
-- guards (a constant NULL with none), and undo.refuse() records the attempt and fails.
-- Cost, per transaction (bench/tag, performance docs): PL/pgSQL compiles a trigger function
-- once per trigger (per table), and prepares each expression of each of those copies again
-- in each transaction: in a transaction writing four tables, four copies each prepared their
-- own. So the trigger is one call, and the work is in undo.tag_statement(), an ordinary
-- function, compiled once per session, whose expressions are prepared once per transaction.
-- The trigger returns NEW (null in a statement trigger) rather than NULL: no expression. No
-- WHEN clause either, which PostgreSQL parses again for every statement.
--
-- undo.tag_statement(rel): called only by undo.tag(), so as undo's owner; not PUBLIC's to
-- execute. STABLE only so that PL/pgSQL takes no new snapshot before each of its expressions
-- (it reads nothing a snapshot decides but undo.secret, which changes only with `undo init`);
-- it is not a function the planner may call fewer times: it is called from a PL/pgSQL
-- assignment, once per call of the trigger. The session's start and the key are read by one
-- query, in the tag only.
CREATE OR REPLACE FUNCTION undo.tag_statement(rel pg_catalog.oid) RETURNS pg_catalog.text
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    d pg_catalog.int4 := pg_catalog.pg_trigger_depth();
    k pg_catalog.bytea;
    kt pg_catalog.bytea;
    st pg_catalog.text;
    x pg_catalog.text;
    top boolean;
    v pg_catalog.int8;
    m pg_catalog.text;
    ip pg_catalog.bytea;
    op pg_catalog.bytea;
BEGIN
    -- the guards first, whatever the state says
    IF undo.guarded(pg_catalog.current_setting('application_name')) IS NOT NULL THEN
        PERFORM undo.refuse(undo.guarded(pg_catalog.current_setting('application_name')), rel);
    END IF;
    -- what the state is bound to: the state key and the transaction; the statement
    k := pg_catalog.int8send(pg_catalog.pg_sequence_last_value(
             'undo.state_key_a'::pg_catalog.regclass)) OPERATOR(pg_catalog.||)
         pg_catalog.int8send(pg_catalog.pg_sequence_last_value(
             'undo.state_key_b'::pg_catalog.regclass)) OPERATOR(pg_catalog.||)
         pg_catalog.xid8send(pg_catalog.pg_current_xact_id());
    kt := k OPERATOR(pg_catalog.||) pg_catalog.timestamptz_send(pg_catalog.statement_timestamp());
    IF undo.statements_mode() OPERATOR(pg_catalog.<>) 'first' THEN
        st := pg_catalog.md5(kt OPERATOR(pg_catalog.||) pg_catalog.int4send(d));
        IF pg_catalog.current_setting('undo.stmt', true) OPERATOR(pg_catalog.=) st THEN
            RETURN NULL;  -- this statement is marked already
        END IF;
        IF d OPERATOR(pg_catalog.>) 1 THEN  -- marked a level above (a cascade, a trigger's write)
            IF undo.state_within(pg_catalog.current_setting('undo.stmt', true), kt,
                                 d OPERATOR(pg_catalog.-) 1) THEN
                RETURN NULL;
            END IF;
        END IF;
    END IF;
    x := 't' OPERATOR(pg_catalog.||) pg_catalog.md5(k);
    IF pg_catalog.current_setting('undo.tagged', true) OPERATOR(pg_catalog.=) x THEN
        IF st IS NULL THEN
            RETURN NULL;  -- statements first: nothing more once the transaction is tagged
        END IF;
        -- one expression, no PERFORM (which always runs a query through the executor)
        RETURN pg_catalog.concat(pg_catalog.pg_logical_emit_message(true, 'undo.stmt',
                                     coalesce(pg_catalog.current_query(), '')),
                                 pg_catalog.set_config('undo.stmt', st, true));
    END IF;
    -- Called right under the client's statement (the context is this function and undo.tag(),
    -- nothing else), or under other code (a function, a trigger, a default, a DO block): read
    -- only when the transaction's state is not the client's (rare: under other code), and for
    -- the tag
    IF pg_catalog.starts_with(pg_catalog.current_setting('undo.tagged', true), 'd') THEN
        GET DIAGNOSTICS m = PG_CONTEXT;
        top := pg_catalog.strpos(pg_catalog.substr(m, pg_catalog.strpos(m, E'\n')
                                                      OPERATOR(pg_catalog.+) 1), E'\n')
               OPERATOR(pg_catalog.=) 0;
        -- tagged under other code in this statement, at this depth or above: holds under
        -- other code only
        IF NOT top AND undo.state_within(
                pg_catalog.substr(pg_catalog.current_setting('undo.tagged', true), 2), kt, d) THEN
            IF st IS NULL THEN
                RETURN NULL;
            END IF;
            RETURN pg_catalog.concat(pg_catalog.pg_logical_emit_message(true, 'undo.stmt',
                                         coalesce(pg_catalog.current_query(), '')),
                                     pg_catalog.set_config('undo.stmt', st, true));
        END IF;
    END IF;
    -- the transaction's first tagged statement. Right under the client's statement, the state
    -- holds for the whole transaction; under other code, for this statement at this depth and
    -- deeper, under other code
    IF top IS NULL THEN
        GET DIAGNOSTICS m = PG_CONTEXT;
        top := pg_catalog.strpos(pg_catalog.substr(m, pg_catalog.strpos(m, E'\n')
                                                      OPERATOR(pg_catalog.+) 1), E'\n')
               OPERATOR(pg_catalog.=) 0;
    END IF;
    IF NOT top THEN
        x := 'd' OPERATOR(pg_catalog.||)
             pg_catalog.md5(kt OPERATOR(pg_catalog.||) pg_catalog.int4send(d));
    END IF;
    BEGIN
        SELECT s.ipad, s.opad, pg_catalog.currval('undo.session_start'::pg_catalog.regclass)
          INTO ip, op, v FROM undo.secret s;  -- the one query
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        SELECT s.ipad, s.opad, undo.note_session_start() INTO ip, op, v FROM undo.secret s;
    END;
    m := pg_catalog.concat(
        '{"pid":', pg_catalog.pg_backend_pid(),
        ',"backend_start":', CASE WHEN v OPERATOR(pg_catalog.>) 0 THEN v::pg_catalog.text
                                  ELSE 'null' END,
        ',"user":', pg_catalog.to_json(SESSION_USER::pg_catalog.text),
        ',"client_addr":', coalesce(pg_catalog.to_json(pg_catalog.host(
            pg_catalog.inet_client_addr()))::pg_catalog.text, 'null'),
        ',"client_port":', coalesce(pg_catalog.inet_client_port()::pg_catalog.text, 'null'),
        ',"application_name":', pg_catalog.to_json(pg_catalog.current_setting('application_name')),
        ',"xid":', pg_catalog.pg_current_xact_id(),
        ',"statement":', coalesce(
            pg_catalog.to_json(pg_catalog.current_query())::pg_catalog.text, 'null'),
        ',"undo":', coalesce(undo.undoing_json(
            pg_catalog.current_setting('undo.undoing', true),
            pg_catalog.transaction_timestamp()::pg_catalog.text), 'null'),
        '}');
    RETURN pg_catalog.concat(
        pg_catalog.pg_logical_emit_message(true, 'undo', pg_catalog.encode(pg_catalog.sha256(
            op OPERATOR(pg_catalog.||) pg_catalog.sha256(ip OPERATOR(pg_catalog.||)
                pg_catalog.convert_to(E'undo\n' OPERATOR(pg_catalog.||) m, 'UTF8'))), 'hex')
            OPERATOR(pg_catalog.||) m),
        pg_catalog.set_config('undo.tagged', x, true),
        pg_catalog.set_config('undo.stmt', coalesce(st, ''), true));
END
$fn$;
REVOKE ALL ON FUNCTION undo.tag_statement(pg_catalog.oid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION undo.tag() RETURNS trigger
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $fn$
DECLARE
    m pg_catalog.text;
BEGIN
    m := undo.tag_statement(TG_RELID);
    RETURN NEW;
END
$fn$;
REVOKE ALL ON FUNCTION undo.tag() FROM PUBLIC;

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
        -- not IF EXISTS: on a table just created its NOTICE ("does not exist, skipping")
        -- reached whoever ran the CREATE TABLE
        IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'undo_tag') THEN
            EXECUTE format('DROP TRIGGER undo_tag ON %s', rel);
        END IF;
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
