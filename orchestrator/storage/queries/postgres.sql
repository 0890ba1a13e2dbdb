-- The PostgreSQL dialect of the saga index: named queries (`-- name: ...`), then the migrations
-- (`-- migration: N`, applied in order under an advisory lock, never edited once shipped).
-- Parameters are %(named)s; {schema} and {events} are quoted identifiers. Batch writes take
-- arrays in binary (%b), one statement per table for the whole batch, not one per saga.

-- migration: 1
CREATE TABLE IF NOT EXISTS {schema}.saga_work (
    saga_uuid uuid PRIMARY KEY,
    due_at timestamptz NOT NULL,
    version integer NOT NULL,
    lease_owner text,
    lease_until timestamptz);
CREATE INDEX IF NOT EXISTS saga_work_due ON {schema}.saga_work (due_at);
CREATE TABLE IF NOT EXISTS {schema}.saga_status (
    saga_uuid uuid PRIMARY KEY,
    saga_id text NOT NULL,
    saga text NOT NULL,
    state text NOT NULL,
    version integer NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    doc jsonb NOT NULL);
CREATE INDEX IF NOT EXISTS saga_status_state ON {schema}.saga_status (state, updated_at DESC);
CREATE INDEX IF NOT EXISTS saga_status_saga ON {schema}.saga_status (saga, state, updated_at DESC);
CREATE INDEX IF NOT EXISTS saga_status_updated ON {schema}.saga_status (updated_at DESC);
CREATE TABLE IF NOT EXISTS {schema}.saga_status_tracking (
    application_name text PRIMARY KEY,
    notification_id bigint NOT NULL);

-- migration: 2
-- Sagas set aside after their history could not be loaded or saved.
ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS problem text;
ALTER TABLE {schema}.saga_work ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;

-- migration: 3
-- Searchable input fields, for the list filters (jsonb containment, with a GIN index).
ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS search jsonb;
CREATE INDEX IF NOT EXISTS saga_status_search ON {schema}.saga_status USING gin (search jsonb_path_ops);
CREATE INDEX IF NOT EXISTS saga_status_created ON {schema}.saga_status (created_at DESC);
CREATE INDEX IF NOT EXISTS saga_status_order ON {schema}.saga_status (updated_at DESC, saga_uuid DESC);

-- name: insert_events
-- The library sends events as an array of a composite type, quoted as text on the client;
-- four binary arrays carry the same rows for a fraction of the client's work.
INSERT INTO {schema}.{events} (originator_id, originator_version, topic, state)
SELECT * FROM unnest(%b::uuid[], %b::int8[], %b::text[], %b::bytea[])
RETURNING notification_id

-- name: upsert_status
-- A later version always wins over an earlier one (a rebuild may rewrite an equal one); any
-- write of the row clears a problem noted at an earlier version.
INSERT INTO {schema}.saga_status (saga_uuid, saga_id, saga, state, version, created_at, updated_at, doc, search,
                                  pool, pool_key, queued, pool_due)
SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[], %b::int[], %b::timestamptz[],
                     %b::timestamptz[], %b::jsonb[], %b::jsonb[], %b::text[], %b::text[], %b::bool[],
                     %b::timestamptz[])
ON CONFLICT (saga_uuid) DO UPDATE SET
    state = EXCLUDED.state, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
    doc = EXCLUDED.doc, problem = NULL, pool = EXCLUDED.pool, queued = EXCLUDED.queued,
    pool_due = EXCLUDED.pool_due
WHERE saga_status.version <= EXCLUDED.version

-- name: write_index
-- What a save writes besides its events, in one statement (one round of parsing and binding, not
-- five): the status rows, the work rows of sagas with something due (writing a row releases any
-- lease on it), the work rows of sagas with nothing due deleted, the log's head (we hold the
-- events table's EXCLUSIVE lock, so max(notification_id) is our last event), and the NOTIFY that
-- wakes other processes' workers at commit. Empty arrays write nothing.
WITH status AS ({query:upsert_status}),
work AS (
    INSERT INTO {schema}.saga_work (saga_uuid, due_at, version)
    SELECT u, d, v FROM unnest(%b::uuid[], %b::timestamptz[], %b::int[]) AS t(u, d, v)
    ON CONFLICT (saga_uuid) DO UPDATE SET
        due_at = EXCLUDED.due_at, version = EXCLUDED.version, lease_owner = NULL, lease_until = NULL, failures = 0),
done AS (
    DELETE FROM {schema}.saga_work WHERE saga_uuid = ANY(%b::uuid[])),
head AS (
    INSERT INTO {schema}.saga_status_tracking SELECT %s, max(notification_id) FROM {schema}.{events}
    ON CONFLICT (application_name) DO UPDATE SET notification_id = EXCLUDED.notification_id)
SELECT pg_notify(%s, '')

-- name: track
-- The position only moves forwards.
INSERT INTO {schema}.saga_status_tracking VALUES (%(application)s, %(position)s)
ON CONFLICT (application_name) DO UPDATE SET notification_id = EXCLUDED.notification_id
WHERE saga_status_tracking.notification_id < EXCLUDED.notification_id

