-- Meterline's whole schema, as the numbered migrations in billing/migrations/ build it (`meterline migrate`, and
-- every start, apply the pending ones and record them in meterline_migrations). This file is for reading, and for
-- creating an empty database in one go: tests/test_schema.py proves it builds exactly what the migrations build.
--
-- Money model (TigerBeetle-style double entry, integer micros = 1/1,000,000 USD):
--   * Every movement is one row in `transfers`: `amount_micros` leaves `debit_account_id` and enters
--     `credit_account_id`, so the sum of all account balances is zero by construction.
--   * Customer accounts cache `credits_posted`, `debits_posted` and `held_micros` so that a reservation is one
--     locked row, decided inside PostgreSQL. balance = credits_posted - debits_posted; available = balance - held.
--   * Operator accounts (revenue, funding, adjustments, promotions, expired) keep no cached balance (a CHECK pins
--     the columns to 0): their balance is the sum of their transfers, so no request ever locks a shared operator
--     row.
--   * `transfers` is append-only (triggers refuse UPDATE, DELETE and TRUNCATE); corrections are new transfers.
--   * `holds` are two-phase pending amounts. A hold moves exactly once out of `pending` (to settled, voided or
--     expired), plus one late move expired -> settled so that a charge that completes after its hold expired is
--     still posted. Every move is a conditional UPDATE on the locked hold row, so it happens once.
--   * Every credit is a `credit_grants` row (paid or promotional, with a priority, an effective time and an
--     optional expiry). Charges and debits draw on the grants in the spending order inside the statement that
--     posts them, and an expiry is a transfer of the unspent remainder to op_expired.

CREATE TABLE accounts (
    id             text PRIMARY KEY,
    kind           text NOT NULL
                   CHECK (kind IN ('customer', 'revenue', 'funding', 'adjustments', 'promotions', 'expired')),
    name           text NOT NULL,
    credits_posted bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_posted  bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    held_micros    bigint NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- balance.low webhooks: the threshold (NULL: none) and when the alert for the current dip was written.
    low_balance_micros     bigint CHECK (low_balance_micros >= 0),
    low_balance_alerted_at timestamptz,
    -- The Stripe customer this account pays as (issue 16), created once on its first checkout.
    stripe_customer_id     text UNIQUE,
    -- Auto top-up (issue 16): the enabled rule's threshold (NULL: no enabled rule), and when a charge took the
    -- available balance below it (NULL: armed). A copy of the rule's threshold so a charge reads no other table.
    auto_topup_micros      bigint,
    auto_topup_fired_at    timestamptz,
    -- Credit grants (issue 16): when one of its grants next takes effect or expires (NULL: none will), so that a
    -- money step brings the account's grants to the clock (meterline_grants_due) with one comparison.
    grants_due_at          timestamptz,
    -- The card the account last paid a checkout with, saved to its Stripe customer for off-session use: what an
    -- auto top-up rule charges unless it names another.
    stripe_payment_method  text,
    CHECK (kind = 'customer' OR (credits_posted = 0 AND debits_posted = 0 AND held_micros = 0))
);
CREATE INDEX accounts_grants_due ON accounts (grants_due_at) WHERE grants_due_at IS NOT NULL;

-- Seed rows every database needs (the operator accounts). Tests call it again after emptying the tables.
CREATE OR REPLACE FUNCTION meterline_seed() RETURNS void LANGUAGE sql AS $$
    INSERT INTO accounts (id, kind, name) VALUES
        ('op_revenue', 'revenue', 'Revenue'),
        ('op_funding', 'funding', 'Top-up funding'),
        ('op_adjustments', 'adjustments', 'Manual adjustments'),
        ('op_promotions', 'promotions', 'Promotional credit'),
        ('op_expired', 'expired', 'Expired credit')
    ON CONFLICT (id) DO NOTHING;
$$;
SELECT meterline_seed();

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    name        text,
    prefix      text NOT NULL,
    digest      bytea NOT NULL UNIQUE CHECK (octet_length(digest) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    -- Per-key limits. A spend limit is enforced inside meterline_reserve under the same locks as the balance: the
    -- key row caches its spend in the current window and its pending holds, like an account does. Windows start
    -- at 00:00 UTC; weeks start on Monday (date_trunc('week')). A NULL limit_reset never resets.
    limit_micros        bigint CHECK (limit_micros >= 0),
    limit_reset         text CHECK (limit_reset IN ('daily', 'weekly', 'monthly')),
    window_start        timestamptz,
    window_spent_micros bigint NOT NULL DEFAULT 0,
    held_micros         bigint NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    rpm_limit           integer CHECK (rpm_limit BETWEEN 1 AND 1000),
    rpd_limit           integer CHECK (rpd_limit BETWEEN 1 AND 10000),
    -- lumyx's Detailed Logging: on, the key's chats are stored as conversations and may use memory.
    detailed_logging    boolean NOT NULL DEFAULT false
);
CREATE INDEX api_keys_account ON api_keys (account_id, created_at);

CREATE TABLE transfers (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The customer side of the transfer (every kind we write has exactly one), for per-account reads.
    account_id           text NOT NULL REFERENCES accounts (id),
    debit_account_id     text NOT NULL REFERENCES accounts (id),
    credit_account_id    text NOT NULL REFERENCES accounts (id),
    amount_micros        bigint NOT NULL CHECK (amount_micros >= 0),
    kind                 text NOT NULL
                         CHECK (kind IN ('topup', 'adjustment', 'charge', 'grant', 'expiry', 'refund')),
    -- One charge per request, ever: this key is what makes a double charge impossible.
    request_id           text UNIQUE,
    description          text,
    overrun_micros       bigint NOT NULL DEFAULT 0 CHECK (overrun_micros >= 0),
    estimated            boolean NOT NULL DEFAULT false,
    balance_after_micros bigint NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    grant_id             text,  -- the credit grant a grant's credit or an expiry moves (issue 16)
    CHECK (debit_account_id <> credit_account_id),
    CHECK (account_id IN (debit_account_id, credit_account_id)),
    CHECK ((kind = 'charge') = (request_id IS NOT NULL))
);
CREATE INDEX transfers_account ON transfers (account_id, id);
CREATE INDEX transfers_created ON transfers (created_at, id);

CREATE OR REPLACE FUNCTION meterline_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'ML002';
END $$;
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION meterline_append_only();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION meterline_append_only();

CREATE TABLE holds (
    request_id     text PRIMARY KEY,
    account_id     text NOT NULL REFERENCES accounts (id),
    key_id         text,
    amount_micros  bigint NOT NULL CHECK (amount_micros >= 0),
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'settled', 'voided', 'expired')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    resolved_at    timestamptz,
    actual_micros  bigint CHECK (actual_micros >= 0),
    overrun_micros bigint NOT NULL DEFAULT 0 CHECK (overrun_micros >= 0),
    expired_first  boolean NOT NULL DEFAULT false,
    reason         text,
    -- Whether this hold counts against its key's cached held_micros (the key had a limit when it was made), so
    -- that releasing it later is exact even if the limit was changed in between.
    key_limited    boolean NOT NULL DEFAULT false,
    quota_id       text,  -- the quota a call was charged under (NULL: its own per-call hold; issue 17)
    CHECK ((state = 'pending') = (resolved_at IS NULL)),
    CHECK ((state = 'settled') = (actual_micros IS NOT NULL))
);
CREATE INDEX holds_pending_expiry ON holds (expires_at) WHERE state = 'pending';
CREATE INDEX holds_account ON holds (account_id, created_at);
CREATE INDEX holds_key ON holds (key_id, created_at) WHERE key_id IS NOT NULL;

-- A hold only ever leaves `pending`, or goes expired -> settled (a late charge). Nothing else moves it.
CREATE OR REPLACE FUNCTION meterline_hold_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'holds are never deleted' USING ERRCODE = 'ML002';
    END IF;
    IF NOT (OLD.state = 'pending' OR (OLD.state = 'expired' AND NEW.state = 'settled'))
       OR NEW.amount_micros <> OLD.amount_micros OR NEW.account_id <> OLD.account_id THEN
        RAISE EXCEPTION 'hold % cannot move from % to %', OLD.request_id, OLD.state, NEW.state
            USING ERRCODE = 'ML002';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holds_transition BEFORE UPDATE OR DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION meterline_hold_transition();
CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON holds
    FOR EACH STATEMENT EXECUTE FUNCTION meterline_append_only();

-- Quota grants (issue 17, billing.quotas): a gateway process's durable hold on an account, spent call by call in
-- memory and charged as each call ends. The sum of holds and quotas never exceeds the available balance.
CREATE TABLE quotas (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    holder           text NOT NULL,  -- the gateway process (host, pid and start), for operators
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'returned', 'expired')),
    -- Held on the account now: what its calls may still draw. 0 once returned or expired.
    amount_micros    bigint NOT NULL CHECK (amount_micros >= 0),
    granted_micros   bigint NOT NULL CHECK (granted_micros >= 0),   -- every micro ever added to it
    drawn_micros     bigint NOT NULL DEFAULT 0 CHECK (drawn_micros >= 0),  -- taken from it by its calls' charges
    released_micros  bigint NOT NULL DEFAULT 0 CHECK (released_micros >= 0),  -- given back, shrunk, expired
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    resolved_at      timestamptz,
    -- The intent record: the calls admitted under it and not yet charged, as of in_flight_at
    -- ([{"id", "micros", "at"}]), written by the holder's beat.
    in_flight        jsonb NOT NULL DEFAULT '[]',
    in_flight_at     timestamptz,
    -- Another process was refused a hold on the account and asks the holder for its room back
    -- (meterline_quota_recall); cleared when the holder gives it back.
    recalled_at      timestamptz,
    CHECK ((state = 'pending') = (resolved_at IS NULL)),
    CHECK (state = 'pending' OR amount_micros = 0),
    CHECK (granted_micros = drawn_micros + released_micros + amount_micros)
);
CREATE INDEX quotas_pending_expiry ON quotas (expires_at) WHERE state = 'pending';
CREATE INDEX quotas_account ON quotas (account_id, created_at);
CREATE INDEX quotas_recalled ON quotas (holder) WHERE recalled_at IS NOT NULL AND state = 'pending';

