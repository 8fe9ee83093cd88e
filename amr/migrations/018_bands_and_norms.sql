-- Volume bands and bills without readings (billing/engine.py, billing/tariffs.py).
--
-- Bands: since 01.07.2024 a St. Petersburg rate depends on the account's monthly
-- volume. How the zone volumes share the bands is not published, so the catalogue
-- names the rule on its band entries (tariff.allocation); without one the engine
-- holds a banded bill back. A banded bill has one line per band and zone
-- (bill_line.band; NULL on the lines of an unbanded bill, as before).
--
-- Bills without readings (Government Decree 354 p. 59-60): a manual-metering
-- month without readings is billed by the average of past months, then by the
-- consumption norm, which depends on the rooms and residents of the home; the
-- bill says which (bill.method). A reading that arrives later makes a new version.

ALTER TABLE tariff ADD COLUMN allocation text CHECK (allocation IN ('proportional'));

ALTER TABLE bill_line ADD COLUMN band smallint CHECK (band >= 1);

ALTER TABLE bill ADD COLUMN method text NOT NULL DEFAULT 'readings'
    CHECK (method IN ('readings', 'average', 'norm'));

ALTER TABLE subscriber ADD COLUMN rooms smallint CHECK (rooms >= 1);
ALTER TABLE subscriber ADD COLUMN residents smallint CHECK (residents >= 1);

-- The consumption norm: kWh per resident and month, per category, rooms and residents,
-- dates inclusive. The highest rooms (residents) value of a category also applies to
-- more rooms (residents), as the published tables read ("4 rooms and more").
CREATE TABLE consumption_norm (
    id             bigserial PRIMARY KEY,
    valid_from     date NOT NULL,
    valid_to       date NOT NULL CHECK (valid_to >= valid_from),
    category       text NOT NULL CHECK (category IN ('gas_stove', 'electric_stove')),
    rooms          smallint NOT NULL CHECK (rooms >= 1),
    residents      smallint NOT NULL CHECK (residents >= 1),
    kwh_per_person numeric NOT NULL CHECK (kwh_per_person > 0),
    source         text NOT NULL DEFAULT '',
    loaded_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consumption_norm_lookup_idx ON consumption_norm (category, valid_from);

-- The customer account sees the method and the band; columns are only added at the end.
CREATE OR REPLACE VIEW portal_bill AS
    SELECT b.account, b.period, b.version, b.total, b.kwh, b.estimated_kwh, b.plan,
           b.reason, b.diff, b.created_at,
           b.version = max(b.version) OVER (PARTITION BY b.account, b.period) AS latest,
           b.method
    FROM bill b;

CREATE OR REPLACE VIEW portal_bill_line AS
    SELECT account, period, version, line_no, zone, date_from, date_to, kwh, estimated_kwh,
           rate, amount, band
    FROM bill_line;
