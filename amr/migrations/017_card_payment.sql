-- Card payments made in the customer account (billing/payments.py), through a
-- payment provider. A payment is asked for with the customer's idempotency key
-- (one payment per account and key, however often the request is repeated),
-- with the energy and penalty amounts the customer set apart, and the e-mail or
-- phone its electronic receipt goes to. Its state moves
--   created -> pending -> succeeded | failed, and unknown
-- when the provider did not answer (re-asked by the reconciliation, on a
-- back-off: next_check_at). Every change of state is a row of
-- card_payment_event, which is never updated or deleted. A succeeded payment
-- is booked to the ledger once (key card:<provider>:<provider_payment_id>) and
-- gets one receipt (card_receipt, 54-FZ fields), also never changed.
CREATE TABLE card_payment (
    id                  bigserial PRIMARY KEY,
    account             text NOT NULL REFERENCES subscriber (account),
    idempotency_key     text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    energy              numeric(14, 2) NOT NULL CHECK (energy >= 0),
    penalty             numeric(14, 2) NOT NULL CHECK (penalty >= 0),
    contact             text NOT NULL,
    contact_kind        text NOT NULL CHECK (contact_kind IN ('email', 'phone')),
    provider            text NOT NULL,
    provider_payment_id text,
    confirmation_url    text,
    state               text NOT NULL DEFAULT 'created'
                        CHECK (state IN ('created', 'pending', 'succeeded', 'failed', 'unknown')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    paid_at             timestamptz,
    checks              integer NOT NULL DEFAULT 0,
    next_check_at       timestamptz,
    CHECK (energy + penalty > 0),
    CHECK ((state = 'succeeded') = (paid_at IS NOT NULL)),
    UNIQUE (account, idempotency_key),
    UNIQUE (provider, provider_payment_id)
);
-- what the reconciliation looks for: open payments whose check is due
CREATE INDEX card_payment_due_idx ON card_payment (next_check_at)
    WHERE state IN ('created', 'pending', 'unknown');

CREATE TABLE card_payment_event (
    id          bigserial PRIMARY KEY,
    payment_id  bigint NOT NULL REFERENCES card_payment (id),
    at          timestamptz NOT NULL DEFAULT now(),
    state_from  text,
    state_to    text NOT NULL,
    via         text NOT NULL CHECK (via IN ('api', 'callback', 'reconcile')),
    detail      text NOT NULL DEFAULT ''
);
CREATE INDEX card_payment_event_payment_idx ON card_payment_event (payment_id, id);

-- The electronic receipt of a succeeded card payment (54-FZ: date and time of
-- the settlement, amount, what was paid for, the e-mail or phone the customer
-- gave before paying, the supplier, a number).
CREATE TABLE card_receipt (
    payment_id  bigint PRIMARY KEY REFERENCES card_payment (id),
    number      bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    issued_at   timestamptz NOT NULL,
    account     text NOT NULL REFERENCES subscriber (account),
    energy      numeric(14, 2) NOT NULL CHECK (energy >= 0),
    penalty     numeric(14, 2) NOT NULL CHECK (penalty >= 0),
    amount      numeric(14, 2) NOT NULL CHECK (amount = energy + penalty AND amount > 0),
    contact     text NOT NULL,
    contact_kind text NOT NULL CHECK (contact_kind IN ('email', 'phone')),
    supplier    text NOT NULL,
    provider    text NOT NULL,
    provider_payment_id text NOT NULL
);

CREATE FUNCTION card_payment_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER card_payment_event_append_only BEFORE UPDATE OR DELETE ON card_payment_event
    FOR EACH ROW EXECUTE FUNCTION card_payment_append_only();
CREATE TRIGGER card_receipt_append_only BEFORE UPDATE OR DELETE ON card_receipt
    FOR EACH ROW EXECUTE FUNCTION card_payment_append_only();

-- What the customer portal (role amr_portal) may read of them: no idempotency
-- key, no back-off bookkeeping.
CREATE VIEW portal_card_payment AS
    SELECT id, account, energy, penalty, energy + penalty AS amount, state, created_at, paid_at,
           provider, provider_payment_id
    FROM card_payment;

CREATE VIEW portal_card_receipt AS
    SELECT payment_id, number, issued_at, account, energy, penalty, amount, contact, contact_kind,
           supplier, provider, provider_payment_id
    FROM card_receipt;

GRANT SELECT ON portal_card_payment, portal_card_receipt TO amr_portal;

-- Payments that came through a bank's registry (migration 016), for the same
-- list of payments in the account: booked ones only (an unmatched one is no
-- account's yet), without payer, address or who matched it. Made only where
-- that table exists, so this migration does not depend on 016 being there.
DO $$
BEGIN
    IF to_regclass('registry_payment') IS NOT NULL THEN
        CREATE VIEW portal_registry_payment AS
            SELECT id, account, source, paid_on, energy, penalty, energy + penalty AS amount, created_at
            FROM registry_payment WHERE status = 'booked';
        GRANT SELECT ON portal_registry_payment TO amr_portal;
    END IF;
END
$$;
