-- Bank payment registries (billing/registry.py, `amr payments import`).
-- registry_file: one row per import of a file (its name, sha256, source,
-- layout, counts, what was refused and why), so an operator can tell what
-- came in and when, and a file sent twice is recognised.
CREATE TABLE registry_file (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    source      text NOT NULL,
    layout      text NOT NULL,
    encoding    text NOT NULL,
    rows        integer NOT NULL CHECK (rows >= 0),
    total       numeric(14, 2) NOT NULL,
    booked      integer NOT NULL CHECK (booked >= 0),
    duplicate   integer NOT NULL CHECK (duplicate >= 0),
    unmatched   integer NOT NULL CHECK (unmatched >= 0),
    refused     integer NOT NULL CHECK (refused >= 0),
    refusals    jsonb NOT NULL DEFAULT '[]',
    imported_by text NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX registry_file_checksum_idx ON registry_file (checksum);

-- registry_payment: each payment a registry brought, once per (source,
-- operation id): booked (its ledger entries are keyed
-- registry:<source>:<operation id>:energy|penalty) or unmatched (no account
-- of ours; waiting for `amr payments match`, which books it and records who
-- matched it). paid_on is the operation date, the day the payment counts
-- from (penalties); account_given is the number as the file spelled it.
-- No foreign keys on account and file_id: a per-row check costs as much as
-- the rest of the row's insert (a million rows per registry), and both are
-- written by billing/registry.py alone: file_id in the same transaction as
-- its registry_file row (never deleted), account after looking it up, and a
-- booked payment's ledger entries reference the subscriber through their own
-- foreign key.
CREATE TABLE registry_payment (
    id            bigserial PRIMARY KEY,
    file_id       bigint NOT NULL,
    line          integer NOT NULL,
    source        text NOT NULL,
    operation_id  text NOT NULL,
    account       text,
    account_given text NOT NULL,
    paid_on       date NOT NULL,
    paid_time     time,
    branch        text,
    payer         text,
    address       text,
    period        date CHECK (period IS NULL OR extract(day FROM period) = 1),
    energy        numeric(14, 2) NOT NULL CHECK (energy >= 0),
    penalty       numeric(14, 2) NOT NULL DEFAULT 0 CHECK (penalty >= 0),
    status        text NOT NULL CHECK (status IN ('booked', 'unmatched')),
    matched_by    text,
    matched_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, operation_id),
    CHECK (energy + penalty > 0),
    CHECK ((status = 'booked') = (account IS NOT NULL))
);
CREATE INDEX registry_payment_account_idx ON registry_payment (account, paid_on);
CREATE INDEX registry_payment_unmatched_idx ON registry_payment (id) WHERE status = 'unmatched';
