-- Core model: subscribers, meters, readings, interval usage split into zones,
-- daily zone totals and rejected input.
-- Time tables carry the marker /*@time_partitioned(col)*/ and a line
-- "-- @time_table TABLE COLUMN CHUNK COMPRESS_AFTER SEGMENT_BY RETENTION"; the migrator turns
-- them into native range partitions or TimescaleDB hypertables (amr/storage/timeseries.py).

CREATE TABLE subscriber (
    account     text PRIMARY KEY CHECK (account ~ '^[0-9]+$' AND (account = '0' OR account !~ '^0')),
    metering    text NOT NULL CHECK (metering IN ('amr', 'manual')),
    plan        text NOT NULL CHECK (plan IN ('single', 'two_zone', 'three_zone')),
    category    text NOT NULL CHECK (category IN ('gas_stove', 'electric_stove')),
    area        text NOT NULL CHECK (area IN ('urban', 'rural')),
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE meter (
    id           text PRIMARY KEY,
    account      text NOT NULL REFERENCES subscriber (account),
    adapter      text NOT NULL,
    multiplier   numeric NOT NULL DEFAULT 1 CHECK (multiplier > 0),
    rollover     numeric NOT NULL DEFAULT 1000000 CHECK (rollover > 0),
    max_power_kw numeric NOT NULL DEFAULT 30 CHECK (max_power_kw > 0),
    interval_s   integer NOT NULL DEFAULT 1800 CHECK (interval_s > 0),
    installed    timestamptz,
    removed      timestamptz,
    config       jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX meter_account_idx ON meter (account);

-- Cumulative register values as read. Never updated: the raw value is the truth.
CREATE TABLE reading (
    meter_id    text NOT NULL,
    register    text NOT NULL,
    ts          timestamptz NOT NULL,
    value       numeric NOT NULL CHECK (value >= 0),
    quality     text[] NOT NULL DEFAULT '{}',
    source      text NOT NULL DEFAULT '',
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, register, ts)
) /*@time_partitioned(ts)*/;
-- @time_table reading ts 1month 30days meter_id 5years

-- Energy between consecutive valid readings of one register, cut into
-- segments of one local day and one zone. An interval [start_ts, end_ts) is
-- the rows sharing (meter_id, register, start_ts); kwh has the multiplier applied.
CREATE TABLE interval_usage (
    meter_id   text NOT NULL,
    register   text NOT NULL,
    start_ts   timestamptz NOT NULL,
    end_ts     timestamptz NOT NULL,
    seg_start  timestamptz NOT NULL,
    seg_end    timestamptz NOT NULL,
    day        date NOT NULL,
    zone       text NOT NULL,
    kwh        numeric NOT NULL CHECK (kwh >= 0),
    estimated  boolean NOT NULL DEFAULT false,
    kind       text NOT NULL DEFAULT 'normal' CHECK (kind IN ('normal', 'rollover', 'reset', 'gap')),
    status     text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'suspect', 'accepted', 'rejected')),
    PRIMARY KEY (meter_id, register, seg_start)
) /*@time_partitioned(seg_start)*/;
-- @time_table interval_usage seg_start 1month 30days meter_id 5years

-- Per meter, local calendar day and zone, import energy (register 1.8.0).
-- kwh excludes suspect energy until someone accepts it; suspect_kwh shows it.
CREATE TABLE daily_zone_usage (
    meter_id      text NOT NULL,
    day           date NOT NULL,
    zone          text NOT NULL,
    kwh           numeric NOT NULL DEFAULT 0,
    estimated_kwh numeric NOT NULL DEFAULT 0,
    suspect_kwh   numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (meter_id, day, zone)
);
CREATE INDEX daily_zone_usage_day_idx ON daily_zone_usage (day);

-- A person's decision on a suspect interval; derivation re-applies it.
CREATE TABLE interval_decision (
    meter_id   text NOT NULL,
    register   text NOT NULL,
    start_ts   timestamptz NOT NULL,
    end_ts     timestamptz NOT NULL,
    decision   text NOT NULL CHECK (decision IN ('accepted', 'rejected')),
    decided_by text NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now(),
    note       text,
    PRIMARY KEY (meter_id, register, start_ts, end_ts)
);

-- Everything refused, with its raw bytes and the reason: nothing is dropped.
-- kind 'conflict' is a second, different value for a stored (meter, register, ts).
CREATE TABLE rejected_reading (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL DEFAULT 'invalid' CHECK (kind IN ('invalid', 'conflict')),
    source      text NOT NULL DEFAULT '',
    meter_id    text,
    register    text,
    ts          timestamptz,
    value       text,
    code        text NOT NULL DEFAULT 'invalid',
    reason      text NOT NULL,
    raw         bytea
);
CREATE INDEX rejected_reading_received_idx ON rejected_reading (received_at);
