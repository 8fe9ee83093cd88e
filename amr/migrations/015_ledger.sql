-- The account ledger (billing/ledger.py): append-only entries in two components,
-- energy and penalty. amount > 0 adds to what the customer owes (a charge, a
-- penalty accrual, a debit adjustment), amount < 0 takes from it (a payment, a
-- credit). Nothing is updated or deleted: a correction is a new entry (a
-- reversal names the entry it reverses) with its reason and author. Balances
-- and debts at any date are sums over it, never stored beside it. (TRUNCATE, an
-- operator's act on a whole database, is left to the operator.) Every entry
-- carries an idempotency key, so a payment that arrives twice is one payment.
CREATE TABLE ledger_entry (
    id              bigserial PRIMARY KEY,
    account         text NOT NULL REFERENCES subscriber (account),
    component       text NOT NULL CHECK (component IN ('energy', 'penalty')),
    kind            text NOT NULL CHECK (kind IN ('charge', 'payment', 'accrual', 'adjustment', 'reversal')),
    amount          numeric(14, 2) NOT NULL CHECK (amount <> 0),
    booked_on       date NOT NULL,
    period          date CHECK (period IS NULL OR extract(day FROM period) = 1),
    source          text,
    reverses        bigint REFERENCES ledger_entry (id),
    reason          text NOT NULL,
    author          text NOT NULL,
    idempotency_key text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entry_account_idx ON ledger_entry (account, component, booked_on);
-- an entry is reversed at most once; partial, since nearly every entry reverses nothing
-- (a full index would cost every charge and payment a write for its NULL)
CREATE UNIQUE INDEX ledger_entry_reverses_idx ON ledger_entry (reverses) WHERE reverses IS NOT NULL;

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entry is append-only (% refused): post a correcting entry instead', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER ledger_entry_append_only BEFORE UPDATE OR DELETE ON ledger_entry
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
