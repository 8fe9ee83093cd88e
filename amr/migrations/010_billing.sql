-- Billing: the tariff catalogue, versioned bills and their lines, and the audit
-- trail of decisions on suspect energy.

-- One entry of a tariff order: rates of one plan for one category and area,
-- dates inclusive. Overlaps per (category, area, plan, band) are refused by
-- billing/tariffs.py before insert. `rates` maps zone -> decimal string.
CREATE TABLE tariff (
    id            bigserial PRIMARY KEY,
    valid_from    date NOT NULL,
    valid_to      date NOT NULL CHECK (valid_to >= valid_from),
    category      text NOT NULL CHECK (category IN ('gas_stove', 'electric_stove', 'rural')),
    area          text NOT NULL CHECK (area IN ('urban', 'rural')),
    plan          text NOT NULL CHECK (plan IN ('single', 'two_zone', 'three_zone')),
    band          smallint NOT NULL DEFAULT 1 CHECK (band >= 1),
    band_from_kwh numeric NOT NULL DEFAULT 0,
    band_to_kwh   numeric,
    rates         jsonb NOT NULL,
    source        text NOT NULL DEFAULT '',
    loaded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tariff_lookup_idx ON tariff (category, area, plan, valid_from);

-- One bill per account and month (period = first day of the local month), in
-- versions: a re-run with changed data adds a version and keeps the old ones.
CREATE TABLE bill (
    account       text NOT NULL REFERENCES subscriber (account),
    period        date NOT NULL CHECK (extract(day FROM period) = 1),
    version       integer NOT NULL CHECK (version >= 1),
    total         numeric(14, 2) NOT NULL,
    kwh           numeric NOT NULL,
    estimated_kwh numeric NOT NULL DEFAULT 0,
    plan          text NOT NULL,
    category      text NOT NULL,
    area          text NOT NULL,
    reason        text NOT NULL,
    diff          jsonb,
    fingerprint   text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, period, version)
);
CREATE INDEX bill_period_idx ON bill (period);

-- Lines per plan zone and per run of days with one rate (a tariff change
-- inside the month gives two lines for the zone). amount = round_half_up(kwh * rate).
-- No foreign key to bill: lines are written only by billing/engine.py, in the same
-- transaction as their bill, and neither is ever updated or deleted; the key's
-- per-row check cost a third of a city-wide run's write time (bench/billing.py).
CREATE TABLE bill_line (
    account       text NOT NULL,
    period        date NOT NULL,
    version       integer NOT NULL,
    line_no       smallint NOT NULL,
    zone          text NOT NULL CHECK (zone IN ('all', 'day', 'night', 'peak', 'half_peak')),
    date_from     date NOT NULL,
    date_to       date NOT NULL,
    kwh           numeric NOT NULL,
    estimated_kwh numeric NOT NULL DEFAULT 0,
    rate          numeric NOT NULL,
    amount        numeric(14, 2) NOT NULL,
    PRIMARY KEY (account, period, version, line_no)
);

-- Who accepted or rejected which suspect energy, when and why.
CREATE TABLE suspect_audit (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    meter_id   text NOT NULL,
    register   text NOT NULL,
    start_ts   timestamptz NOT NULL,
    end_ts     timestamptz NOT NULL,
    kwh        numeric,
    decision   text NOT NULL CHECK (decision IN ('accepted', 'rejected')),
    decided_by text NOT NULL,
    note       text
);
