-- undo: the ledger of undos, in the source database, written in the undo's own transaction.
-- Both ways of running an undo (--apply, and the printed script run by psql) call
-- undo.record_undo, so an undo of changes already undone is refused whichever way it runs, even
-- before capture has caught up. Idempotent, like 001.

-- Who may undo: members of undo_operator (and the role that ran init, and superusers). Roles
-- are cluster-wide: one role serves every database undo is installed in; init creates it when
-- it is missing (which needs CREATEROLE), and `init --uninstall` drops it only when no other
-- database still depends on it (tagging.py).
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'undo_operator') THEN
        CREATE ROLE undo_operator NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN
        NULL;  -- another database's init made it meanwhile
    WHEN insufficient_privilege THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('role %s may not create the role undo_operator, whose'
                ' members may undo: run CREATE ROLE undo_operator NOLOGIN; as a superuser (or'
                ' a role with CREATEROLE), then undo init again', current_user);
END
$do$;
GRANT USAGE ON SCHEMA undo TO undo_operator;

-- One row per (undone source transaction, table, operation): undoing table A of a transaction
-- does not block undoing its table B later. An entry is live until an undo of that undo
-- reverts it (reverted_by).
CREATE TABLE IF NOT EXISTS undo.ledger (
    id bigserial PRIMARY KEY,
    undone_at timestamptz NOT NULL DEFAULT pg_catalog.statement_timestamp(),
    undone_by name NOT NULL DEFAULT session_user,
    undo_xid bigint NOT NULL,           -- the undoing transaction, as the change stream names it
    target jsonb NOT NULL,              -- what was asked: {"session": ...}, {"xids": [...]}, ...
    commit_lsn pg_lsn NOT NULL,         -- the undone source transaction
    relid oid NOT NULL,                 -- the table whose changes were undone
    op "char" NOT NULL,                 -- and which of them: 'I', 'U' or 'D'
    reverted_by bigint                  -- the undo that undid this undo
);
-- The backstop against two undos of the same changes running at once: the second waits for
-- the first, then fails.
CREATE UNIQUE INDEX IF NOT EXISTS ledger_live ON undo.ledger (commit_lsn, relid, op)
    WHERE reverted_by IS NULL;
CREATE INDEX IF NOT EXISTS ledger_undo_xid ON undo.ledger (undo_xid);
REVOKE ALL ON undo.ledger FROM PUBLIC;
GRANT SELECT ON undo.ledger TO PUBLIC;

-- Records an undo: entries is a JSON array of [commit LSN, table OID, op, xid] of the changes it
-- undoes (xid: the undone transaction's). Reverts the entries of any undo it undoes, refuses
-- (SQLSTATE UN001) changes already undone, and emits the entry to the change stream (prefix
-- undo.ledger) so the audit store mirrors the ledger. SECURITY DEFINER: the ledger is written
-- only through here, and only members of undo_operator may call it; search_path pinned.
-- The mirror is signed: hex(HMAC-SHA256(ledger key, JSON)) || JSON, the ledger key being
-- HMAC-SHA256(master key, 'ledger'), and the JSON holds the undo's full 64-bit xid, so capture
-- refuses a mirror nobody holding the key wrote (forged) and one from another transaction
-- (replayed). Only the owner reads the key; pg_logical_emit_message is open to every role.
CREATE OR REPLACE FUNCTION undo.record_undo(target jsonb, entries jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    me bigint := (pg_current_xact_id()::text::bigint % 4294967296);
    hit record;
    sec record;
    k bytea;
    msg text;
    stack text;
BEGIN
    -- Only undo itself records: a call straight from the top-level statement (`--apply` and the
    -- printed script send SELECT undo.record_undo(...)), once per transaction. A function of a
    -- table owner's that an operator's session runs (a trigger, a CHECK, an index expression,
    -- a view) calls it from inside another function: its stack has more than this one frame.
    -- The statement is undo's own: SELECT undo.record_undo(...) with constant arguments (a view
    -- or rule of an owner's cannot make another statement call it from the top).
    GET DIAGNOSTICS stack = PG_CONTEXT;
    IF array_length(string_to_array(stack, E'\n'), 1) <> 1
       OR pg_trigger_depth() <> 0
       OR ltrim(current_query(), E' \t\r\n') NOT LIKE 'SELECT undo.record\_undo(%'
       OR EXISTS (SELECT 1 FROM undo.ledger l WHERE l.undo_xid = me) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = 'undo.record_undo records an undo only when the undo itself calls it:'
                      ' once per transaction, from its own top-level statement';
    END IF;
    UPDATE undo.ledger l SET reverted_by = me
      FROM jsonb_array_elements(entries) e
     WHERE l.reverted_by IS NULL AND l.undo_xid = (e->>3)::bigint AND l.relid = (e->>1)::oid
       AND l.op = CASE e->>2 WHEN 'I' THEN 'D' WHEN 'D' THEN 'I' ELSE 'U' END::"char";
    SELECT l.undone_at, l.undone_by, l.undo_xid, (e->>3) AS xid,
           l.relid::regclass::text AS rel, count(*) OVER () AS n
      INTO hit
      FROM jsonb_array_elements(entries) e
      JOIN undo.ledger l ON l.commit_lsn = (e->>0)::pg_lsn AND l.relid = (e->>1)::oid
                        AND l.op = (e->>2)::"char"
     WHERE l.reverted_by IS NULL
     ORDER BY l.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'UN001',
            MESSAGE = format('already undone: %s change(s) of %s in xid %s were undone at %s'
                             ' by %s in xid %s; undo that undo first (undo xact %s)',
                             CASE WHEN hit.n > 1 THEN 'these and other' ELSE 'the' END,
                             hit.rel, hit.xid, to_char(hit.undone_at AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS"Z"'), hit.undone_by, hit.undo_xid,
                             hit.undo_xid);
    END IF;
    INSERT INTO undo.ledger (undo_xid, target, commit_lsn, relid, op)
    SELECT me, target, (e->>0)::pg_lsn, (e->>1)::oid, (e->>2)::"char"
      FROM jsonb_array_elements(entries) e;
    msg := json_build_object(
        'undo_xid', me, 'xid', pg_current_xact_id()::text::bigint, 'target', target,
        'entries', (SELECT json_agg(json_build_array(e->>0, n.nspname, c.relname, e->>2, e->>3))
                      FROM jsonb_array_elements(entries) e
                      JOIN pg_class c ON c.oid = (e->>1)::oid
                      JOIN pg_namespace n ON n.oid = c.relnamespace))::text;
    SELECT s.ipad, s.opad INTO sec FROM undo.secret s;
    k := sha256(sec.opad || sha256(sec.ipad || convert_to('ledger', 'UTF8')));
    PERFORM pg_logical_emit_message(true, 'undo.ledger', convert_to(
        encode(sha256(undo.hmac_pad(k, 92) || sha256(undo.hmac_pad(k, 54)
                                                    || convert_to(msg, 'UTF8'))), 'hex') || msg,
        'UTF8'));
END
$fn$;
-- Not PUBLIC: whoever may call it may make an undo refuse, or show a session undone.
REVOKE ALL ON FUNCTION undo.record_undo(jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION undo.record_undo(jsonb, jsonb) TO undo_operator;
