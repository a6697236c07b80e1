-- Migration 0006: webhooks (Standard Webhooks), delivered from a transactional outbox.

-- balance.low: an account's threshold (NULL: no alert) and when the alert for the current dip was written.
ALTER TABLE accounts ADD COLUMN low_balance_micros bigint CHECK (low_balance_micros >= 0);
ALTER TABLE accounts ADD COLUMN low_balance_alerted_at timestamptz;

-- A video job may name its own webhook URL (Lumenfall's `webhook_url`): its events go there too.
ALTER TABLE videos ADD COLUMN webhook_url text;

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

-- post: a top-up or an adjustment between a customer account and an operator account. A positive amount credits
-- the customer; a negative adjustment debits it only if the available balance covers it (decided under the row
-- lock). A top-up writes its `topup.posted` webhook event with it. Errors: ML001 = insufficient available balance,
-- ML003 = no such customer account.
CREATE OR REPLACE FUNCTION meterline_post(
    p_account_id text, p_kind text, p_amount bigint, p_description text
) RETURNS TABLE (transfer_id bigint, balance_after bigint, held bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_operator text := CASE p_kind WHEN 'topup' THEN 'op_funding' ELSE 'op_adjustments' END;
    v_balance  bigint;
    v_held     bigint;
    v_id       bigint;
    v_created  timestamptz;
BEGIN
    IF p_kind NOT IN ('topup', 'adjustment') OR p_amount = 0 OR (p_kind = 'topup' AND p_amount < 0) THEN
        RAISE EXCEPTION 'bad posting: % of %', p_kind, p_amount USING ERRCODE = '22023';
    END IF;
    IF p_amount > 0 THEN
        UPDATE accounts a SET credits_posted = a.credits_posted + p_amount,
               -- a credit that lifts the available balance back to the low-balance threshold re-arms its alert
               low_balance_alerted_at = CASE WHEN a.credits_posted + p_amount - a.debits_posted - a.held_micros
                   >= a.low_balance_micros THEN NULL ELSE a.low_balance_alerted_at END
         WHERE a.id = p_account_id AND a.kind = 'customer'
        RETURNING a.credits_posted - a.debits_posted, a.held_micros INTO v_balance, v_held;
    ELSE
        UPDATE accounts a SET debits_posted = a.debits_posted - p_amount
         WHERE a.id = p_account_id AND a.kind = 'customer'
           AND a.credits_posted - a.debits_posted - a.held_micros >= -p_amount
        RETURNING a.credits_posted - a.debits_posted, a.held_micros INTO v_balance, v_held;
        IF NOT FOUND THEN
            SELECT a.credits_posted - a.debits_posted - a.held_micros INTO v_balance
              FROM accounts a WHERE a.id = p_account_id AND a.kind = 'customer';
            IF FOUND THEN
                RAISE EXCEPTION 'available balance does not cover a debit of % micros', -p_amount
                    USING ERRCODE = 'ML001', DETAIL = v_balance::text;
            END IF;
        END IF;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no customer account %', p_account_id USING ERRCODE = 'ML003';
    END IF;
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, description,
                           balance_after_micros)
    VALUES (p_account_id,
            CASE WHEN p_amount > 0 THEN v_operator ELSE p_account_id END,
            CASE WHEN p_amount > 0 THEN p_account_id ELSE v_operator END,
            abs(p_amount), p_kind, p_description, v_balance)
    RETURNING transfers.id, transfers.created_at INTO v_id, v_created;
    IF p_kind = 'topup' THEN  -- its webhook event, in the same transaction (the outbox)
        PERFORM meterline_webhook_emit(p_account_id, 'topup.posted', jsonb_build_object(
            'account_id', p_account_id, 'transfer_id', v_id, 'amount_micros', p_amount,
            'balance_micros', v_balance, 'available_micros', v_balance - v_held, 'description', p_description,
            'created_at', v_created), 'topup.posted:' || v_id, NULL);
    END IF;
    RETURN QUERY SELECT v_id, v_balance, v_held, v_created;
END $$;

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

-- settle: post the actual charge and release the hold. Exactly once: a resolved hold returns its stored outcome
-- (replayed = true) and writes nothing. actual > held still posts in full; the excess is recorded as overrun. A
-- charge that takes the available balance below the account's low_balance_micros writes a `balance.low` webhook
-- event, once until a credit lifts the balance back over it (meterline_post re-arms it).
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
    v_held    bigint;
    v_low     bigint;
    v_alerted timestamptz;
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
    UPDATE accounts a
       SET held_micros = a.held_micros - v_release, debits_posted = a.debits_posted + p_actual,
           low_balance_alerted_at = CASE WHEN a.low_balance_alerted_at IS NULL
               AND a.credits_posted - a.debits_posted - p_actual - a.held_micros + v_release < a.low_balance_micros
               THEN now() ELSE a.low_balance_alerted_at END
     WHERE a.id = h.account_id
    RETURNING a.credits_posted - a.debits_posted, a.held_micros, a.low_balance_micros, a.low_balance_alerted_at
         INTO v_balance, v_held, v_low, v_alerted;
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, request_id,
                           overrun_micros, estimated, balance_after_micros)
    VALUES (h.account_id, h.account_id, 'op_revenue', p_actual, 'charge', p_request_id,
            v_overrun, p_estimated, v_balance);
    IF v_alerted = now() THEN  -- crossed below by this charge (or another of this transaction: deduplicated)
        PERFORM meterline_webhook_emit(h.account_id, 'balance.low', jsonb_build_object(
            'account_id', h.account_id, 'available_micros', v_balance - v_held, 'balance_micros', v_balance,
            'threshold_micros', v_low), 'balance.low:' || h.account_id || ':' || v_alerted, NULL);
    END IF;
    PERFORM meterline_key_release(h, v_release, p_actual);
    UPDATE holds SET state = 'settled', actual_micros = p_actual, overrun_micros = v_overrun,
                     expired_first = (h.state = 'expired'), resolved_at = COALESCE(h.resolved_at, now())
     WHERE holds.request_id = p_request_id;
    PERFORM meterline_record(p_request_id, h, 'settled', p_actual, p_estimated, v_overrun, p_record);
    RETURN QUERY SELECT 'settled'::text, h.amount_micros, p_actual, v_overrun, false, v_balance;
END $$;
