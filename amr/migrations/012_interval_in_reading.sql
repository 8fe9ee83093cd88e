-- Interval energy moves into the reading that ends the interval.
--
-- Each reading closes at most one interval, so its energy, kind, status and
-- (when the interval lies in one local day and one zone, the common case) its
-- zone belong in the reading's own row: storing a reading is then one row
-- written, not two. A separate interval row per reading doubled the write cost
-- of ingestion, which bench/ingest.py measured at 0.41 of raw COPY before any
-- validation or derivation was done. The rare interval that crosses a zone
-- border or a local midnight keeps its parts in interval_segment.
--
-- interval_usage stays, as a view with the same columns, for every reader.
-- A reading's value is still never updated; its interval columns are
-- re-derived when a late reading lands beside it.

-- The CHECKs let NULL through (a reading that ends no interval); on TimescaleDB they
-- apply to compressed chunks too (tests/test_timescale.py).
ALTER TABLE reading
    ADD COLUMN start_ts  timestamptz,  -- the interval [start_ts, ts) ends here; NULL: none
    ADD COLUMN kwh       numeric CHECK (kwh >= 0),  -- its energy, multiplier applied
    ADD COLUMN kind      text CHECK (kind IN ('normal', 'rollover', 'reset', 'gap')),
    ADD COLUMN status    text CHECK (status IN ('ok', 'suspect', 'accepted', 'rejected')),
    ADD COLUMN estimated boolean,      -- placement (or, for a reset, amount) estimated
    ADD COLUMN day       date,         -- local day and zone of the interval when it has
    ADD COLUMN zone      text;         -- one part; NULL when its parts are in interval_segment

-- The parts of an interval cut at zone borders and local midnights, by the reading
-- that ends it (meter_id, register, end_ts); only for intervals of two parts or more.
CREATE TABLE interval_segment (
    meter_id   text NOT NULL,
    register   text NOT NULL,
    end_ts     timestamptz NOT NULL,
    seg_start  timestamptz NOT NULL,
    seg_end    timestamptz NOT NULL,
    day        date NOT NULL,
    zone       text NOT NULL,
    kwh        numeric NOT NULL CHECK (kwh >= 0),
    PRIMARY KEY (meter_id, register, end_ts, seg_start)
) /*@time_partitioned(end_ts)*/;
-- @time_table interval_segment end_ts 1month 30days meter_id 5years

-- what was derived so far moves over
UPDATE reading r SET
    start_ts = i.start_ts, kwh = i.kwh, kind = i.kind, status = i.status, estimated = i.estimated,
    day = CASE WHEN i.parts = 1 THEN i.day END, zone = CASE WHEN i.parts = 1 THEN i.zone END
FROM (SELECT meter_id, register, start_ts, end_ts, sum(kwh) AS kwh, count(*) AS parts,
             min(day) AS day, min(zone) AS zone, bool_or(estimated) AS estimated,
             min(kind) AS kind, min(status) AS status
        FROM interval_usage GROUP BY 1, 2, 3, 4) i
WHERE r.meter_id = i.meter_id AND r.register = i.register AND r.ts = i.end_ts;

-- The moved parts need somewhere to go before the migrator sets interval_segment up
-- (after this script). TimescaleDB: create_hypertable takes them over (migrate_data).
-- Native partitions: one per month the old intervals end in, named and bounded as
-- timeseries.Partitions makes them, so `amr db maintain` finds and expires them.
DO $$
DECLARE
    m date;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'interval_segment'::regclass) = 'p' THEN
        FOR m IN SELECT DISTINCT date_trunc('month', end_ts AT TIME ZONE 'UTC')::date
                 FROM interval_usage LOOP
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF interval_segment'
                ' FOR VALUES FROM (%L) TO (%L)',
                'interval_segment_p' || to_char(m, 'YYYYMM'),
                to_char(m, 'YYYY-MM-DD') || ' 00:00+00',
                to_char(m + interval '1 month', 'YYYY-MM-DD') || ' 00:00+00');
        END LOOP;
    END IF;
END
$$;

INSERT INTO interval_segment (meter_id, register, end_ts, seg_start, seg_end, day, zone, kwh)
SELECT i.meter_id, i.register, i.end_ts, i.seg_start, i.seg_end, i.day, i.zone, i.kwh
FROM interval_usage i
JOIN reading r ON r.meter_id = i.meter_id AND r.register = i.register AND r.ts = i.end_ts
WHERE r.zone IS NULL;

DROP TABLE interval_usage;
DELETE FROM amr_time_table WHERE name = 'interval_usage';

CREATE VIEW interval_usage AS
    SELECT meter_id, register, start_ts, ts AS end_ts, start_ts AS seg_start, ts AS seg_end,
           day, zone, kwh, estimated, kind, status
    FROM reading WHERE zone IS NOT NULL
    UNION ALL
    SELECT r.meter_id, r.register, r.start_ts, r.ts, s.seg_start, s.seg_end,
           s.day, s.zone, s.kwh, r.estimated, r.kind, r.status
    FROM reading r
    JOIN interval_segment s ON s.meter_id = r.meter_id AND s.register = r.register AND s.end_ts = r.ts
    WHERE r.kwh IS NOT NULL AND r.zone IS NULL;

-- Every batch adds to the day's totals in place: room left on each page keeps
-- those updates heap-only, so they write no index entries.
ALTER TABLE daily_zone_usage SET (fillfactor = 70);
