-- The customer portal's read-only side: views of accounts, usage, readings and
-- bills, and the role amr_portal that may only SELECT from them. Roles are
-- cluster-wide, so the role is created only when missing (several databases
-- of one cluster run this migration). A login user for the portal is made a
-- member: CREATE ROLE portal_web LOGIN PASSWORD '...' IN ROLE amr_portal;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'amr_portal') THEN
        CREATE ROLE amr_portal NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created by a concurrent migration of another database
END
$$;

CREATE VIEW portal_account AS
    SELECT account, metering, plan, category, area FROM subscriber;

CREATE VIEW portal_meter AS
    SELECT id AS meter_id, account, installed, removed FROM meter;

CREATE VIEW portal_latest_reading AS
    SELECT m.account, m.id AS meter_id, r.register, r.ts, r.value
    FROM meter m
    CROSS JOIN LATERAL (
        SELECT DISTINCT ON (register) register, ts, value
        FROM reading WHERE reading.meter_id = m.id
        ORDER BY register, ts DESC
    ) r;

CREATE VIEW portal_daily_usage AS
    SELECT m.account, d.meter_id, d.day, d.zone, d.kwh, d.estimated_kwh, d.suspect_kwh
    FROM daily_zone_usage d JOIN meter m ON m.id = d.meter_id;

CREATE VIEW portal_bill AS
    SELECT b.account, b.period, b.version, b.total, b.kwh, b.estimated_kwh, b.plan,
           b.reason, b.diff, b.created_at,
           b.version = max(b.version) OVER (PARTITION BY b.account, b.period) AS latest
    FROM bill b;

CREATE VIEW portal_bill_line AS
    SELECT account, period, version, line_no, zone, date_from, date_to, kwh, estimated_kwh,
           rate, amount
    FROM bill_line;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM amr_portal;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM amr_portal;
GRANT USAGE ON SCHEMA public TO amr_portal;
GRANT SELECT ON portal_account, portal_meter, portal_latest_reading, portal_daily_usage,
    portal_bill, portal_bill_line TO amr_portal;
