-- Migration 0004: the web console's sign-in sessions and its sign-in rate limit.

-- A console session: the browser holds a random token in a cookie; only its SHA-256 digest is stored. An admin
-- session is bound to the admin token it was opened with (`token_digest`): a changed token ends it. A customer
-- session is bound to its key, and ends when the key is revoked. `csrf` is the token every form posts back.
CREATE TABLE console_sessions (
    digest       bytea PRIMARY KEY CHECK (octet_length(digest) = 32),
    kind         text NOT NULL CHECK (kind IN ('admin', 'customer')),
    token_digest bytea CHECK (octet_length(token_digest) = 32),
    key_id       text REFERENCES api_keys (id),
    account_id   text REFERENCES accounts (id),
    csrf         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    CHECK ((kind = 'customer') = (key_id IS NOT NULL AND account_id IS NOT NULL)),
    CHECK ((kind = 'admin') = (token_digest IS NOT NULL))
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);

-- Sign-in attempts per client and window. An attempt is counted before it is checked, and only while the client
-- is under the limit (one conditional upsert, so concurrent attempts cannot slip past it); a successful sign-in
-- clears the client's count, so what is limited is failures.
CREATE TABLE console_signin_attempts (
    client       text NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer NOT NULL CHECK (count >= 0),
    PRIMARY KEY (client, window_start)
);

CREATE OR REPLACE FUNCTION meterline_signin_attempt(p_client text, p_limit integer, p_window_seconds integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_start timestamptz := to_timestamp(floor(extract(epoch FROM now()) / p_window_seconds) * p_window_seconds);
BEGIN
    DELETE FROM console_signin_attempts WHERE client = p_client AND window_start < v_start;
    INSERT INTO console_signin_attempts AS a (client, window_start, count) VALUES (p_client, v_start, 1)
    ON CONFLICT (client, window_start) DO UPDATE SET count = a.count + 1 WHERE a.count < p_limit;
    RETURN FOUND;
END $$;
