-- Who may keep a series' newest readings in memory (collector/ingest/ingestor.py, "the tail").
--
-- A live stream brings one reading a meter per call, and every call loaded each series'
-- last readings from reading_data before deriving the new interval: most of a call's
-- time (issue 19). The process that owns a series now keeps those readings in memory
-- and skips the load. A process owns a series when reading_series.owner holds its token
-- and it holds the session advisory lock (7217, token): owning is claimed under the
-- meter's lock, only from nobody or from a token whose lock is gone (its process ended).
--
-- Every other write of an owned series tells its owner: the writer adds one to the
-- owner's tail_owner.gen in the same transaction, under the meter's lock. The owner reads
-- its gen under the same lock in each batch and, when it moved, forgets what it kept
-- and reads the database again. Writers: another ingesting process (it finds the owner
-- in reading_series), the `reading` view's trigger (amr suspect, manual edits), and
-- retention (`amr db maintain`), which tells every owner.

ALTER TABLE reading_series ADD COLUMN owner integer;

CREATE SEQUENCE tail_owner_token AS integer MINVALUE 1 CYCLE;

CREATE TABLE tail_owner (
    token integer PRIMARY KEY,
    gen   bigint NOT NULL DEFAULT 0,
    since timestamptz NOT NULL DEFAULT now()
);

-- a write of these series by anyone but their owners: each owner forgets its tail
CREATE FUNCTION amr_tail_stale(series integer[]) RETURNS void LANGUAGE sql AS $$
    UPDATE tail_owner SET gen = gen + 1
    WHERE token IN (SELECT owner FROM reading_series WHERE id = ANY(series) AND owner IS NOT NULL)
$$;

CREATE OR REPLACE FUNCTION amr_reading_write() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_series integer;
    new_series integer;
BEGIN
    -- the meter's lock, as every ingesting process takes it, so that an owner reading its
    -- gen under that lock sees this write's
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(OLD.meter_id, 7217));
        SELECT id INTO old_series FROM reading_series WHERE meter_id = OLD.meter_id AND register = OLD.register;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM amr_tail_stale(ARRAY[old_series]);
        DELETE FROM reading_data WHERE series = old_series AND ts = OLD.ts;
        RETURN OLD;
    END IF;
    IF NEW.meter_id IS NULL OR NEW.register IS NULL OR NEW.ts IS NULL OR NEW.value IS NULL THEN
        RAISE not_null_violation USING MESSAGE = format(
            'reading: meter_id, register, ts and value are required (got %L, %L, %L, %L)',
            NEW.meter_id, NEW.register, NEW.ts, NEW.value);
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(NEW.meter_id, 7217));
    new_series := amr_series_id(NEW.meter_id, NEW.register);
    PERFORM amr_tail_stale(ARRAY[old_series, new_series]);
    IF TG_OP = 'INSERT' THEN
        INSERT INTO reading_data (series, flags, ts, source, line, value, kwh, span)
        VALUES (new_series,
                amr_reading_flags(NEW.quality, NEW.kind, NEW.status, NEW.estimated, NEW.day, NEW.zone, NEW.ts),
                NEW.ts, amr_source_id(amr_source_text(coalesce(NEW.source, ''))),
                amr_source_line(NEW.source), NEW.value, NEW.kwh,
                ((extract(epoch FROM NEW.ts) - extract(epoch FROM NEW.start_ts)) * 1000000)::bigint);
    ELSE
        UPDATE reading_data SET
            series = new_series,
            flags = amr_reading_flags(NEW.quality, NEW.kind, NEW.status, NEW.estimated, NEW.day, NEW.zone, NEW.ts),
            ts = NEW.ts, source = amr_source_id(amr_source_text(coalesce(NEW.source, ''))),
            line = amr_source_line(NEW.source), value = NEW.value, kwh = NEW.kwh,
            span = ((extract(epoch FROM NEW.ts) - extract(epoch FROM NEW.start_ts)) * 1000000)::bigint
        WHERE series = old_series AND ts = OLD.ts;
    END IF;
    RETURN NEW;
END
$$;
