-- The customer account's links between a login (portal_user, migration 020) and the
-- subscriber accounts it may see: several accounts per login, one row each, made by
-- "Добавить абонента" after the proof of possession (portal/linking.py) and removed
-- by unlinking. The pages read links through the table (amr_portal may SELECT it)
-- and write them only through the two SECURITY DEFINER functions below, so the
-- role the pages run as cannot link an account by any other way. Throttling of
-- wrong proofs uses the portal's rate counters (migration 020, portal_rate_hit).
CREATE TABLE portal_account_link (
    user_id   bigint NOT NULL REFERENCES portal_user (id),
    account   text NOT NULL REFERENCES subscriber (account),
    linked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, account)
);
CREATE INDEX portal_account_link_account_idx ON portal_account_link (account);

CREATE FUNCTION portal_link_account(p_user bigint, p_account text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO portal_account_link (user_id, account) VALUES (p_user, p_account)
        ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

CREATE FUNCTION portal_unlink_account(p_user bigint, p_account text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM portal_account_link WHERE user_id = p_user AND account = p_account;
    RETURN FOUND;
END
$$;

-- The payments a proof of possession is checked against: one row per payment in the
-- ledger (its energy and penalty entries together, by their idempotency key less the
-- component), not reversed, with whether it came through a third party (a bank's or
-- agent's registry: key registry:...). Amounts are what was paid (above zero). The
-- payment history (billing.payments.account_payments) lists the ones that came neither
-- by card nor by a registry (a cash desk, an operator's booking) from here too.
CREATE VIEW portal_payment_proof AS
    SELECT e.account, regexp_replace(e.idempotency_key, ':(energy|penalty)$', '') AS payment,
           min(e.booked_on) AS paid_on, -sum(e.amount) AS amount,
           coalesce(-sum(e.amount) FILTER (WHERE e.component = 'energy'), 0) AS energy,
           coalesce(-sum(e.amount) FILTER (WHERE e.component = 'penalty'), 0) AS penalty,
           bool_or(e.idempotency_key LIKE 'registry:%') AS third_party, min(e.id) AS first_entry
    FROM ledger_entry e
    WHERE e.kind = 'payment'
      AND NOT EXISTS (SELECT FROM ledger_entry r WHERE r.reverses = e.id)
    GROUP BY e.account, regexp_replace(e.idempotency_key, ':(energy|penalty)$', '');

REVOKE ALL ON FUNCTION portal_link_account(bigint, text), portal_unlink_account(bigint, text) FROM PUBLIC;
GRANT SELECT ON portal_account_link, portal_payment_proof TO amr_portal;
GRANT EXECUTE ON FUNCTION portal_link_account(bigint, text), portal_unlink_account(bigint, text) TO amr_portal;
