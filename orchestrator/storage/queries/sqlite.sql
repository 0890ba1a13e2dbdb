-- The SQLite dialect of the saga index: named queries (`-- name: ...`), then the migrations
-- (`-- migration: N`, applied in order, never edited once shipped). Parameters are :named;
-- uuids are stored as hex text and times as seconds since the epoch (REAL), which sort.

-- migration: 1
CREATE TABLE IF NOT EXISTS saga_work (
    saga_uuid TEXT PRIMARY KEY, due_at REAL NOT NULL, version INTEGER NOT NULL,
    lease_owner TEXT, lease_until REAL);
CREATE INDEX IF NOT EXISTS saga_work_due ON saga_work (due_at);
CREATE TABLE IF NOT EXISTS saga_status (
    saga_uuid TEXT PRIMARY KEY, saga_id TEXT NOT NULL, saga TEXT NOT NULL, state TEXT NOT NULL,
    version INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, doc BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS saga_status_state ON saga_status (state, updated_at);
CREATE INDEX IF NOT EXISTS saga_status_saga ON saga_status (saga, state, updated_at);
CREATE INDEX IF NOT EXISTS saga_status_updated ON saga_status (updated_at);
CREATE TABLE IF NOT EXISTS saga_status_tracking (application_name TEXT PRIMARY KEY, notification_id INTEGER);

-- migration: 2
-- Sagas set aside after their history could not be loaded or saved.
ALTER TABLE saga_status ADD COLUMN problem TEXT;
ALTER TABLE saga_work ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;

-- migration: 3
-- Searchable input fields (a JSON object), for the list filters.
ALTER TABLE saga_status ADD COLUMN search TEXT;
CREATE INDEX IF NOT EXISTS saga_status_created ON saga_status (created_at);

-- name: upsert_status
-- A later version always wins over an earlier one (a rebuild may rewrite an equal one); any
-- write of the row clears a problem noted at an earlier version.
INSERT INTO saga_status (saga_uuid, saga_id, saga, state, version, created_at, updated_at, doc, search,
                         pool, pool_key, queued, pool_due)
VALUES (:saga_uuid, :saga_id, :saga, :state, :version, :created_at, :updated_at, :doc, :search,
        :pool, :pool_key, :queued, :pool_due)
ON CONFLICT (saga_uuid) DO UPDATE SET
    state = excluded.state, version = excluded.version, updated_at = excluded.updated_at,
    doc = excluded.doc, problem = NULL, pool = excluded.pool, queued = excluded.queued,
    pool_due = excluded.pool_due
WHERE saga_status.version <= excluded.version

-- name: upsert_work
-- Writing a row releases any lease on it: the events just saved say what is due next.
INSERT INTO saga_work (saga_uuid, due_at, version) VALUES (:saga_uuid, :due_at, :version)
ON CONFLICT (saga_uuid) DO UPDATE SET
    due_at = excluded.due_at, version = excluded.version, lease_owner = NULL, lease_until = NULL, failures = 0

-- name: delete_work
DELETE FROM saga_work WHERE saga_uuid = :saga_uuid

-- name: track
-- The position only moves forwards.
INSERT INTO saga_status_tracking VALUES (:application, :position)
ON CONFLICT (application_name) DO UPDATE SET notification_id = excluded.notification_id
WHERE saga_status_tracking.notification_id < excluded.notification_id

-- name: claim
-- SQLite has no SKIP LOCKED, and needs none: the UPDATE takes the one write lock, so the
-- select and the lease happen as one step for every process sharing the file.
UPDATE saga_work SET lease_owner = :owner, lease_until = :until
WHERE saga_uuid IN (
    SELECT saga_uuid FROM saga_work WHERE due_at <= :now AND (lease_until IS NULL OR lease_until < :now)
    ORDER BY due_at LIMIT :limit)
RETURNING saga_uuid, version

-- name: release
-- Only if nothing was recorded meanwhile (the version is the one the claim saw).
UPDATE saga_work SET due_at = :due_at, lease_owner = NULL, lease_until = NULL
WHERE saga_uuid = :saga_uuid AND version = :version

-- name: release_done
DELETE FROM saga_work WHERE saga_uuid = :saga_uuid AND version = :version

-- name: count_failure
-- A write first: it takes the write lock at once (a read first could not upgrade to a write
-- if another connection committed in between).
UPDATE saga_work SET failures = failures + 1 WHERE saga_uuid = :saga_uuid AND version = :version
RETURNING failures

-- name: defer
UPDATE saga_work SET due_at = :due_at, lease_owner = NULL, lease_until = NULL WHERE saga_uuid = :saga_uuid

-- name: note_problem
UPDATE saga_status SET problem = :problem WHERE saga_uuid = :saga_uuid AND version = :version

-- name: next_due
-- A leased row is not due before its lease ends.
SELECT min(max(due_at, coalesce(lease_until, due_at))) FROM saga_work

-- name: get_status
SELECT doc, problem FROM saga_status WHERE saga_uuid = :saga_uuid

-- name: list_status
SELECT doc, problem FROM saga_status {where} ORDER BY updated_at DESC, saga_uuid DESC LIMIT :limit

-- name: count_status
SELECT saga, state, count(*) FROM saga_status {where} GROUP BY saga, state ORDER BY saga, state

-- name: status_position
SELECT notification_id FROM saga_status_tracking WHERE application_name = :application

-- name: reset_status
DELETE FROM saga_status

-- name: reset_tracking
DELETE FROM saga_status_tracking

-- name: events_of
SELECT originator_id, originator_version, topic, state FROM {events}
WHERE originator_id IN ({keys}) ORDER BY originator_id, originator_version

-- name: first_events_of
-- Each saga's first event (its start): the aggregates' initial version is 1.
SELECT originator_id, originator_version, topic, state FROM {events}
WHERE originator_id IN ({keys}) AND originator_version = 1 ORDER BY originator_id

-- name: has_schema_table
SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'saga_schema'

-- name: schema_version
SELECT max(version) FROM saga_schema

-- migration: 4
-- Read models users write (projections/), one JSON document per key, and completion notifications.
CREATE TABLE IF NOT EXISTS projection_rows (
    projection TEXT NOT NULL, key TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (projection, key));
CREATE TABLE IF NOT EXISTS saga_deliveries (
    delivery_id TEXT PRIMARY KEY, saga_uuid TEXT NOT NULL, saga_id TEXT NOT NULL, saga TEXT NOT NULL,
    kind TEXT NOT NULL, target TEXT NOT NULL, body BLOB NOT NULL, due_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT, lease_until REAL, delivered_at REAL, last_error TEXT, log TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS saga_deliveries_due ON saga_deliveries (due_at);
CREATE INDEX IF NOT EXISTS saga_deliveries_saga ON saga_deliveries (saga_uuid);

-- migration: 5
-- Throughput guards: the pool whose slot a saga waits for (queued) or holds, and its key.
ALTER TABLE saga_status ADD COLUMN pool TEXT;
ALTER TABLE saga_status ADD COLUMN pool_key TEXT;
ALTER TABLE saga_status ADD COLUMN queued INTEGER;
ALTER TABLE saga_status ADD COLUMN pool_due REAL;
CREATE INDEX IF NOT EXISTS saga_status_pool ON saga_status (pool, queued, created_at, saga_uuid)
    WHERE pool IS NOT NULL;

-- name: pool_running
SELECT pool_key, count(*) FROM saga_status WHERE pool = :pool AND NOT queued GROUP BY pool_key

-- name: pool_waiting
-- Oldest first: a pool admits in the order its sagas were started; not before their start_at,
-- and none of a key that is full already (so a long queue of one key hides no other key).
SELECT saga_uuid, pool_key FROM saga_status
WHERE pool = :pool AND queued AND pool_due <= :now AND pool_key NOT IN (SELECT value FROM json_each(:full))
ORDER BY created_at, saga_uuid LIMIT :limit

-- name: pool_queued
-- Pools with sagas waiting (also pools the code no longer defines, whose queue must not be stranded).
SELECT DISTINCT pool FROM saga_status WHERE pool IS NOT NULL AND queued

-- name: purge_candidates
-- Finished before the cutoff, with no notification still to deliver; with a safe position, only
-- sagas whose every event each follower of the log has read (their histories may then go).
SELECT s.saga_uuid FROM saga_status s
WHERE s.state = :state AND s.updated_at < :before
  AND NOT EXISTS (SELECT 1 FROM saga_deliveries d WHERE d.saga_uuid = s.saga_uuid AND d.due_at IS NOT NULL)
  AND (:safe IS NULL OR (SELECT max(e.rowid) FROM {events} e WHERE e.originator_id = s.saga_uuid) <= :safe)
ORDER BY s.updated_at LIMIT :limit

-- name: purge_status
DELETE FROM saga_status WHERE saga_uuid IN ({keys})

-- name: purge_work
DELETE FROM saga_work WHERE saga_uuid IN ({keys})

-- name: purge_deliveries
DELETE FROM saga_deliveries WHERE saga_uuid IN ({keys})

-- name: purge_events
DELETE FROM {events} WHERE originator_id IN ({keys})

-- name: tracking_all
SELECT application_name, notification_id FROM {tracking}

-- name: rows_put
INSERT INTO projection_rows VALUES (:projection, :key, :doc)
ON CONFLICT (projection, key) DO UPDATE SET doc = excluded.doc

-- name: rows_delete
DELETE FROM projection_rows WHERE projection = :projection AND key = :key

-- name: rows_get
SELECT key, doc FROM projection_rows WHERE projection = :projection AND key IN ({keys})

-- name: rows_all
SELECT key, doc FROM projection_rows WHERE projection = :projection ORDER BY key

-- name: rows_reset
DELETE FROM projection_rows WHERE projection = :projection

-- name: tracking_reset
DELETE FROM {tracking} WHERE application_name = :name

-- name: delivery_add
-- A delivery's id comes from the saga and the target: a second notice of the same end adds nothing.
INSERT INTO saga_deliveries (delivery_id, saga_uuid, saga_id, saga, kind, target, body, due_at)
VALUES (:delivery_id, :saga_uuid, :saga_id, :saga, :kind, :target, :body, :due_at)
ON CONFLICT (delivery_id) DO NOTHING

-- name: delivery_claim
-- The attempt is counted when it is claimed: one cut short by its worker's death counts too.
UPDATE saga_deliveries SET lease_owner = :owner, lease_until = :until, attempts = attempts + 1
WHERE delivery_id IN (
    SELECT delivery_id FROM saga_deliveries
    WHERE due_at <= :now AND (lease_until IS NULL OR lease_until < :now) ORDER BY due_at LIMIT :limit)
RETURNING delivery_id, saga_uuid, saga_id, saga, kind, target, body, attempts, log

-- name: delivery_done
-- Only the worker that holds the lease records the attempt.
UPDATE saga_deliveries SET attempts = :attempts, due_at = :due_at, delivered_at = :delivered_at,
    last_error = :last_error, log = :log, lease_owner = NULL, lease_until = NULL
WHERE delivery_id = :delivery_id AND lease_owner = :owner

-- name: deliveries_of
SELECT delivery_id, saga_uuid, saga_id, saga, kind, target, body, attempts, log FROM saga_deliveries
WHERE saga_uuid = :saga_uuid ORDER BY kind, target

-- name: delivery_due
-- A read first: workers ask every second, and a write transaction for nothing would take the lock.
SELECT 1 FROM saga_deliveries WHERE due_at <= :now AND (lease_until IS NULL OR lease_until < :now) LIMIT 1
