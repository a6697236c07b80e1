-- Migration 0006: webhooks (Standard Webhooks), delivered from a transactional outbox.

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
        UPDATE accounts a SET credits_posted = a.credits_posted + p_amount
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