-- One row per billed call, written in the same transaction as its settlement or void.
CREATE TABLE requests (
    id                   text PRIMARY KEY,
    account_id           text NOT NULL REFERENCES accounts (id),
    key_id               text,
    model                text,
    modality             text,
    endpoint             text,
    upstream             text,
    status               text NOT NULL,
    billing_status       text NOT NULL,
    error_code           text,
    error_message        text,
    "user"               text,
    prompt_tokens        bigint,
    completion_tokens    bigint,
    cached_tokens        bigint,
    reasoning_tokens     bigint,
    quantity             bigint,
    hold_micros          bigint,
    cost_micros          bigint NOT NULL DEFAULT 0 CHECK (cost_micros >= 0),
    upstream_cost_micros bigint,
    estimated            boolean NOT NULL DEFAULT false,
    overrun_micros       bigint NOT NULL DEFAULT 0,
    usage                jsonb,
    duration_ms          integer,
    created_at           timestamptz NOT NULL,
    finished_at          timestamptz NOT NULL DEFAULT now(),
    client_request_id    text,  -- the caller's own X-Request-Id, when it sent a usable one
    provider             text,  -- the provider that served the call (a model with several: issue 15)
    provider_model       text,  -- the model id that provider was sent
    attempts             jsonb,  -- every provider tried: [{provider, upstream_status, error_code, duration_ms}]
    generation_id        text  -- the upstream's own id of the call (OpenRouter's gen-..., a video job's id)
);
CREATE INDEX requests_account_created ON requests (account_id, created_at DESC, id DESC);
CREATE INDEX requests_created ON requests (created_at, id);
CREATE INDEX requests_account_client_request ON requests (account_id, client_request_id)
    WHERE client_request_id IS NOT NULL;
CREATE INDEX requests_account_generation ON requests (account_id, generation_id) WHERE generation_id IS NOT NULL;

