-- The customer account's view of the ledger (billing/ledger.py): what was charged,
-- paid, accrued and corrected, without who in the supplier's staff posted it.
CREATE VIEW portal_ledger_entry AS
    SELECT id, account, component, kind, amount, booked_on, period, source, reverses, reason
    FROM ledger_entry;

GRANT SELECT ON portal_ledger_entry TO amr_portal;
