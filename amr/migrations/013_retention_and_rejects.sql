-- Retention is an operator's explicit policy, and refused input is recorded once.
--
-- Metering data is billing evidence. Until now `amr db migrate` dropped partitions
-- older than five years on its own, and TimescaleDB did the same through retention
-- policies; daily totals kept those periods, so ingesting the dropped readings again
-- counted their energy twice. From here on nothing is deleted unless AMR_RETENTION is
-- set, only `amr db maintain` applies it, and what it dropped is remembered as a
-- watermark below which ingestion refuses readings (code beyond_retention).

CREATE TABLE retention_watermark (
    name       text PRIMARY KEY CHECK (name = 'readings'),  -- one row: the time tables share it
    watermark  timestamptz NOT NULL,  -- no reading before this instant is kept or accepted
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- What `amr db maintain` dropped, when and under which policy: the audit trail.
CREATE TABLE retention_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    table_name   text NOT NULL,
    part         text NOT NULL,        -- the partition or chunk dropped
    range_from   timestamptz,
    range_to     timestamptz NOT NULL,
    rows         bigint,
    policy_months integer NOT NULL
);

-- The per-table retention of amr_time_table is no longer a policy anybody applies.
UPDATE amr_time_table SET retention = NULL;

-- Databases on TimescaleDB were given retention policies by 001 and 012: take them away,
-- so no background job deletes what the watermark does not know about.
DO $$
DECLARE
    t text;
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb') THEN
        FOR t IN SELECT name FROM amr_time_table WHERE hypertable LOOP
            PERFORM remove_retention_policy(t::regclass, if_exists => true);
        END LOOP;
    END IF;
END
$$;

-- The same refused input from the same source is one row with a count: re-ingesting a
-- file, or a device that repeats a bad message, no longer adds a row each time.
-- `fingerprint` is sha256 over (kind, source, code, meter_id, register, ts, value, raw),
-- computed by collector.ingest.ingestor; rows from before this migration have none and stay.
ALTER TABLE rejected_reading
    ADD COLUMN fingerprint      bytea,
    ADD COLUMN times            integer NOT NULL DEFAULT 1 CHECK (times >= 1),
    ADD COLUMN last_received_at timestamptz;
CREATE UNIQUE INDEX rejected_reading_fingerprint_idx ON rejected_reading (fingerprint);