-- name: claim
-- SKIP LOCKED: concurrent workers each take different rows instead of queueing on the same ones.
UPDATE {schema}.saga_work w SET lease_owner = %(owner)s, lease_until = %(until)s
FROM (SELECT saga_uuid FROM {schema}.saga_work
      WHERE due_at <= %(now)s AND (lease_until IS NULL OR lease_until < %(now)s)
      ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
WHERE w.saga_uuid = c.saga_uuid RETURNING w.saga_uuid, w.version

-- name: lock_events_nowait
-- The events table's lock, as the library takes it before a save, or at once an error.
LOCK TABLE {schema}.{events} IN EXCLUSIVE MODE NOWAIT

-- name: claim_loaded
-- The claim and the claimed sagas' histories in one round trip.
WITH claimed AS (
    UPDATE {schema}.saga_work w SET lease_owner = %(owner)s, lease_until = %(until)s
    FROM (SELECT saga_uuid FROM {schema}.saga_work
          WHERE due_at <= %(now)s AND (lease_until IS NULL OR lease_until < %(now)s)
          ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
    WHERE w.saga_uuid = c.saga_uuid RETURNING w.saga_uuid, w.version)
SELECT claimed.saga_uuid, claimed.version, e.originator_version, e.topic, e.state
FROM claimed JOIN {schema}.{events} e ON e.originator_id = claimed.saga_uuid
ORDER BY e.originator_id, e.originator_version

-- name: release
-- Only if nothing was recorded meanwhile (the version is the one the claim saw).
UPDATE {schema}.saga_work SET due_at = %(due_at)s, lease_owner = NULL, lease_until = NULL
WHERE saga_uuid = %(saga_uuid)s AND version = %(version)s

-- name: release_done
DELETE FROM {schema}.saga_work WHERE saga_uuid = %(saga_uuid)s AND version = %(version)s

-- name: count_failure
UPDATE {schema}.saga_work SET failures = failures + 1
WHERE saga_uuid = %(saga_uuid)s AND version = %(version)s RETURNING failures

-- name: defer
UPDATE {schema}.saga_work SET due_at = %(due_at)s, lease_owner = NULL, lease_until = NULL
WHERE saga_uuid = %(saga_uuid)s

-- name: note_problem
UPDATE {schema}.saga_status SET problem = %(problem)s WHERE saga_uuid = %(saga_uuid)s AND version = %(version)s

-- name: next_due
-- A leased row is not due before its lease ends.
SELECT min(GREATEST(due_at, lease_until)) FROM {schema}.saga_work

-- name: get_status
SELECT doc::text, problem FROM {schema}.saga_status WHERE saga_uuid = %(saga_uuid)s

-- name: list_status
SELECT doc::text, problem FROM {schema}.saga_status {where} ORDER BY updated_at DESC, saga_uuid DESC LIMIT %(limit)s

-- name: count_status
SELECT saga, state, count(*) FROM {schema}.saga_status {where} GROUP BY saga, state ORDER BY saga, state

-- name: status_position
SELECT notification_id FROM {schema}.saga_status_tracking WHERE application_name = %(application)s

-- name: reset_status
DELETE FROM {schema}.saga_status

-- name: reset_tracking
DELETE FROM {schema}.saga_status_tracking

-- name: events_of
SELECT originator_id, originator_version, topic, state FROM {schema}.{events}
WHERE originator_id = ANY(%(keys)s) ORDER BY originator_id, originator_version

-- name: first_events_of
-- Each saga's first event (its start): the aggregates' initial version is 1.
SELECT originator_id, originator_version, topic, state FROM {schema}.{events}
WHERE originator_id = ANY(%(keys)s) AND originator_version = 1 ORDER BY originator_id

-- migration: 4
-- Read models users write (projections/), one JSON document per key, and completion notifications.
CREATE TABLE IF NOT EXISTS {schema}.projection_rows (
    projection text NOT NULL, key text NOT NULL, doc jsonb NOT NULL, PRIMARY KEY (projection, key));
CREATE TABLE IF NOT EXISTS {schema}.saga_deliveries (
    delivery_id uuid PRIMARY KEY, saga_uuid uuid NOT NULL, saga_id text NOT NULL, saga text NOT NULL,
    kind text NOT NULL, target text NOT NULL, body bytea NOT NULL, due_at timestamptz,
    attempts integer NOT NULL DEFAULT 0, lease_owner text, lease_until timestamptz, delivered_at timestamptz,
    last_error text, log jsonb NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS saga_deliveries_due ON {schema}.saga_deliveries (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS saga_deliveries_saga ON {schema}.saga_deliveries (saga_uuid);

-- migration: 5
-- Throughput guards: the pool whose slot a saga waits for (queued) or holds, and its key.
ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS pool text;
ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS pool_key text;
ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS queued boolean;
ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS pool_due timestamptz;
CREATE INDEX IF NOT EXISTS saga_status_pool ON {schema}.saga_status (pool, queued, created_at, saga_uuid)
    WHERE pool IS NOT NULL;

-- name: pool_running
SELECT pool_key, count(*) FROM {schema}.saga_status WHERE pool = %(pool)s AND NOT queued GROUP BY pool_key

-- name: pool_waiting
-- Oldest first: a pool admits in the order its sagas were started; not before their start_at,
-- and none of a key that is full already (so a long queue of one key hides no other key).
SELECT saga_uuid, pool_key FROM {schema}.saga_status
WHERE pool = %(pool)s AND queued AND pool_due <= %(now)s AND pool_key <> ALL(%(full)s)
ORDER BY created_at, saga_uuid LIMIT %(limit)s

-- name: pool_queued
-- Pools with sagas waiting (also pools the code no longer defines, whose queue must not be stranded).
SELECT DISTINCT pool FROM {schema}.saga_status WHERE pool IS NOT NULL AND queued

-- name: purge_candidates
-- Finished before the cutoff, with no notification still to deliver; with a safe position, only
-- sagas whose every event each follower of the log has read (their histories may then go).
SELECT s.saga_uuid FROM {schema}.saga_status s
WHERE s.state = %(state)s AND s.updated_at < %(before)s
  AND NOT EXISTS (SELECT 1 FROM {schema}.saga_deliveries d WHERE d.saga_uuid = s.saga_uuid AND d.due_at IS NOT NULL)
  AND (%(safe)s::bigint IS NULL
       OR (SELECT max(e.notification_id) FROM {schema}.{events} e WHERE e.originator_id = s.saga_uuid) <= %(safe)s)
ORDER BY s.updated_at LIMIT %(limit)s

-- name: purge_status
DELETE FROM {schema}.saga_status WHERE saga_uuid = ANY(%(keys)s)

-- name: purge_work
DELETE FROM {schema}.saga_work WHERE saga_uuid = ANY(%(keys)s)

-- name: purge_deliveries
DELETE FROM {schema}.saga_deliveries WHERE saga_uuid = ANY(%(keys)s)

-- name: purge_events
DELETE FROM {schema}.{events} WHERE originator_id = ANY(%(keys)s)

-- name: tracking_all
SELECT application_name, notification_id FROM {schema}.{tracking}

-- name: rows_put
INSERT INTO {schema}.projection_rows VALUES (%(projection)s, %(key)s, %(doc)s::jsonb)
ON CONFLICT (projection, key) DO UPDATE SET doc = EXCLUDED.doc

-- name: rows_delete
DELETE FROM {schema}.projection_rows WHERE projection = %(projection)s AND key = %(key)s

-- name: rows_get
SELECT key, doc::text FROM {schema}.projection_rows WHERE projection = %(projection)s AND key = ANY(%(keys)s)

-- name: rows_all
SELECT key, doc::text FROM {schema}.projection_rows WHERE projection = %(projection)s ORDER BY key

-- name: rows_reset
DELETE FROM {schema}.projection_rows WHERE projection = %(projection)s

-- name: tracking_reset
DELETE FROM {schema}.{tracking} WHERE application_name = %(name)s

-- name: delivery_add
-- A delivery's id comes from the saga and the target: a second notice of the same end adds nothing.
INSERT INTO {schema}.saga_deliveries (delivery_id, saga_uuid, saga_id, saga, kind, target, body, due_at)
VALUES (%(delivery_id)s, %(saga_uuid)s, %(saga_id)s, %(saga)s, %(kind)s, %(target)s, %(body)s, %(due_at)s)
ON CONFLICT (delivery_id) DO NOTHING

-- name: delivery_claim
-- SKIP LOCKED: workers delivering at once each take different notifications.
-- The attempt is counted when it is claimed: one cut short by its worker's death counts too.
UPDATE {schema}.saga_deliveries d SET lease_owner = %(owner)s, lease_until = %(until)s, attempts = d.attempts + 1
FROM (SELECT delivery_id FROM {schema}.saga_deliveries
      WHERE due_at <= %(now)s AND (lease_until IS NULL OR lease_until < %(now)s)
      ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
WHERE d.delivery_id = c.delivery_id
RETURNING d.delivery_id, d.saga_uuid, d.saga_id, d.saga, d.kind, d.target, d.body, d.attempts, d.log::text

-- name: delivery_done
-- Only the worker that holds the lease records the attempt.
UPDATE {schema}.saga_deliveries SET attempts = %(attempts)s, due_at = %(due_at)s, delivered_at = %(delivered_at)s,
    last_error = %(last_error)s, log = %(log)s::jsonb, lease_owner = NULL, lease_until = NULL
WHERE delivery_id = %(delivery_id)s AND lease_owner = %(owner)s

-- name: deliveries_of
SELECT delivery_id, saga_uuid, saga_id, saga, kind, target, body, attempts, log::text FROM {schema}.saga_deliveries
WHERE saga_uuid = %(saga_uuid)s ORDER BY kind, target

-- name: delivery_due
-- A read first: workers ask every second, and most of the time nothing is due.
SELECT 1 FROM {schema}.saga_deliveries
WHERE due_at <= %(now)s AND (lease_until IS NULL OR lease_until < %(now)s) LIMIT 1