CREATE TABLE idempotency_keys (
    scope         text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status_code   integer,
    response      jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Gateways cache authenticated keys and LISTEN here (billing.keys.follow_key_changes): every change to what they
-- cache (revocation, request limits, whether it has a spend limit, a new key) is announced with the key's digest,
-- after commit. Spend counters (held_micros, window_*) are not in the column list, so the money hot path never
-- notifies.
CREATE OR REPLACE FUNCTION meterline_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('meterline_keys',
                      encode(CASE WHEN TG_OP = 'INSERT' THEN NEW.digest ELSE OLD.digest END, 'hex'));
    RETURN NULL;
END $$;
CREATE TRIGGER api_keys_changed
    AFTER INSERT OR DELETE OR UPDATE OF account_id, name, prefix, digest, revoked_at, rpm_limit, rpd_limit,
        detailed_logging, limit_micros
    ON api_keys FOR EACH ROW EXECUTE FUNCTION meterline_key_changed();

-- The clock for limit windows: `SET meterline.now = '...'` pins it (tests, replays); otherwise now().
CREATE OR REPLACE FUNCTION meterline_now() RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT COALESCE(NULLIF(current_setting('meterline.now', true), '')::timestamptz, now());
$$;

-- Start of the limit window containing p_at (UTC); 'epoch' for a limit that never resets.
CREATE OR REPLACE FUNCTION meterline_window_start(p_reset text, p_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_reset
        WHEN 'daily' THEN date_trunc('day', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        WHEN 'weekly' THEN date_trunc('week', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        WHEN 'monthly' THEN date_trunc('month', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        ELSE 'epoch'::timestamptz END;
$$;

-- When the window containing p_at ends; 'infinity' for a limit that never resets.
CREATE OR REPLACE FUNCTION meterline_window_end(p_reset text, p_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_reset IS NULL THEN 'infinity'::timestamptz
        ELSE meterline_window_start(p_reset, p_at) + CASE p_reset
            WHEN 'daily' THEN interval '1 day' WHEN 'weekly' THEN interval '1 week' ELSE interval '1 month' END
        END;
$$;

-- What a key with a spend limit has left in its current window for new holds (its limit less its pending holds
-- and what it spent in this window).
CREATE OR REPLACE FUNCTION meterline_key_left(k api_keys) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT k.limit_micros - k.held_micros - CASE
        WHEN k.window_start IS NOT DISTINCT FROM meterline_window_start(k.limit_reset, meterline_now())
        THEN k.window_spent_micros ELSE 0 END;
$$;

-- Release a resolved hold from its key and add the charge to the key's current window. Called with the
-- account row already locked (every path locks the account before the key, so keys cannot deadlock). A charge that
-- takes the key's spend in its window across 80, 90 or 100% of its limit writes a `key.limit_threshold` webhook
-- event, each threshold once per window (the event's dedupe names the window).
CREATE OR REPLACE FUNCTION meterline_key_release(p_hold holds, p_release bigint, p_actual bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_key api_keys;
    v_pct integer;
BEGIN
    IF p_hold.key_id IS NULL THEN
        RETURN;
    END IF;
    UPDATE api_keys k
       SET held_micros = k.held_micros - CASE WHEN p_hold.key_limited THEN p_release ELSE 0 END,
           window_spent_micros = CASE WHEN p_actual = 0 THEN k.window_spent_micros
               WHEN k.window_start IS NOT DISTINCT FROM meterline_window_start(k.limit_reset, meterline_now())
               THEN k.window_spent_micros + p_actual ELSE p_actual END,
           window_start = CASE WHEN p_actual = 0 THEN k.window_start
               ELSE meterline_window_start(k.limit_reset, meterline_now()) END
     WHERE k.id = p_hold.key_id
       AND (p_hold.key_limited OR (k.limit_micros IS NOT NULL AND p_actual > 0))
    RETURNING * INTO v_key;
    IF NOT FOUND OR p_actual = 0 OR NOT v_key.limit_micros > 0 THEN
        RETURN;
    END IF;
    FOREACH v_pct IN ARRAY ARRAY[80, 90, 100] LOOP
        IF (v_key.window_spent_micros - p_actual) * 100 < v_key.limit_micros * v_pct
           AND v_key.window_spent_micros * 100 >= v_key.limit_micros * v_pct THEN
            PERFORM meterline_webhook_emit(v_key.account_id, 'key.limit_threshold', jsonb_build_object(
                'key_id', v_key.id, 'threshold_percent', v_pct, 'limit_micros', v_key.limit_micros,
                'window_spent_micros', v_key.window_spent_micros, 'limit_reset', v_key.limit_reset,
                'window_start', v_key.window_start,
                'resets_at', meterline_window_end(v_key.limit_reset, meterline_now())),
                'key.limit_threshold:' || v_key.id || ':' || v_key.window_start || ':' || v_pct, NULL);
        END IF;
    END LOOP;
END $$;

-- Rate limits: one counter row per key, kind and window, bumped only while under the limit. Both windows are
-- decided in one call; a request refused by either window is counted in neither.
CREATE TABLE rate_windows (
    key_id       text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('minute', 'day')),
    window_start timestamptz NOT NULL,
    count        integer NOT NULL CHECK (count >= 0),
    PRIMARY KEY (key_id, kind, window_start)
);

CREATE OR REPLACE FUNCTION meterline_rate_bump(
    p_key_id text, p_kind text, p_start timestamptz, p_limit integer
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count    integer;
    v_inserted boolean;
BEGIN
    INSERT INTO rate_windows AS r (key_id, kind, window_start, count) VALUES (p_key_id, p_kind, p_start, 1)
    ON CONFLICT (key_id, kind, window_start) DO UPDATE SET count = r.count + 1 WHERE r.count < p_limit
    RETURNING r.count, (r.xmax = 0) INTO v_count, v_inserted;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_inserted THEN  -- a new window: the key's older windows are finished
        DELETE FROM rate_windows WHERE key_id = p_key_id AND kind = p_kind AND window_start < p_start;
    END IF;
    RETURN v_count;
END $$;

-- Count one request against the key's per-minute and per-day limits (NULL = no limit). allowed = false leaves
-- both counters as they were. The counts returned are the ones in force after this call.
CREATE OR REPLACE FUNCTION meterline_rate_hit(p_key_id text, p_rpm integer, p_rpd integer)
RETURNS TABLE (allowed boolean, minute_count integer, minute_reset timestamptz,
               day_count integer, day_reset timestamptz, at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := meterline_now();
    v_minute timestamptz := date_trunc('minute', v_now);
    v_day    timestamptz := meterline_window_start('daily', v_now);
    v_m      integer;
    v_d      integer;
BEGIN
    IF p_rpm IS NOT NULL THEN
        v_m := meterline_rate_bump(p_key_id, 'minute', v_minute, p_rpm);
        IF v_m IS NULL THEN
            RETURN QUERY SELECT false, p_rpm, v_minute + interval '1 minute',
                (SELECT r.count FROM rate_windows r WHERE r.key_id = p_key_id AND r.kind = 'day'
                    AND r.window_start = v_day), v_day + interval '1 day', v_now;
            RETURN;
        END IF;
    END IF;
    IF p_rpd IS NOT NULL THEN
        v_d := meterline_rate_bump(p_key_id, 'day', v_day, p_rpd);
        IF v_d IS NULL THEN
            IF v_m IS NOT NULL THEN  -- refused by the day: give the minute its request back
                UPDATE rate_windows r SET count = r.count - 1
                 WHERE r.key_id = p_key_id AND r.kind = 'minute' AND r.window_start = v_minute;
                v_m := v_m - 1;
            END IF;
            RETURN QUERY SELECT false, v_m, v_minute + interval '1 minute', p_rpd, v_day + interval '1 day', v_now;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT true, v_m, v_minute + interval '1 minute', v_d, v_day + interval '1 day', v_now;
END $$;

-- reserve: hold between p_min and p_max micros (as much of p_max as the balance allows, never less than p_min).
-- The account row is locked, so concurrent reservations from any number of processes queue here and each sees
-- the balance the previous one left. Returns granted = NULL when refused (available tells why; NULL account
-- fields mean no such customer account).
CREATE OR REPLACE FUNCTION meterline_reserve(
    p_request_id text, p_account_id text, p_min bigint, p_max bigint, p_ttl_ms bigint, p_key_id text
) RETURNS TABLE (granted bigint, available bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_available bigint;
    v_granted   bigint;
    v_expires   timestamptz;
    k           api_keys;
    v_key_left  bigint;
    v_due       timestamptz;
BEGIN
    IF p_min < 0 OR p_max < p_min OR p_ttl_ms <= 0 THEN
        RAISE EXCEPTION 'bad reservation: min %, max %, ttl % ms', p_min, p_max, p_ttl_ms USING ERRCODE = '22023';
    END IF;
    SELECT a.credits_posted - a.debits_posted - a.held_micros, a.grants_due_at INTO v_available, v_due
      FROM accounts a WHERE a.id = p_account_id AND a.kind = 'customer' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_due <= meterline_now() THEN  -- a grant's effective time or expiry has come: the balance moves first
        PERFORM meterline_grants_due(p_account_id);
        SELECT a.credits_posted - a.debits_posted - a.held_micros INTO v_available
          FROM accounts a WHERE a.id = p_account_id;
    END IF;
    -- A zero hold is refused on a negative balance too: an overrun debt must be paid before new work.
    IF v_available < p_min OR v_available < 0 THEN
        RETURN QUERY SELECT NULL::bigint, v_available, NULL::timestamptz;
        RETURN;
    END IF;
    v_granted := LEAST(v_available, p_max);
    -- A key with a spend limit is locked after its account (the order every path uses) and grants at most what
    -- is left in its window. A refusal because of the key returns granted = NULL with expires_at = when the
    -- key's window resets ('infinity' if never) and available = what the key has left.
    IF p_key_id IS NOT NULL THEN
        SELECT * INTO k FROM api_keys WHERE id = p_key_id AND limit_micros IS NOT NULL FOR UPDATE;
        IF FOUND THEN
            v_key_left := meterline_key_left(k);
            IF v_key_left < p_min OR v_key_left < 0 THEN
                RETURN QUERY SELECT NULL::bigint, v_key_left, meterline_window_end(k.limit_reset, meterline_now());
                RETURN;
            END IF;
            v_granted := LEAST(v_granted, v_key_left);
            UPDATE api_keys SET held_micros = held_micros + v_granted WHERE id = p_key_id;
        END IF;
    END IF;
    UPDATE accounts SET held_micros = held_micros + v_granted WHERE id = p_account_id;
    INSERT INTO holds (request_id, account_id, key_id, amount_micros, expires_at, key_limited)
    VALUES (p_request_id, p_account_id, p_key_id, v_granted, now() + p_ttl_ms * interval '1 millisecond',
            k.id IS NOT NULL)
    RETURNING holds.expires_at INTO v_expires;
    RETURN QUERY SELECT v_granted, v_available - v_granted, v_expires;
END $$;

-- Fill the money fields of a request record from the ledger's truth and store it (first write wins), and count it
-- in its day's rollup. The record's own fields are read by name (keys that are not columns are ignored; money
-- fields always come from the ledger): a column list, not jsonb_populate_record over merged objects, which cost
-- about 30 µs more per settlement.
CREATE OR REPLACE FUNCTION meterline_record(
    p_request_id text, p_hold holds, p_billing_status text, p_cost bigint, p_estimated boolean,
    p_overrun bigint, p_record jsonb
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_record IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO requests (id, account_id, key_id, model, modality, endpoint, upstream, status, billing_status,
                          error_code, error_message, "user", prompt_tokens, completion_tokens, cached_tokens,
                          reasoning_tokens, quantity, hold_micros, cost_micros, upstream_cost_micros, estimated,
                          overrun_micros, usage, duration_ms, created_at, client_request_id, provider,
                          provider_model, attempts, generation_id)
    VALUES (p_request_id, p_hold.account_id, p_hold.key_id, p_record->>'model', p_record->>'modality',
            p_record->>'endpoint', p_record->>'upstream', COALESCE(p_record->>'status', 'completed'),
            p_billing_status, p_record->>'error_code', p_record->>'error_message', p_record->>'user',
            (p_record->>'prompt_tokens')::bigint, (p_record->>'completion_tokens')::bigint,
            (p_record->>'cached_tokens')::bigint, (p_record->>'reasoning_tokens')::bigint,
            (p_record->>'quantity')::bigint, p_hold.amount_micros, p_cost,
            (p_record->>'upstream_cost_micros')::bigint, p_estimated, p_overrun,
            NULLIF(p_record->'usage', 'null'::jsonb), (p_record->>'duration_ms')::integer, p_hold.created_at,
            p_record->>'client_request_id', p_record->>'provider', p_record->>'provider_model',
            NULLIF(p_record->'attempts', 'null'::jsonb), p_record->>'generation_id')
    ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN  -- recorded already: counted already
        RETURN;
    END IF;
    -- The record's finished_at is now(), as is its transfer's created_at: the day is theirs.
    INSERT INTO usage_daily AS u (day, account_id, key_id, model, modality, requests, errors, prompt_tokens,
                                  completion_tokens, cost_micros)
    VALUES ((now() AT TIME ZONE 'UTC')::date, p_hold.account_id, COALESCE(p_hold.key_id, ''),
            COALESCE(p_record->>'model', ''), COALESCE(p_record->>'modality', ''), 1,
            (COALESCE(p_record->>'status', 'completed') = 'upstream_failure')::integer,
            COALESCE((p_record->>'prompt_tokens')::bigint, 0), COALESCE((p_record->>'completion_tokens')::bigint, 0),
            p_cost)
    ON CONFLICT (day, account_id, key_id, model, modality) DO UPDATE
       SET requests = u.requests + 1, errors = u.errors + EXCLUDED.errors,
           prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
           completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
           cost_micros = u.cost_micros + EXCLUDED.cost_micros;
END $$;

-- The charge itself, shared by a per-call hold's settlement and a quota call's: release what was held for it, post
-- the charge to revenue, draw it from the credit grants, and fire what crossing a threshold fires. Returns the
-- balance after it.
CREATE OR REPLACE FUNCTION meterline_charge(
    p_account_id text, p_request_id text, p_release bigint, p_actual bigint, p_overrun bigint, p_estimated boolean
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
    v_held    bigint;
    v_low     bigint;
    v_alerted timestamptz;
    v_topup   timestamptz;
    v_due     timestamptz;
BEGIN
    UPDATE accounts a
       SET held_micros = a.held_micros - p_release, debits_posted = a.debits_posted + p_actual,
           low_balance_alerted_at = CASE WHEN a.low_balance_alerted_at IS NULL
               AND a.credits_posted - a.debits_posted - p_actual - a.held_micros + p_release < a.low_balance_micros
               THEN now() ELSE a.low_balance_alerted_at END,
           auto_topup_fired_at = CASE WHEN a.auto_topup_fired_at IS NULL
               AND a.credits_posted - a.debits_posted - p_actual - a.held_micros + p_release < a.auto_topup_micros
               THEN now() ELSE a.auto_topup_fired_at END
     WHERE a.id = p_account_id
    RETURNING a.credits_posted - a.debits_posted, a.held_micros, a.low_balance_micros, a.low_balance_alerted_at,
              a.auto_topup_fired_at, a.grants_due_at
         INTO v_balance, v_held, v_low, v_alerted, v_topup, v_due;
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, request_id,
                           overrun_micros, estimated, balance_after_micros)
    VALUES (p_account_id, p_account_id, 'op_revenue', p_actual, 'charge', p_request_id,
            p_overrun, p_estimated, v_balance);
    IF p_actual > 0 THEN  -- the charge is drawn from the account's grants in the spending order
        PERFORM meterline_grants_draw(p_account_id, p_actual, false);
    END IF;
    IF v_due <= meterline_now() THEN  -- an expiry waiting on this hold, or a grant's time come
        PERFORM meterline_grants_due(p_account_id);
    END IF;
    IF v_alerted = now() THEN  -- crossed below by this charge (or another of this transaction: deduplicated)
        PERFORM meterline_webhook_emit(p_account_id, 'balance.low', jsonb_build_object(
            'account_id', p_account_id, 'available_micros', v_balance - v_held, 'balance_micros', v_balance,
            'threshold_micros', v_low), 'balance.low:' || p_account_id || ':' || v_alerted, NULL);
    END IF;
    IF v_topup = now() THEN  -- crossed below the auto top-up threshold: the trigger is recorded with the charge
        PERFORM meterline_auto_topup_fire(p_account_id);
    END IF;
    RETURN v_balance;
END $$;

-- settle: post the actual charge and release the hold. Exactly once: a resolved hold returns its stored outcome
-- (replayed = true) and writes nothing. actual > held still posts in full; the excess is recorded as overrun. A
-- charge that takes the available balance below the account's low_balance_micros writes a `balance.low` webhook
-- event, once until a credit lifts the balance back over it (meterline_post re-arms it). A charge that takes it
-- below an enabled auto top-up rule's threshold records the rule's trigger (an open auto_topup payment), likewise
-- once until a credit lifts it back. The charge is drawn from the account's credit grants in the same statement
-- (meterline_charge).
CREATE OR REPLACE FUNCTION meterline_settle(
    p_request_id text, p_actual bigint, p_estimated boolean, p_record jsonb
) RETURNS TABLE (state text, hold_micros bigint, actual_micros bigint, overrun_micros bigint,
                 replayed boolean, balance_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    h         holds;
    v_release bigint;
    v_overrun bigint;
    v_balance bigint;
BEGIN
    IF p_actual IS NULL OR p_actual < 0 THEN
        RAISE EXCEPTION 'a charge must be a non-negative amount, got %', p_actual USING ERRCODE = '22023';
    END IF;
    SELECT * INTO h FROM holds WHERE holds.request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF h.state NOT IN ('pending', 'expired') THEN
        RETURN QUERY SELECT h.state, h.amount_micros, h.actual_micros, h.overrun_micros, true, NULL::bigint;
        RETURN;
    END IF;
    -- An expired hold already released its amount, so a late charge is all overrun.
    v_release := CASE WHEN h.state = 'pending' THEN h.amount_micros ELSE 0 END;
    v_overrun := GREATEST(p_actual - v_release, 0);
    v_balance := meterline_charge(h.account_id, p_request_id, v_release, p_actual, v_overrun, p_estimated);
    PERFORM meterline_key_release(h, v_release, p_actual);
    UPDATE holds SET state = 'settled', actual_micros = p_actual, overrun_micros = v_overrun,
                     expired_first = (h.state = 'expired'), resolved_at = COALESCE(h.resolved_at, now())
     WHERE holds.request_id = p_request_id;
    PERFORM meterline_record(p_request_id, h, 'settled', p_actual, p_estimated, v_overrun, p_record);
    RETURN QUERY SELECT 'settled'::text, h.amount_micros, p_actual, v_overrun, false, v_balance;
END $$;

-- void: release the whole hold, charge nothing. Exactly once, like settle.
CREATE OR REPLACE FUNCTION meterline_void(p_request_id text, p_reason text, p_record jsonb)
RETURNS TABLE (state text, hold_micros bigint, actual_micros bigint, overrun_micros bigint,
               replayed boolean, balance_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    h     holds;
    v_due timestamptz;
BEGIN
    SELECT * INTO h FROM holds WHERE holds.request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF h.state <> 'pending' THEN
        RETURN QUERY SELECT h.state, h.amount_micros, h.actual_micros, h.overrun_micros, true, NULL::bigint;
        RETURN;
    END IF;
    UPDATE accounts a SET held_micros = a.held_micros - h.amount_micros WHERE a.id = h.account_id
    RETURNING a.grants_due_at INTO v_due;
    PERFORM meterline_key_release(h, h.amount_micros, 0);
    UPDATE holds SET state = 'voided', reason = p_reason, resolved_at = now()
     WHERE holds.request_id = p_request_id;
    IF v_due <= meterline_now() THEN  -- expired credit this hold kept can go now
        PERFORM meterline_grants_due(h.account_id);
    END IF;
    PERFORM meterline_record(p_request_id, h, 'voided', 0, false, 0,
                             p_record || jsonb_build_object('error_message', p_reason));
    RETURN QUERY SELECT 'voided'::text, h.amount_micros, NULL::bigint, 0::bigint, false, NULL::bigint;
END $$;

-- sweep: expire up to p_limit pending holds past their expiry. SKIP LOCKED lets any number of sweepers run at
-- once, and the state check under the row lock makes each expiry happen once. Accounts are touched in id order
-- so that concurrent sweeps cannot deadlock on them.
CREATE OR REPLACE FUNCTION meterline_sweep(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    h       holds;
    v_count integer := 0;
    v_due   timestamptz;
BEGIN
    FOR h IN
        SELECT * FROM holds
         WHERE holds.state = 'pending' AND holds.expires_at <= now()
         ORDER BY holds.account_id, holds.request_id
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    LOOP
        -- Never wait for an account: a batched settlement may hold it while it waits for one of the holds this
        -- loop has locked. A skipped hold is expired by the next sweep.
        PERFORM 1 FROM accounts WHERE id = h.account_id FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        UPDATE accounts a SET held_micros = a.held_micros - h.amount_micros WHERE a.id = h.account_id
        RETURNING a.grants_due_at INTO v_due;
        PERFORM meterline_key_release(h, h.amount_micros, 0);
        UPDATE holds SET state = 'expired', reason = 'hold expired', resolved_at = now()
         WHERE holds.request_id = h.request_id;
        IF v_due <= meterline_now() THEN  -- expired credit this hold kept can go now
            PERFORM meterline_grants_due(h.account_id);
        END IF;
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END $$;

-- quota_take: a new quota of between p_min and p_max micros for the process p_holder, at most p_share_ppm
-- millionths of the available balance, decided under the account's row lock like any hold (so holds and quotas
-- together never exceed the balance). Refused (granted NULL) when that bound is below p_min: the account's calls
-- use per-call holds. ML003 = no such customer account.
CREATE OR REPLACE FUNCTION meterline_quota_take(
    p_quota_id text, p_account_id text, p_holder text, p_min bigint, p_max bigint, p_share_ppm bigint,
    p_ttl_ms bigint
) RETURNS TABLE (granted bigint, available bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_available bigint;
    v_due       timestamptz;
    v_granted   bigint;
    v_expires   timestamptz;
BEGIN
    IF p_min <= 0 OR p_max < p_min OR p_share_ppm <= 0 OR p_share_ppm > 1000000 OR p_ttl_ms <= 0 THEN
        RAISE EXCEPTION 'bad quota: min %, max %, share % ppm, ttl % ms', p_min, p_max, p_share_ppm, p_ttl_ms
            USING ERRCODE = '22023';
    END IF;
    SELECT a.credits_posted - a.debits_posted - a.held_micros, a.grants_due_at INTO v_available, v_due
      FROM accounts a WHERE a.id = p_account_id AND a.kind = 'customer' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no customer account %', p_account_id USING ERRCODE = 'ML003';
    END IF;
    IF v_due <= meterline_now() THEN
        PERFORM meterline_grants_due(p_account_id);
        SELECT a.credits_posted - a.debits_posted - a.held_micros INTO v_available
          FROM accounts a WHERE a.id = p_account_id;
    END IF;
    v_granted := LEAST(p_max, GREATEST(v_available, 0) * p_share_ppm / 1000000);
    IF v_granted < p_min THEN
        RETURN QUERY SELECT NULL::bigint, v_available, NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE accounts SET held_micros = held_micros + v_granted WHERE id = p_account_id;
    INSERT INTO quotas (id, account_id, holder, amount_micros, granted_micros, expires_at)
    VALUES (p_quota_id, p_account_id, p_holder, v_granted, v_granted, now() + p_ttl_ms * interval '1 millisecond')
    RETURNING quotas.expires_at INTO v_expires;
    RETURN QUERY SELECT v_granted, v_available - v_granted, v_expires;
END $$;

-- quota_beat: the holder's periodic call on a pending quota. It writes the intent record (p_in_flight:
-- [[request id, worst-case micros, age in ms], ...]), extends the expiry, and moves the amount toward p_target:
-- growing at most to p_share_ppm of what the account has available (this quota's amount included) and never while
-- the account is in debt; shrinking never below p_floor (what its calls in flight may still draw). Returns the
-- quota's state, the change made to its amount, its amount and expiry after, and the account's available balance.
-- A beat that may shrink it (a p_floor at most its amount: its holder giving room back) answers a recall. A quota
-- that is no longer pending (it expired) changes nothing.
CREATE OR REPLACE FUNCTION meterline_quota_beat(
    p_quota_id text, p_target bigint, p_floor bigint, p_share_ppm bigint, p_ttl_ms bigint, p_in_flight jsonb
) RETURNS TABLE (state text, delta bigint, amount bigint, expires_at timestamptz, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    q           quotas;
    v_available bigint;
    v_due       timestamptz;
    v_amount    bigint;
    v_expires   timestamptz;
BEGIN
    SELECT * INTO q FROM quotas WHERE quotas.id = p_quota_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no quota %', p_quota_id USING ERRCODE = 'ML003';
    END IF;
    IF q.state <> 'pending' THEN
        RETURN QUERY SELECT q.state, 0::bigint, 0::bigint, q.expires_at, NULL::bigint;
        RETURN;
    END IF;
    SELECT a.credits_posted - a.debits_posted - a.held_micros, a.grants_due_at INTO v_available, v_due
      FROM accounts a WHERE a.id = q.account_id FOR UPDATE;
    IF v_due <= meterline_now() THEN
        PERFORM meterline_grants_due(q.account_id);
        SELECT a.credits_posted - a.debits_posted - a.held_micros INTO v_available
          FROM accounts a WHERE a.id = q.account_id;
    END IF;
    v_amount := LEAST(p_target, CASE WHEN v_available < 0 THEN q.amount_micros
                                     ELSE (v_available + q.amount_micros) * p_share_ppm / 1000000 END);
    v_amount := GREATEST(v_amount, LEAST(p_floor, q.amount_micros));
    IF v_amount > q.amount_micros THEN  -- growth comes out of the available balance, never past it
        v_amount := LEAST(v_amount, q.amount_micros + GREATEST(v_available, 0));
    END IF;
    UPDATE accounts SET held_micros = held_micros + (v_amount - q.amount_micros) WHERE id = q.account_id;
    UPDATE quotas
       SET amount_micros = v_amount,
           granted_micros = q.granted_micros + GREATEST(v_amount - q.amount_micros, 0),
           released_micros = q.released_micros + GREATEST(q.amount_micros - v_amount, 0),
           expires_at = GREATEST(q.expires_at, now() + p_ttl_ms * interval '1 millisecond'),
           in_flight = COALESCE((SELECT jsonb_agg(jsonb_build_object(
                           'id', e->>0, 'micros', (e->>1)::bigint,
                           'at', now() - (e->>2)::bigint * interval '1 millisecond'))
                                   FROM jsonb_array_elements(p_in_flight) e), '[]'::jsonb),
           in_flight_at = now(),
           recalled_at = CASE WHEN p_floor <= q.amount_micros THEN NULL ELSE q.recalled_at END
     WHERE quotas.id = p_quota_id
    RETURNING quotas.expires_at INTO v_expires;
    RETURN QUERY SELECT 'pending'::text, v_amount - q.amount_micros, v_amount, v_expires,
                        v_available - (v_amount - q.amount_micros);
END $$;

-- quota_return: the holder gives a quota back, with no call of it in flight: its whole amount is released. A quota
-- no longer pending is left as it is. Returns the amount released.
CREATE OR REPLACE FUNCTION meterline_quota_return(p_quota_id text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    q quotas;
BEGIN
    SELECT * INTO q FROM quotas WHERE id = p_quota_id FOR UPDATE;
    IF NOT FOUND OR q.state <> 'pending' THEN
        RETURN 0;
    END IF;
    UPDATE accounts SET held_micros = held_micros - q.amount_micros WHERE id = q.account_id;
    UPDATE quotas SET state = 'returned', amount_micros = 0, released_micros = q.released_micros + q.amount_micros,
                      in_flight = '[]', in_flight_at = now(), resolved_at = now()
     WHERE id = p_quota_id;
    RETURN q.amount_micros;
END $$;

-- quota_recall: a process refused a hold on the account asks every other process holding a live quota on it (one
-- beaten within p_alive_ms: a dead holder cannot answer) for its room back; the holder reads its recalled quotas
-- once a tick. Returns how many quotas were asked.
CREATE OR REPLACE FUNCTION meterline_quota_recall(p_account_id text, p_holder text, p_alive_ms bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE quotas SET recalled_at = COALESCE(recalled_at, now())
     WHERE account_id = p_account_id AND state = 'pending' AND holder <> p_holder
       AND COALESCE(in_flight_at, created_at) > now() - p_alive_ms * interval '1 millisecond';
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- quota_settle: charge (p_actual) or void (p_actual NULL) one call admitted under a quota, writing its hold row
-- already resolved, and its request record. The charge draws up to the call's worst case (p_worst) from the quota;
-- anything above it is overrun, as with a per-call hold, and a charge under a quota that expired is all overrun.
-- Exactly once: a call whose hold row exists returns its stored outcome (replayed = true) and writes nothing.
-- p_age_ms is how long ago the call was admitted (its hold's created_at). Returns what the quota gave up
-- (`released`), so that its holder's copy of the amount follows.
CREATE OR REPLACE FUNCTION meterline_quota_settle(
    p_quota_id text, p_request_id text, p_key_id text, p_worst bigint, p_actual bigint, p_estimated boolean,
    p_record jsonb, p_age_ms bigint, p_reason text
) RETURNS TABLE (state text, hold_micros bigint, actual_micros bigint, overrun_micros bigint,
                 replayed boolean, released bigint)
LANGUAGE plpgsql AS $$
DECLARE
    q         quotas;
    h         holds;
    v_release bigint;
    v_overrun bigint;
    v_created timestamptz := now() - GREATEST(p_age_ms, 0) * interval '1 millisecond';
BEGIN
    IF p_actual < 0 OR p_worst < 0 THEN
        RAISE EXCEPTION 'a charge must be a non-negative amount, got % (worst case %)', p_actual, p_worst
            USING ERRCODE = '22023';
    END IF;
    SELECT * INTO q FROM quotas WHERE quotas.id = p_quota_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no quota %', p_quota_id USING ERRCODE = 'ML003';
    END IF;
    SELECT * INTO h FROM holds WHERE holds.request_id = p_request_id;
    IF FOUND THEN
        RETURN QUERY SELECT h.state, h.amount_micros, h.actual_micros, h.overrun_micros, true,
                            CASE WHEN h.state = 'settled' AND NOT h.expired_first
                                 THEN LEAST(h.amount_micros, h.actual_micros) ELSE 0 END;
        RETURN;
    END IF;
    IF p_actual IS NULL THEN
        INSERT INTO holds (request_id, account_id, key_id, amount_micros, state, created_at, expires_at,
                           resolved_at, reason, quota_id)
        VALUES (p_request_id, q.account_id, p_key_id, p_worst, 'voided', v_created, q.expires_at, now(), p_reason,
                p_quota_id)
        RETURNING * INTO h;
        PERFORM meterline_record(p_request_id, h, 'voided', 0, false, 0,
                                 p_record || jsonb_build_object('error_message', p_reason));
        RETURN QUERY SELECT 'voided'::text, p_worst, NULL::bigint, 0::bigint, false, 0::bigint;
        RETURN;
    END IF;
    v_release := CASE WHEN q.state = 'pending' THEN LEAST(q.amount_micros, p_worst, p_actual) ELSE 0 END;
    v_overrun := p_actual - v_release;
    IF v_release > 0 THEN
        UPDATE quotas SET amount_micros = q.amount_micros - v_release, drawn_micros = q.drawn_micros + v_release
         WHERE quotas.id = p_quota_id;
    END IF;
    PERFORM meterline_charge(q.account_id, p_request_id, v_release, p_actual, v_overrun, p_estimated);
    INSERT INTO holds (request_id, account_id, key_id, amount_micros, state, created_at, expires_at, resolved_at,
                       actual_micros, overrun_micros, expired_first, quota_id)
    VALUES (p_request_id, q.account_id, p_key_id, p_worst, 'settled', v_created, q.expires_at, now(), p_actual,
            v_overrun, q.state <> 'pending', p_quota_id)
    RETURNING * INTO h;
    PERFORM meterline_key_release(h, 0, p_actual);  -- not key_limited: counted in a limit set since
    PERFORM meterline_record(p_request_id, h, 'settled', p_actual, p_estimated, v_overrun, p_record);
    RETURN QUERY SELECT 'settled'::text, p_worst, p_actual, v_overrun, false, v_release;
END $$;

-- quota_sweep: expire up to p_limit pending quotas past their expiry (a holder that died or lost the database),
-- releasing what they still hold. SKIP LOCKED like meterline_sweep, so any number of sweepers may run.
CREATE OR REPLACE FUNCTION meterline_quota_sweep(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    q       quotas;
    v_count integer := 0;
BEGIN
    FOR q IN
        SELECT * FROM quotas
         WHERE quotas.state = 'pending' AND quotas.expires_at <= now()
         ORDER BY quotas.account_id, quotas.id
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM 1 FROM accounts WHERE id = q.account_id FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        UPDATE accounts SET held_micros = held_micros - q.amount_micros WHERE id = q.account_id;
        UPDATE quotas SET state = 'expired', amount_micros = 0, released_micros = q.released_micros + q.amount_micros,
                          resolved_at = now()
         WHERE id = q.id;
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END $$;

-- post: a top-up, an adjustment or a refund between a customer account and an operator account. A positive
-- amount (a top-up or an adjustment) is a paid credit grant with no expiry, posted now (meterline_grant_post: it
-- pays the account's debt first, re-arms the thresholds and writes a top-up's `topup.posted` event). A negative
-- one debits the customer only if the available balance covers it (decided under the row lock), unless
-- `p_overdraw`: a reversal of money the customer paid (a Stripe refund or lost dispute, kind `refund`, always
-- overdrawing) is posted in full even when it was already spent, and the part the available balance did not cover
-- is recorded as overrun (the same debt an overrunning charge leaves: the account takes no new hold until it is
-- paid). A debit is drawn from the grants paid credit first. Errors: ML001 = insufficient available balance,
-- ML003 = no such customer account.
CREATE OR REPLACE FUNCTION meterline_post(
    p_account_id text, p_kind text, p_amount bigint, p_description text, p_overdraw boolean DEFAULT false
) RETURNS TABLE (transfer_id bigint, balance_after bigint, held bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_operator text := CASE p_kind WHEN 'adjustment' THEN 'op_adjustments' ELSE 'op_funding' END;
    v_balance  bigint;
    v_held     bigint;
    v_id       bigint;
    v_created  timestamptz;
    v_overrun  bigint := 0;
    v_due      timestamptz;
    v_grant    text;
BEGIN
    IF p_kind NOT IN ('topup', 'adjustment', 'refund') OR p_amount = 0 OR (p_kind = 'topup' AND p_amount < 0)
       OR (p_kind = 'refund' AND p_amount > 0) THEN
        RAISE EXCEPTION 'bad posting: % of %', p_kind, p_amount USING ERRCODE = '22023';
    END IF;
    SELECT a.grants_due_at INTO v_due FROM accounts a WHERE a.id = p_account_id AND a.kind = 'customer' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no customer account %', p_account_id USING ERRCODE = 'ML003';
    END IF;
    IF v_due <= meterline_now() THEN
        PERFORM meterline_grants_due(p_account_id);
    END IF;
    IF p_amount > 0 THEN
        v_grant := 'grant_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 24);
        INSERT INTO credit_grants (id, account_id, category, amount_micros, effective_at, description)
        VALUES (v_grant, p_account_id, 'paid', p_amount, meterline_now(), p_description);
        RETURN QUERY SELECT * FROM meterline_grant_post(v_grant, p_kind);
        RETURN;
    END IF;
    UPDATE accounts a SET debits_posted = a.debits_posted - p_amount
     WHERE a.id = p_account_id
       AND (p_overdraw OR p_kind = 'refund' OR a.credits_posted - a.debits_posted - a.held_micros >= -p_amount)
    RETURNING a.credits_posted - a.debits_posted, a.held_micros INTO v_balance, v_held;
    IF NOT FOUND THEN
        SELECT a.credits_posted - a.debits_posted - a.held_micros INTO v_balance
          FROM accounts a WHERE a.id = p_account_id;
        RAISE EXCEPTION 'available balance does not cover a debit of % micros', -p_amount
            USING ERRCODE = 'ML001', DETAIL = v_balance::text;
    END IF;
    -- the part of this debit below zero available (never more than the debit: an earlier debt is its own)
    v_overrun := LEAST(-p_amount, GREATEST(0, v_held - v_balance));
    PERFORM meterline_grants_draw(p_account_id, -p_amount, true);
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, description,
                           balance_after_micros, overrun_micros)
    VALUES (p_account_id, p_account_id, v_operator, -p_amount, p_kind, p_description, v_balance, v_overrun)
    RETURNING transfers.id, transfers.created_at INTO v_id, v_created;
    RETURN QUERY SELECT v_id, v_balance, v_held, v_created;
END $$;

-- Video jobs (issue 4): one row per asynchronous upstream job, holding its price until the upstream reports an
-- outcome. Any gateway process may poll a job: it first takes a lease (lease_owner, lease_until) with
-- FOR UPDATE SKIP LOCKED, so each poll happens in one process; a lease left by a crashed process expires and the
-- job is picked up again. Settlement is guarded twice: by the status check here and by the hold's own state.
CREATE TABLE videos (
    id           text PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts (id),
    key_id       text,
    request_id   text NOT NULL UNIQUE,
    model        text NOT NULL,
    upstream     text NOT NULL,
    upstream_id  text,
    endpoint     text,
    prompt       text,
    size         text NOT NULL,
    seconds      integer NOT NULL CHECK (seconds > 0),
    price_micros bigint NOT NULL CHECK (price_micros >= 0),
    cost_micros  bigint CHECK (cost_micros >= 0),
    status       text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'in_progress', 'completed', 'failed')),
    progress     integer NOT NULL DEFAULT 0,
    error        jsonb,
    output       jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    deadline_at  timestamptz NOT NULL,
    next_poll_at timestamptz NOT NULL DEFAULT now(),
    lease_owner  text,
    lease_until  timestamptz,
    webhook_url  text,  -- the job's own webhook URL (Lumenfall's), besides the account's endpoints
    client_request_id text,  -- the creating call's X-Request-Id, for the record written when the job ends
    provider     text,  -- the provider that accepted the job (`upstream` is its upstream: polls go there)
    provider_model text,  -- the model id that provider was sent
    upstream_cost_micros bigint,  -- that provider's configured cost of the job, for the record written at the end
    attempts     jsonb,  -- every provider tried when the job was created
    CHECK ((status = 'completed') = (cost_micros IS NOT NULL))
);
CREATE INDEX videos_unfinished ON videos (next_poll_at) WHERE status IN ('queued', 'in_progress');
CREATE INDEX videos_account ON videos (account_id, created_at);

-- Stored conversations and memory (issue 11).
-- A conversation belongs to one key (and its account): only that key continues, reads or deletes it. `turns` is
-- the number of messages stored, so the next message's seq; it is bumped under the row lock by
-- meterline_converse, which makes concurrent calls append in commit order.
CREATE TABLE conversations (
    id         uuid PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    key_id     text NOT NULL REFERENCES api_keys (id),
    model      text NOT NULL,
    turns      integer NOT NULL DEFAULT 0 CHECK (turns >= 0),
    exchanges  integer NOT NULL DEFAULT 0 CHECK (exchanges >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_key ON conversations (key_id, created_at DESC, id DESC);
CREATE INDEX conversations_account ON conversations (account_id, created_at DESC, id DESC);
CREATE INDEX conversations_idle ON conversations (updated_at);

-- Each stored message, in order. `tokens` is the most a hold may count it as (its tiktoken count or its bytes
-- over four, whichever is larger, plus framing), which is what replay trims history by.
CREATE TABLE conversation_turns (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             integer NOT NULL CHECK (seq >= 0),
    request_id      text NOT NULL,
    role            text NOT NULL,
    message         jsonb NOT NULL,
    tokens          integer NOT NULL CHECK (tokens >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq)
);

-- What `memory: true` learns: one row per exchange (the user's words and the answer), searchable with
-- PostgreSQL's full-text search. Deleting its conversation deletes it.
CREATE TABLE memories (
    id              uuid PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    key_id          text NOT NULL REFERENCES api_keys (id),
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    request_id      text NOT NULL UNIQUE,
    content         text NOT NULL,
    tokens          integer NOT NULL CHECK (tokens >= 0),
    search          tsvector NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memories_key ON memories (key_id, created_at DESC, id DESC);
CREATE INDEX memories_conversation ON memories (conversation_id);
CREATE INDEX memories_search ON memories USING gin (search);

-- Append one settled exchange to its conversation (creating it when p_new), and learn it when p_memory is given
-- ({id, content, tokens}). Called in the settlement's own transaction, so an exchange is stored if and only if
-- its call was charged. The conversation row is locked by the UPDATE until commit: concurrent calls get
-- consecutive seqs in commit order. A conversation deleted while the call ran stays deleted: returns 0.
CREATE OR REPLACE FUNCTION meterline_converse(
    p_conversation uuid, p_account_id text, p_key_id text, p_new boolean, p_model text, p_request_id text,
    p_turns jsonb, p_memory jsonb, p_language regconfig
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count integer := jsonb_array_length(p_turns);
    v_first integer;
BEGIN
    IF p_new THEN
        INSERT INTO conversations (id, account_id, key_id, model) VALUES (p_conversation, p_account_id, p_key_id, p_model)
        ON CONFLICT (id) DO NOTHING;
    END IF;
    UPDATE conversations c
       SET turns = c.turns + v_count, exchanges = c.exchanges + 1, model = p_model, updated_at = now()
     WHERE c.id = p_conversation AND c.account_id = p_account_id AND c.key_id = p_key_id
    RETURNING c.turns - v_count INTO v_first;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    INSERT INTO conversation_turns (conversation_id, seq, request_id, role, message, tokens)
    SELECT p_conversation, v_first + t.n::integer - 1, p_request_id, t.item->>'role', t.item->'message',
           (t.item->>'tokens')::integer
      FROM jsonb_array_elements(p_turns) WITH ORDINALITY AS t(item, n);
    IF p_memory IS NOT NULL THEN
        INSERT INTO memories (id, account_id, key_id, conversation_id, request_id, content, tokens, search)
        VALUES ((p_memory->>'id')::uuid, p_account_id, p_key_id, p_conversation, p_request_id,
                p_memory->>'content', (p_memory->>'tokens')::integer,
                to_tsvector(p_language, p_memory->>'content'))
        ON CONFLICT (request_id) DO NOTHING;
    END IF;
    RETURN v_count;
END $$;

-- The words of p_text as a query matching any of them (OR), stemmed and without stop words by p_language.
-- Built from to_tsvector's lexemes, each read back with plainto_tsquery('simple'), never parsed as query syntax,
-- so any user text is safe. NULL: no words.
CREATE OR REPLACE FUNCTION meterline_any_word(p_language regconfig, p_text text) RETURNS tsquery
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_query tsquery;
    v_word  text;
BEGIN
    FOR v_word IN SELECT unnest(tsvector_to_array(to_tsvector(p_language, p_text))) LOOP
        v_query := CASE WHEN v_query IS NULL THEN plainto_tsquery('simple', v_word)
                        ELSE v_query || plainto_tsquery('simple', v_word) END;
    END LOOP;
    RETURN v_query;
END $$;

-- Recall: this key's memories that share a word with p_text, most relevant first (ts_rank_cd, normalised by
-- document length so long answers do not win on length alone; newer first among equals), leaving out the
-- conversation the call continues (its turns are replayed as history already). The query is built once, then
-- used as a constant (a subquery would be flattened and rebuild it for every memory).
CREATE OR REPLACE FUNCTION meterline_recall(
    p_account_id text, p_key_id text, p_exclude uuid, p_language regconfig, p_text text, p_limit integer
) RETURNS TABLE (id uuid, conversation_id uuid, content text, tokens integer, rank real, created_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_query tsquery := meterline_any_word(p_language, p_text);
BEGIN
    IF v_query IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT m.id, m.conversation_id, m.content, m.tokens, ts_rank_cd(m.search, v_query, 1), m.created_at
      FROM memories m
     WHERE m.search @@ v_query AND m.key_id = p_key_id AND m.account_id = p_account_id
       AND m.conversation_id IS DISTINCT FROM p_exclude
     ORDER BY 5 DESC, m.created_at DESC, m.id
     LIMIT p_limit;
END $$;

-- Retention: delete up to p_limit conversations idle for p_days (their turns and memories go with them).
-- SKIP LOCKED: several gateway processes purge at once without waiting on each other or on an append.
CREATE OR REPLACE FUNCTION meterline_purge_conversations(p_days integer, p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM conversations c
         WHERE c.id IN (SELECT i.id FROM conversations i
                         WHERE i.updated_at < now() - p_days * interval '1 day'
                         ORDER BY i.updated_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone;
$$;

-- The web console (issue 12).
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

-- Daily rollups of the request records (issue 12).
-- One row per UTC day (of the settlement or void, the day its transfer is dated), account, key, model and modality.
-- Written by meterline_record in the same transaction as the record it counts, so it always equals the sum of the
-- request records (and their charges, the ledger's); meterline_rollup_rebuild recomputes days from the records.
CREATE TABLE usage_daily (
    day               date NOT NULL,
    account_id        text NOT NULL,
    key_id            text NOT NULL,  -- '' for a call without a key
    model             text NOT NULL,  -- '' when the record names none
    modality          text NOT NULL,
    requests          bigint NOT NULL CHECK (requests >= 0),
    errors            bigint NOT NULL CHECK (errors >= 0),  -- records whose status is upstream_failure
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_micros       bigint NOT NULL CHECK (cost_micros >= 0),
    PRIMARY KEY (day, account_id, key_id, model, modality)
);
CREATE INDEX usage_daily_account ON usage_daily (account_id, day);

-- Recompute the rollups of [p_from, p_to) (UTC days) from the request records; returns the rows written. Safe to
-- run at any time, and again: it first takes the table in EXCLUSIVE mode, so settlements that counted into it
-- have committed (and are in what it reads) and those that come later wait for it, then add to what it wrote.
CREATE OR REPLACE FUNCTION meterline_rollup_rebuild(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_rows integer;
BEGIN
    LOCK TABLE usage_daily IN EXCLUSIVE MODE;
    DELETE FROM usage_daily WHERE day >= p_from AND day < p_to;
    INSERT INTO usage_daily (day, account_id, key_id, model, modality, requests, errors, prompt_tokens,
                             completion_tokens, cost_micros)
    SELECT (r.finished_at AT TIME ZONE 'UTC')::date, r.account_id, COALESCE(r.key_id, ''), COALESCE(r.model, ''),
           COALESCE(r.modality, ''), count(*), count(*) FILTER (WHERE r.status = 'upstream_failure'),
           COALESCE(sum(r.prompt_tokens), 0), COALESCE(sum(r.completion_tokens), 0), sum(r.cost_micros)
      FROM requests r
     WHERE r.finished_at >= (p_from::timestamp AT TIME ZONE 'UTC') AND r.finished_at < (p_to::timestamp AT TIME ZONE 'UTC')
     GROUP BY 1, 2, 3, 4, 5;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RETURN v_rows;
END $$;

-- The console's period reads that must not scan every charge: top-ups and adjustments by time (few), and the
-- charges and holds finance must look at (estimated, overrun, expired). Ordinary charges are in none of them.
CREATE INDEX transfers_credits_created ON transfers (created_at) WHERE kind <> 'charge';
CREATE INDEX transfers_flagged_created ON transfers (created_at)
    WHERE kind = 'charge' AND (estimated OR overrun_micros > 0);
CREATE INDEX holds_expired_created ON holds (created_at) WHERE expired_first OR state = 'expired';

-- Webhooks (issue 13).
-- An account's signing secrets. The one without `retired_at` is current; a rotated secret keeps signing (beside
-- the new one: Standard Webhooks allows several signatures) until `retired_at`.
CREATE TABLE webhook_secrets (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    secret     text NOT NULL CHECK (secret LIKE 'whsec_%'),
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);
CREATE UNIQUE INDEX webhook_secrets_current ON webhook_secrets (account_id) WHERE retired_at IS NULL;

CREATE TABLE webhook_endpoints (
    id              text PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    url             text NOT NULL,
    events          text[] NOT NULL CHECK (cardinality(events) > 0),
    description     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    failing_since   timestamptz,  -- the first failure of the current run of failures (NULL: the last one worked)
    disabled_at     timestamptz,
    disabled_reason text
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id, created_at);

-- The outbox: one row per event, written in the transaction of the change that causes it. `id` is the stable
-- `webhook-id` every attempt carries; `dedupe` makes an event of a once-only cause impossible to write twice.
CREATE TABLE webhook_events (
    id         text PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    type       text NOT NULL,
    data       jsonb NOT NULL,
    dedupe     text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_account ON webhook_events (account_id, created_at);

-- One delivery per event and target (a subscribed endpoint, or a video job's own webhook_url), in the same
-- transaction as the event. A worker takes a due one under a lease (FOR UPDATE SKIP LOCKED), so one attempt runs
-- at a time across processes and a lease left by a killed process runs out and is taken again.
CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text NOT NULL REFERENCES webhook_events (id),
    endpoint_id     text REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    url             text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'exhausted', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    finished_at     timestamptz,
    last_error      text
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);

CREATE TABLE webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    status       integer,  -- the HTTP status, NULL when none came back
    duration_ms  integer NOT NULL,
    error        text
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- Write an event and its deliveries, in the caller's transaction: to every enabled endpoint of the account that
-- subscribes to its type (or to '*'), and to `p_url` when given (a video job's own webhook_url). With `p_dedupe`,
-- an event already written for that cause is not written again. Returns the event's id (NULL: deduplicated).
CREATE OR REPLACE FUNCTION meterline_webhook_emit(
    p_account_id text, p_type text, p_data jsonb, p_dedupe text, p_url text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_id text := 'msg_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    INSERT INTO webhook_events (id, account_id, type, data, dedupe) VALUES (v_id, p_account_id, p_type, p_data, p_dedupe)
    ON CONFLICT (dedupe) DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (event_id, endpoint_id, url)
    SELECT v_id, e.id, e.url FROM webhook_endpoints e
     WHERE e.account_id = p_account_id AND e.disabled_at IS NULL AND (p_type = ANY (e.events) OR '*' = ANY (e.events));
    IF p_url IS NOT NULL THEN
        INSERT INTO webhook_deliveries (event_id, url) VALUES (v_id, p_url);
    END IF;
    RETURN v_id;
END $$;

-- Payments (issue 16): money a customer paid through Stripe, one row per Checkout Session. A row is written when
-- the session is created (status open) and turned paid by exactly one webhook delivery: the conditional UPDATE
-- on status is the gate, in the same transaction as the top-up it posts. `kind` leaves room for other ways in
-- (an auto top-up's PaymentIntent). Reversals are cumulative per payment: refunded_micros follows the charge's
-- amount_refunded (a delivery posts only what it adds), and a lost dispute is recorded once by its id.
CREATE TABLE payments (
    id              text PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    kind            text NOT NULL CHECK (kind IN ('checkout', 'auto_topup')),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid', 'failed', 'expired')),
    session_id      text UNIQUE,
    payment_intent  text UNIQUE,
    amount_micros   bigint NOT NULL CHECK (amount_micros > 0),
    paid_micros     bigint CHECK (paid_micros > 0),
    -- The top-up's transfer. No foreign key: one would let TRUNCATE of the ledger fail on it rather than on the
    -- ledger's own guard, and transfers are never deleted anyway.
    transfer_id     bigint,
    refunded_micros bigint NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    dispute_id      text UNIQUE,
    disputed_micros bigint NOT NULL DEFAULT 0 CHECK (disputed_micros >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    CHECK ((status = 'paid') = (paid_micros IS NOT NULL AND completed_at IS NOT NULL)),
    CHECK (refunded_micros + disputed_micros <= COALESCE(paid_micros, 0)),
    -- Auto top-up (issue 16): the payment method charged, and why it failed (status failed).
    payment_method  text,
    failure         text,
    CONSTRAINT payments_session_check CHECK (kind = 'auto_topup' OR session_id IS NOT NULL)
);
CREATE INDEX payments_account ON payments (account_id, created_at);
-- At most one auto top-up in flight per account: the trigger's conditional insert decides it.
CREATE UNIQUE INDEX payments_auto_topup_in_flight ON payments (account_id) WHERE kind = 'auto_topup' AND status = 'open';

-- Auto top-up rules (issue 16): below threshold_micros, charge payment_method (off session, as the account's
-- Stripe customer) for amount_micros. `failures` counts failures in a row (a success resets it); the third
-- disables the rule, saying why and when.
CREATE TABLE auto_topup_rules (
    account_id       text PRIMARY KEY REFERENCES accounts (id),
    enabled          boolean NOT NULL,
    threshold_micros bigint NOT NULL CHECK (threshold_micros >= 0),
    amount_micros    bigint NOT NULL CHECK (amount_micros > 0),
    payment_method   text,
    failures         integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    disabled_reason  text,
    disabled_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT enabled OR payment_method IS NOT NULL)
);

-- auto top-up fire: record the trigger of the account's enabled rule as an open auto_topup payment, unless one is
-- in flight already. Returns the payment's id (NULL: no enabled rule, or one in flight).
CREATE OR REPLACE FUNCTION meterline_auto_topup_fire(p_account_id text) RETURNS text LANGUAGE sql AS $$
    INSERT INTO payments (id, account_id, kind, amount_micros, payment_method)
    SELECT 'pay_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 24), r.account_id, 'auto_topup',
           r.amount_micros, r.payment_method
      FROM auto_topup_rules r WHERE r.account_id = p_account_id AND r.enabled
    ON CONFLICT (account_id) WHERE kind = 'auto_topup' AND status = 'open' DO NOTHING
    RETURNING id
$$;

-- auto top-up failed: the open auto_topup payment turns failed (once: a conditional UPDATE), the rule counts the
-- failure and is disabled at the third in a row (an `auto_topup.disabled` webhook event, written once), and is
-- otherwise re-armed so that the next charge below the threshold tries again. Every failure writes an
-- `auto_topup.failed` event. Returns nothing when the payment is not an open auto top-up.
CREATE OR REPLACE FUNCTION meterline_auto_topup_failed(p_payment_id text, p_reason text)
RETURNS TABLE (account_id text, failures integer, disabled boolean) LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_amount  bigint;
    r         auto_topup_rules;
BEGIN
    UPDATE payments p SET status = 'failed', failure = p_reason
     WHERE p.id = p_payment_id AND p.kind = 'auto_topup' AND p.status = 'open'
    RETURNING p.account_id, p.amount_micros INTO v_account, v_amount;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE auto_topup_rules x
       SET failures = x.failures + 1, enabled = x.enabled AND x.failures + 1 < 3,
           disabled_reason = CASE WHEN x.enabled AND x.failures + 1 >= 3
               THEN '3 auto top-ups in a row failed; the last: ' || p_reason ELSE x.disabled_reason END,
           disabled_at = CASE WHEN x.enabled AND x.failures + 1 >= 3 THEN now() ELSE x.disabled_at END,
           updated_at = now()
     WHERE x.account_id = v_account
    RETURNING x.* INTO r;
    UPDATE accounts a SET auto_topup_micros = CASE WHEN r.enabled THEN r.threshold_micros END,
                          auto_topup_fired_at = NULL
     WHERE a.id = v_account;
    PERFORM meterline_webhook_emit(v_account, 'auto_topup.failed', jsonb_build_object(
        'account_id', v_account, 'payment_id', p_payment_id, 'amount_micros', v_amount, 'reason', p_reason,
        'failures', r.failures), 'auto_topup.failed:' || p_payment_id, NULL);
    IF NOT r.enabled AND r.disabled_at = now() THEN
        PERFORM meterline_webhook_emit(v_account, 'auto_topup.disabled', jsonb_build_object(
            'account_id', v_account, 'reason', r.disabled_reason, 'disabled_at', r.disabled_at,
            'failures', r.failures), 'auto_topup.disabled:' || v_account || ':' || r.disabled_at, NULL);
    END IF;
    RETURN QUERY SELECT v_account, r.failures, COALESCE(NOT r.enabled AND r.disabled_at = now(), false);
END $$;

-- Credit grants (issue 16): every credit a customer account receives. `paid` grants are money paid in (top-ups,
-- Stripe, positive adjustments: no expiry unless an admin gives one), `promotional` ones are granted by an admin.
-- A grant is posted (its credit transfer written, remaining_micros set) at effective_at; until then it is not
-- in the balance. Charges, negative adjustments and refunds draw on the posted grants (meterline_grants_draw),
-- and at expires_at the unspent remainder is transferred to op_expired (meterline_grants_due). For every posted
-- grant amount = remaining + spent + expired, and an account's grants hold exactly its balance when it is
-- positive (nothing when it is in debt): `meterline verify` checks both.
CREATE TABLE credit_grants (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    category         text NOT NULL CHECK (category IN ('paid', 'promotional')),
    priority         integer NOT NULL DEFAULT 50 CHECK (priority BETWEEN 0 AND 100),
    amount_micros    bigint NOT NULL CHECK (amount_micros > 0),
    remaining_micros bigint NOT NULL DEFAULT 0 CHECK (remaining_micros >= 0),
    spent_micros     bigint NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    expired_micros   bigint NOT NULL DEFAULT 0 CHECK (expired_micros >= 0),
    effective_at     timestamptz NOT NULL,
    expires_at       timestamptz,
    description      text,
    -- Its credit transfer (NULL: not posted yet, or the balance an account had before grants existed).
    transfer_id      bigint,
    posted_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (expires_at IS NULL OR expires_at > effective_at),
    CHECK (CASE WHEN posted_at IS NULL THEN remaining_micros + spent_micros + expired_micros = 0
                ELSE remaining_micros + spent_micros + expired_micros = amount_micros END)
);
CREATE INDEX credit_grants_account ON credit_grants (account_id, created_at);
-- The grants a money step can touch: unspent ones, and those waiting for their effective time.
CREATE INDEX credit_grants_open ON credit_grants (account_id) WHERE remaining_micros > 0 OR posted_at IS NULL;

-- Draw p_amount from the account's posted grants (the account row is locked by the caller), in the spending
-- order: credit whose expiry has passed last (what is left of it only covers holds taken before it expired),
-- then promotional before paid (paid before promotional when p_paid_first: a refund or a negative adjustment
-- takes back paid money first), then lower priority, earliest expiry (none last), earliest effective, oldest.
-- Draws what there is: the part of p_amount the grants do not hold is debt, which the next credit pays.
CREATE OR REPLACE FUNCTION meterline_grants_draw(p_account_id text, p_amount bigint, p_paid_first boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_now  timestamptz := meterline_now();
    v_left bigint := p_amount;
    v_take bigint;
    g      record;
BEGIN
    FOR g IN SELECT c.id, c.remaining_micros FROM credit_grants c
              WHERE c.account_id = p_account_id AND c.remaining_micros > 0
              ORDER BY c.expires_at IS NOT NULL AND c.expires_at <= v_now,
                       CASE WHEN p_paid_first THEN c.category = 'promotional' ELSE c.category = 'paid' END,
                       c.priority, c.expires_at, c.effective_at, c.created_at, c.id
    LOOP
        v_take := LEAST(g.remaining_micros, v_left);
        UPDATE credit_grants SET remaining_micros = remaining_micros - v_take, spent_micros = spent_micros + v_take
         WHERE id = g.id;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
END $$;

-- Post a grant's credit (the account row is locked by the caller): its transfer (`topup` from op_funding,
-- `adjustment` from op_adjustments, `grant` from op_promotions), the cached balance, and the grant's remaining,
-- less the debt the account carried (an overrun's or a reversal's), which a credit pays first. A credit that
-- lifts the available balance back to the low-balance or auto top-up threshold re-arms it. A top-up writes its
-- `topup.posted` webhook event with it, a promotional grant its `credit.granted`.
CREATE OR REPLACE FUNCTION meterline_grant_post(p_grant_id text, p_kind text)
RETURNS TABLE (transfer_id bigint, balance_after bigint, held bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    g         credit_grants;
    v_balance bigint;
    v_held    bigint;
    v_debt    bigint;
    v_id      bigint;
    v_created timestamptz;
BEGIN
    SELECT * INTO g FROM credit_grants WHERE id = p_grant_id AND posted_at IS NULL;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE accounts a SET credits_posted = a.credits_posted + g.amount_micros,
           low_balance_alerted_at = CASE WHEN a.credits_posted + g.amount_micros - a.debits_posted - a.held_micros
               >= a.low_balance_micros THEN NULL ELSE a.low_balance_alerted_at END,
           auto_topup_fired_at = CASE WHEN a.credits_posted + g.amount_micros - a.debits_posted - a.held_micros
               >= a.auto_topup_micros THEN NULL ELSE a.auto_topup_fired_at END
     WHERE a.id = g.account_id
    RETURNING a.credits_posted - a.debits_posted, a.held_micros INTO v_balance, v_held;
    v_debt := LEAST(g.amount_micros, GREATEST(0, g.amount_micros - v_balance));
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, description,
                           balance_after_micros, grant_id)
    VALUES (g.account_id, CASE p_kind WHEN 'topup' THEN 'op_funding' WHEN 'adjustment' THEN 'op_adjustments'
                              ELSE 'op_promotions' END,
            g.account_id, g.amount_micros, p_kind, g.description, v_balance, g.id)
    RETURNING transfers.id, transfers.created_at INTO v_id, v_created;
    UPDATE credit_grants SET posted_at = now(), transfer_id = v_id, remaining_micros = g.amount_micros - v_debt,
                             spent_micros = v_debt
     WHERE id = g.id;
    IF p_kind = 'topup' THEN  -- its webhook event, in the same transaction (the outbox)
        PERFORM meterline_webhook_emit(g.account_id, 'topup.posted', jsonb_build_object(
            'account_id', g.account_id, 'transfer_id', v_id, 'amount_micros', g.amount_micros,
            'balance_micros', v_balance, 'available_micros', v_balance - v_held, 'description', g.description,
            'created_at', v_created), 'topup.posted:' || v_id, NULL);
    ELSIF p_kind = 'grant' THEN
        PERFORM meterline_webhook_emit(g.account_id, 'credit.granted', jsonb_build_object(
            'account_id', g.account_id, 'grant_id', g.id, 'category', g.category, 'priority', g.priority,
            'amount_micros', g.amount_micros, 'expires_at', g.expires_at, 'description', g.description,
            'transfer_id', v_id, 'balance_micros', v_balance, 'available_micros', v_balance - v_held,
            'created_at', v_created), 'credit.granted:' || g.id, NULL);
    END IF;
    RETURN QUERY SELECT v_id, v_balance, v_held, v_created;
END $$;

-- Bring an account's grants to the clock (the account row is locked by the caller): post the grants whose
-- effective time has come, then expire what the passed expiries leave. A pending hold keeps the expired credit it
-- needs: only the part of the expired grants that the unexpired credit and the pending holds leave uncovered is
-- transferred to op_expired now, so no expiry takes the available balance below zero; the rest stays (drawn
-- last, only by the charges of holds already pending: the available balance is zero while it exists) and
-- expires as soon as those holds are resolved. Every expiry writes a `credit.expired` webhook event. Sets
-- grants_due_at to when this must run next. Returns how many transfers it wrote.
CREATE OR REPLACE FUNCTION meterline_grants_due(p_account_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := meterline_now();
    g         credit_grants;
    v_held    bigint;
    v_expired bigint;
    v_kept    bigint;
    v_expire  bigint;
    v_take    bigint;
    v_balance  bigint;
    v_transfer bigint;
    v_count    integer := 0;
BEGIN
    FOR g IN SELECT * FROM credit_grants
              WHERE account_id = p_account_id AND posted_at IS NULL AND effective_at <= v_now
              ORDER BY effective_at, id
    LOOP
        PERFORM meterline_grant_post(g.id, CASE g.category WHEN 'paid' THEN 'topup' ELSE 'grant' END);
        v_count := v_count + 1;
    END LOOP;
    SELECT a.held_micros INTO v_held FROM accounts a WHERE a.id = p_account_id;
    SELECT COALESCE(sum(remaining_micros) FILTER (WHERE expires_at <= v_now), 0),
           COALESCE(sum(remaining_micros) FILTER (WHERE expires_at IS NULL OR expires_at > v_now), 0)
      INTO v_expired, v_kept
      FROM credit_grants WHERE account_id = p_account_id AND remaining_micros > 0;
    v_expire := v_expired - LEAST(v_expired, GREATEST(0, v_held - v_kept));
    FOR g IN SELECT * FROM credit_grants
              WHERE account_id = p_account_id AND remaining_micros > 0 AND expires_at <= v_now
              ORDER BY expires_at, id
    LOOP
        EXIT WHEN v_expire = 0;
        v_take := LEAST(g.remaining_micros, v_expire);
        v_expire := v_expire - v_take;
        UPDATE accounts a SET debits_posted = a.debits_posted + v_take WHERE a.id = p_account_id
        RETURNING a.credits_posted - a.debits_posted INTO v_balance;
        INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, description,
                               balance_after_micros, grant_id)
        VALUES (p_account_id, p_account_id, 'op_expired', v_take, 'expiry',
                format('the unspent credit of grant %s, expired at %s', g.id, g.expires_at), v_balance, g.id)
        RETURNING transfers.id INTO v_transfer;
        UPDATE credit_grants SET remaining_micros = remaining_micros - v_take,
                                 expired_micros = expired_micros + v_take
         WHERE id = g.id;
        PERFORM meterline_webhook_emit(p_account_id, 'credit.expired', jsonb_build_object(
            'account_id', p_account_id, 'grant_id', g.id, 'category', g.category, 'expired_micros', v_take,
            'expires_at', g.expires_at, 'remaining_micros', g.remaining_micros - v_take, 'transfer_id', v_transfer,
            'balance_micros', v_balance), 'credit.expired:' || v_transfer, NULL);
        v_count := v_count + 1;
    END LOOP;
    UPDATE accounts a SET grants_due_at = (
        SELECT min(CASE WHEN posted_at IS NULL THEN effective_at ELSE expires_at END) FROM credit_grants
         WHERE account_id = p_account_id AND (posted_at IS NULL OR remaining_micros > 0))
     WHERE a.id = p_account_id;
    RETURN v_count;
END $$;

-- grant: a paid or promotional grant of p_amount, effective at p_effective_at (NULL: now; a time in the past is
-- posted now) and expiring at p_expires_at (NULL: never). Errors: 22023 = a bad grant, ML003 = no such customer
-- account.
CREATE OR REPLACE FUNCTION meterline_grant(
    p_account_id text, p_category text, p_amount bigint, p_priority integer, p_effective_at timestamptz,
    p_expires_at timestamptz, p_description text
) RETURNS SETOF credit_grants LANGUAGE plpgsql AS $$
DECLARE
    v_now       timestamptz := meterline_now();
    v_effective timestamptz := COALESCE(p_effective_at, meterline_now());
    v_due       timestamptz;
    v_id        text;
BEGIN
    IF p_category NOT IN ('paid', 'promotional') OR p_amount IS NULL OR p_amount <= 0
       OR p_priority NOT BETWEEN 0 AND 100 OR p_expires_at <= v_effective OR p_expires_at <= v_now THEN
        RAISE EXCEPTION 'bad grant: % of % at priority %, effective %, expiring %', p_category, p_amount,
            p_priority, v_effective, p_expires_at USING ERRCODE = '22023';
    END IF;
    SELECT a.grants_due_at INTO v_due FROM accounts a WHERE a.id = p_account_id AND a.kind = 'customer' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no customer account %', p_account_id USING ERRCODE = 'ML003';
    END IF;
    IF v_due <= v_now THEN
        PERFORM meterline_grants_due(p_account_id);
    END IF;
    v_id := 'grant_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 24);
    INSERT INTO credit_grants (id, account_id, category, priority, amount_micros, effective_at, expires_at,
                               description)
    VALUES (v_id, p_account_id, p_category, p_priority, p_amount, v_effective, p_expires_at, p_description);
    IF v_effective <= v_now THEN
        PERFORM meterline_grant_post(v_id, CASE p_category WHEN 'paid' THEN 'topup' ELSE 'grant' END);
    END IF;
    UPDATE accounts a
       SET grants_due_at = LEAST(a.grants_due_at, CASE WHEN v_effective > v_now THEN v_effective END, p_expires_at)
     WHERE a.id = p_account_id;
    RETURN QUERY SELECT * FROM credit_grants WHERE id = v_id;
END $$;

-- grants sweep: bring up to p_limit accounts whose grants are due to the clock. SKIP LOCKED lets any number of
-- sweepers run at once, and meterline_grants_due decides under the account's lock, so each grant is posted and
-- expired once. Returns how many accounts it brought forward.
CREATE OR REPLACE FUNCTION meterline_grants_sweep(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_count   integer := 0;
BEGIN
    FOR v_account IN
        SELECT a.id FROM accounts a WHERE a.grants_due_at <= meterline_now()
         ORDER BY a.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM meterline_grants_due(v_account);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END $$;

-- Which numbered migrations this database has (billing.schema): a database built from this file has them all.
CREATE TABLE meterline_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO meterline_migrations (version, name) VALUES
    (1, 'initial'),
    (2, 'ledger_refuses_truncate'),
    (3, 'conversations'),
    (4, 'console'),
    (5, 'usage_daily'),
    (6, 'webhooks'),
    (7, 'client_request_id'),
    (8, 'providers'),
    (9, 'stripe_payments'),
    (10, 'auto_topup'),
    (11, 'credit_grants'),
    (12, 'quotas');
