-- The customer account's users (portal/): logins, sessions, one-time links, captcha
-- answers, attempt counters and the audit log.
--
-- Secrets are never stored as given: passwords as argon2id hashes (argon2-cffi),
-- session cookies, e-mail confirmation and password-reset tokens and captcha
-- answers as SHA-256. A database dump therefore opens no session and no link.
--
-- Rights. The pages run as a login role that is a member of amr_portal (011),
-- which may SELECT what the pages read here (not the captcha answers, not the
-- audit log) and writes nothing directly: every write is one of the narrow
-- SECURITY DEFINER functions below, each doing one thing the pages need
-- (create a user, change a password and revoke the sessions with it, use a
-- one-time token once, count an attempt, append to the audit log), executable
-- by amr_portal only. So a portal process taken over cannot rewrite a user's
-- consent record, un-use a token, delete audit rows or reset the counters of
-- another key than the one it names. It can read the password hashes, since
-- checking a password happens in Python (argon2); that is the one exposure
-- kept on purpose.

CREATE TABLE portal_user (
    id                  bigserial PRIMARY KEY,
    login               text NOT NULL CHECK (login ~ '^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$'),
    password_hash       text NOT NULL CHECK (password_hash LIKE '$argon2%'),
    email               text NOT NULL CHECK (length(email) BETWEEN 3 AND 254 AND position('@' IN email) > 1),
    email_confirmed_at  timestamptz,
    phone               text CHECK (phone IS NULL OR phone ~ '^\+7[0-9]{10}$'),
    -- the two consents are separate (152-FZ art. 9 as amended from 01.09.2025): what was
    -- accepted (the text's version) and when
    licence_version     text NOT NULL CHECK (licence_version <> ''),
    licence_accepted_at timestamptz NOT NULL,
    pd_consent_version  text NOT NULL CHECK (pd_consent_version <> ''),
    pd_consent_at       timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz NOT NULL DEFAULT now()
);
-- a login is unique whatever its case (Ivan and ivan are one login); it never changes
CREATE UNIQUE INDEX portal_user_login_key ON portal_user (lower(login));
CREATE INDEX portal_user_email_idx ON portal_user (lower(email));

CREATE TABLE portal_session (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES portal_user (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    remember    boolean NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    ip          text,
    user_agent  text
);
CREATE INDEX portal_session_user_idx ON portal_session (user_id) WHERE revoked_at IS NULL;

CREATE TABLE portal_token (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('confirm_email', 'reset_password')),
    user_id     bigint NOT NULL REFERENCES portal_user (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    email       text NOT NULL,          -- the address the link was sent to
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX portal_token_user_idx ON portal_token (user_id, kind) WHERE used_at IS NULL;

-- a captcha's answer, per form shown; the image is drawn when the form is (inline in the page)
CREATE TABLE portal_captcha (
    id_hash     bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    answer_hash bytea NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- attempts per key ("login:ivan", "login-ip:203.0.113.5", ...) in fixed windows
CREATE TABLE portal_rate_counter (
    key          text NOT NULL,
    window_s     integer NOT NULL CHECK (window_s > 0),
    window_start timestamptz NOT NULL,
    hits         integer NOT NULL,
    PRIMARY KEY (key, window_s, window_start)
);

CREATE TABLE portal_audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    user_id  bigint REFERENCES portal_user (id) ON DELETE SET NULL,
    action   text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}',
    ip       text
);
CREATE INDEX portal_audit_log_user_idx ON portal_audit_log (user_id, at);

-- --- the writes, one function each -------------------------------------------------

-- a new user; NULL when the login is taken (in any case)
CREATE FUNCTION portal_user_create(p_login text, p_password_hash text, p_email text, p_phone text,
                                   p_licence_version text, p_pd_version text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO portal_user (login, password_hash, email, phone, licence_version, licence_accepted_at,
                             pd_consent_version, pd_consent_at)
    VALUES (p_login, p_password_hash, p_email, p_phone, p_licence_version, now(), p_pd_version, now())
    ON CONFLICT ((lower(login))) DO NOTHING
    RETURNING id;
$$;

-- a new password: every session of the user ends and every reset link not yet used dies
CREATE FUNCTION portal_user_set_password(p_user bigint, p_password_hash text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    UPDATE portal_user SET password_hash = p_password_hash, password_changed_at = now() WHERE id = p_user;
    UPDATE portal_session SET revoked_at = now() WHERE user_id = p_user AND revoked_at IS NULL;
    UPDATE portal_token SET used_at = now()
        WHERE user_id = p_user AND kind = 'reset_password' AND used_at IS NULL;
$$;

-- a new e-mail address is unconfirmed until its own link is followed; older links die
CREATE FUNCTION portal_user_set_email(p_user bigint, p_email text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    UPDATE portal_user SET email = p_email, email_confirmed_at = NULL WHERE id = p_user AND email <> p_email;
    UPDATE portal_token SET used_at = now()
        WHERE user_id = p_user AND kind = 'confirm_email' AND used_at IS NULL AND email <> p_email;
$$;

CREATE FUNCTION portal_user_set_phone(p_user bigint, p_phone text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    UPDATE portal_user SET phone = p_phone WHERE id = p_user;
$$;

CREATE FUNCTION portal_session_create(p_user bigint, p_token_hash bytea, p_expires timestamptz,
                                      p_remember boolean, p_ip text, p_user_agent text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO portal_session (user_id, token_hash, remember, expires_at, ip, user_agent)
    VALUES (p_user, p_token_hash, p_remember, p_expires, p_ip, left(p_user_agent, 300))
    RETURNING id;
$$;

CREATE FUNCTION portal_session_revoke(p_token_hash bytea) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    UPDATE portal_session SET revoked_at = now() WHERE token_hash = p_token_hash AND revoked_at IS NULL;
$$;

-- "log out everywhere": every session of the user, this one included
CREATE FUNCTION portal_session_revoke_all(p_user bigint) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH r AS (UPDATE portal_session SET revoked_at = now()
               WHERE user_id = p_user AND revoked_at IS NULL RETURNING 1)
    SELECT count(*)::integer FROM r;
$$;

CREATE FUNCTION portal_token_create(p_kind text, p_user bigint, p_token_hash bytea, p_email text,
                                    p_expires timestamptz) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO portal_token (kind, user_id, token_hash, email, expires_at)
    VALUES (p_kind, p_user, p_token_hash, p_email, p_expires)
    RETURNING id;
$$;

-- use a one-time token: 'ok' once (an e-mail confirmation also confirms the address it
-- was sent to, if it is still the user's), then 'used'; 'expired', 'unknown'
CREATE FUNCTION portal_token_use(p_kind text, p_token_hash bytea, OUT status text, OUT user_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    t portal_token%ROWTYPE;
BEGIN
    SELECT * INTO t FROM portal_token WHERE kind = p_kind AND token_hash = p_token_hash FOR UPDATE;
    IF NOT FOUND THEN
        status := 'unknown';
        RETURN;
    END IF;
    user_id := t.user_id;
    IF t.used_at IS NOT NULL THEN
        status := 'used';
    ELSIF t.expires_at <= now() THEN
        status := 'expired';
    ELSE
        UPDATE portal_token SET used_at = now() WHERE id = t.id;
        IF p_kind = 'confirm_email' THEN
            UPDATE portal_user SET email_confirmed_at = now()
                WHERE id = t.user_id AND email = t.email AND email_confirmed_at IS NULL;
        END IF;
        status := 'ok';
    END IF;
END
$$;

CREATE FUNCTION portal_captcha_create(p_id_hash bytea, p_answer_hash bytea, p_expires timestamptz)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DELETE FROM portal_captcha WHERE expires_at < now();
    INSERT INTO portal_captcha (id_hash, answer_hash, expires_at) VALUES (p_id_hash, p_answer_hash, p_expires);
$$;

-- a captcha is answered once, right or wrong: the answer's hash, and the captcha is gone
CREATE FUNCTION portal_captcha_take(p_id_hash bytea) RETURNS bytea
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DELETE FROM portal_captcha WHERE id_hash = p_id_hash AND expires_at > now() RETURNING answer_hash;
$$;

-- count one attempt under a key: the window's count so far and the seconds until it ends
CREATE FUNCTION portal_rate_hit(p_key text, p_window_s integer, OUT hits integer, OUT retry_after_s integer)
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DELETE FROM portal_rate_counter
        WHERE window_start < now() - interval '2 days' - make_interval(secs => window_s)
          AND (SELECT random()) < 0.01;  -- now and then, old windows go
    INSERT INTO portal_rate_counter AS c (key, window_s, window_start, hits)
    VALUES (p_key, p_window_s, to_timestamp(floor(extract(epoch FROM now()) / p_window_s) * p_window_s), 1)
    ON CONFLICT (key, window_s, window_start) DO UPDATE SET hits = c.hits + 1
    RETURNING c.hits, greatest(1, ceil(extract(epoch FROM c.window_start + make_interval(secs => p_window_s)
                                                      - now())))::integer;
$$;

CREATE FUNCTION portal_rate_peek(p_key text, p_window_s integer, OUT hits integer, OUT retry_after_s integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce(max(c.hits), 0),
           greatest(1, ceil(extract(epoch FROM w.start + make_interval(secs => p_window_s) - now())))::integer
    FROM (SELECT to_timestamp(floor(extract(epoch FROM now()) / p_window_s) * p_window_s) AS start) w
    LEFT JOIN portal_rate_counter c
        ON c.key = p_key AND c.window_s = p_window_s AND c.window_start = w.start
    GROUP BY w.start;
$$;

CREATE FUNCTION portal_rate_clear(p_key text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DELETE FROM portal_rate_counter WHERE key = p_key;
$$;

CREATE FUNCTION portal_audit(p_user bigint, p_action text, p_detail jsonb, p_ip text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    INSERT INTO portal_audit_log (user_id, action, detail, ip) VALUES (p_user, p_action, p_detail, p_ip);
$$;

-- functions are executable by PUBLIC unless revoked: these only by amr_portal (and the owner)
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'public' AND p.proname IN (
                 'portal_user_create', 'portal_user_set_password', 'portal_user_set_email',
                 'portal_user_set_phone', 'portal_session_create', 'portal_session_revoke',
                 'portal_session_revoke_all', 'portal_token_create', 'portal_token_use',
                 'portal_captcha_create', 'portal_captcha_take',
                 'portal_rate_hit', 'portal_rate_peek', 'portal_rate_clear', 'portal_audit')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO amr_portal', f);
    END LOOP;
END
$$;

GRANT SELECT ON portal_user, portal_session, portal_token, portal_rate_counter TO amr_portal;
