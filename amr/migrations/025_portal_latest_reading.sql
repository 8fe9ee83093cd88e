-- portal_latest_reading, the latest value of each register of an account's meters (the
-- account page reads it twice: its meters and whether this month's readings came), read
-- every reading the meter ever sent and sorted them to keep one per register: a year of
-- 30-minute data is 17,520 readings a register, 30-60 ms a page (bench/portal.py). Now
-- each of the meter's series (reading_series, 023) takes its newest row of reading_data
-- by the key (series, ts), newest partition first: a few index pages. The same rows and
-- columns as before (a series without readings has no row, as a register without readings
-- had none), so CREATE OR REPLACE keeps the view's grants (amr_portal).

CREATE OR REPLACE VIEW portal_latest_reading AS
    SELECT m.account, m.id AS meter_id, s.register, r.ts, r.value
    FROM meter m
    JOIN reading_series s ON s.meter_id = m.id
    CROSS JOIN LATERAL (
        SELECT d.ts, d.value FROM reading_data d WHERE d.series = s.id
        ORDER BY d.ts DESC LIMIT 1
    ) r;
