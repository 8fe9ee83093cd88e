-- What the readings form of the customer account needs to know of a meter in service:
-- its adapter and the registers its inventory configures (meter.config's `registers`),
-- and nothing else of its configuration (which may hold a meter's password or its
-- address on a network). The pages' role (amr_portal) reads meters only through views.

CREATE VIEW portal_meter_entry AS
    SELECT id AS meter_id, account, adapter, installed,
           jsonb_build_object('registers', config -> 'registers') AS config
    FROM meter
    WHERE removed IS NULL;

GRANT SELECT ON portal_meter_entry TO amr_portal;
