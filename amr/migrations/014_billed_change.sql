-- A billed month is closed: data that would change it waits for a person's decision.
--
-- A late or corrected reading may change the energy of a month that was already
-- billed. The readings and intervals are stored as always (they are the truth of the
-- metering), and ingestion records each interval of register 1.8.0 that it added,
-- changed or took away inside a billed month here. The billing run does not re-price
-- such a month on its own: it holds the bill back, `amr suspect list` shows the changes
-- with the bill they would change and by how much, and accepting them
-- (`amr suspect accept --account N --period YYYY-MM`) issues the new bill version.

CREATE TABLE billed_change (
    id          bigserial PRIMARY KEY,
    meter_id    text NOT NULL,
    register    text NOT NULL,
    start_ts    timestamptz NOT NULL,
    end_ts      timestamptz NOT NULL,
    period      date NOT NULL CHECK (extract(day FROM period) = 1),  -- the billed month it touches
    kwh         numeric,        -- the interval's energy now; NULL: the interval was taken away
    noticed_at  timestamptz NOT NULL DEFAULT now(),
    decision    text CHECK (decision IN ('accepted', 'rejected', 'no_change')),
    decided_by  text,
    decided_at  timestamptz,
    note        text
);
-- one open record per interval and month: re-deriving the same interval again adds nothing
CREATE UNIQUE INDEX billed_change_open_idx ON billed_change (meter_id, register, start_ts, end_ts, period)
    WHERE decision IS NULL;
CREATE INDEX billed_change_period_idx ON billed_change (period) WHERE decision IS NULL;
