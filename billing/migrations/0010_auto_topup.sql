-- Migration 0010: auto top-up (issue 16). A rule per account charges its saved card off session when a charge
-- takes the available balance below its threshold; the trigger is an open auto_topup payment, recorded by
-- meterline_settle in the charge's own transaction, and re-armed by meterline_post as the low-balance alert is.

ALTER TABLE accounts ADD COLUMN auto_topup_micros bigint, ADD COLUMN auto_topup_fired_at timestamptz;

ALTER TABLE payments
    DROP CONSTRAINT payments_kind_check,
    ADD CONSTRAINT payments_kind_check CHECK (kind IN ('checkout', 'auto_topup')),
    DROP CONSTRAINT payments_status_check,
    ADD CONSTRAINT payments_status_check CHECK (status IN ('open', 'paid', 'failed')),
    ALTER COLUMN session_id DROP NOT NULL,
    ADD COLUMN payment_method text,
    ADD COLUMN failure text,
    ADD CONSTRAINT payments_session_check CHECK (kind = 'auto_topup' OR session_id IS NOT NULL);

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

-- settle: post the actual charge and release the hold. Exactly once: a resolved hold returns its stored outcome
-- (replayed = true) and writes nothing. actual > held still posts in full; the excess is recorded as overrun. A
-- charge that takes the available balance below the account's low_balance_micros writes a `balance.low` webhook
-- event, once until a credit lifts the balance back over it (meterline_post re-arms it). A charge that takes it
-- below an enabled auto top-up rule's threshold records the rule's trigger (an open auto_topup payment), likewise
-- once until a credit lifts it back.
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
    v_topup   timestamptz;
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
               THEN now() ELSE a.low_balance_alerted_at END,
           auto_topup_fired_at = CASE WHEN a.auto_topup_fired_at IS NULL
               AND a.credits_posted - a.debits_posted - p_actual - a.held_micros + v_release < a.auto_topup_micros
               THEN now() ELSE a.auto_topup_fired_at END
     WHERE a.id = h.account_id
    RETURNING a.credits_posted - a.debits_posted, a.held_micros, a.low_balance_micros, a.low_balance_alerted_at,
              a.auto_topup_fired_at
         INTO v_balance, v_held, v_low, v_alerted, v_topup;
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, request_id,
                           overrun_micros, estimated, balance_after_micros)
    VALUES (h.account_id, h.account_id, 'op_revenue', p_actual, 'charge', p_request_id,
            v_overrun, p_estimated, v_balance);
    IF v_alerted = now() THEN  -- crossed below by this charge (or another of this transaction: deduplicated)
        PERFORM meterline_webhook_emit(h.account_id, 'balance.low', jsonb_build_object(
            'account_id', h.account_id, 'available_micros', v_balance - v_held, 'balance_micros', v_balance,
            'threshold_micros', v_low), 'balance.low:' || h.account_id || ':' || v_alerted, NULL);
    END IF;
    IF v_topup = now() THEN  -- crossed below the auto top-up threshold: the trigger is recorded with the charge
        PERFORM meterline_auto_topup_fire(h.account_id);
    END IF;
    PERFORM meterline_key_release(h, v_release, p_actual);
    UPDATE holds SET state = 'settled', actual_micros = p_actual, overrun_micros = v_overrun,
                     expired_first = (h.state = 'expired'), resolved_at = COALESCE(h.resolved_at, now())
     WHERE holds.request_id = p_request_id;
    PERFORM meterline_record(p_request_id, h, 'settled', p_actual, p_estimated, v_overrun, p_record);
    RETURN QUERY SELECT 'settled'::text, h.amount_micros, p_actual, v_overrun, false, v_balance;
END $$;

-- post: a top-up or an adjustment between a customer account and an operator account. A positive amount credits
-- the customer; a negative adjustment debits it only if the available balance covers it (decided under the row
-- lock), unless `p_overdraw`: a reversal of money the customer paid (a Stripe refund or lost dispute) is posted in
-- full even when it was already spent, and the part the available balance did not cover is recorded as overrun
-- (the same debt an overrunning charge leaves: the account takes no new hold until it is paid). A top-up writes
-- its `topup.posted` webhook event with it. Errors: ML001 = insufficient available balance, ML003 = no such
-- customer account.
CREATE OR REPLACE FUNCTION meterline_post(
    p_account_id text, p_kind text, p_amount bigint, p_description text, p_overdraw boolean DEFAULT false
) RETURNS TABLE (transfer_id bigint, balance_after bigint, held bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_operator text := CASE p_kind WHEN 'topup' THEN 'op_funding' ELSE 'op_adjustments' END;
    v_balance  bigint;
    v_held     bigint;
    v_id       bigint;
    v_created  timestamptz;
    v_overrun  bigint := 0;
BEGIN
    IF p_kind NOT IN ('topup', 'adjustment') OR p_amount = 0 OR (p_kind = 'topup' AND p_amount < 0) THEN
        RAISE EXCEPTION 'bad posting: % of %', p_kind, p_amount USING ERRCODE = '22023';
    END IF;
    IF p_amount > 0 THEN
        UPDATE accounts a SET credits_posted = a.credits_posted + p_amount,
               -- a credit that lifts the available balance back to the low-balance threshold re-arms its alert
               low_balance_alerted_at = CASE WHEN a.credits_posted + p_amount - a.debits_posted - a.held_micros
                   >= a.low_balance_micros THEN NULL ELSE a.low_balance_alerted_at END,
               -- and the auto top-up rule
               auto_topup_fired_at = CASE WHEN a.credits_posted + p_amount - a.debits_posted - a.held_micros
                   >= a.auto_topup_micros THEN NULL ELSE a.auto_topup_fired_at END
         WHERE a.id = p_account_id AND a.kind = 'customer'
        RETURNING a.credits_posted - a.debits_posted, a.held_micros INTO v_balance, v_held;
    ELSE
        UPDATE accounts a SET debits_posted = a.debits_posted - p_amount
         WHERE a.id = p_account_id AND a.kind = 'customer'
           AND (p_overdraw OR a.credits_posted - a.debits_posted - a.held_micros >= -p_amount)
        RETURNING a.credits_posted - a.debits_posted, a.held_micros INTO v_balance, v_held;
        IF NOT FOUND THEN
            SELECT a.credits_posted - a.debits_posted - a.held_micros INTO v_balance
              FROM accounts a WHERE a.id = p_account_id AND a.kind = 'customer';
            IF FOUND THEN
                RAISE EXCEPTION 'available balance does not cover a debit of % micros', -p_amount
                    USING ERRCODE = 'ML001', DETAIL = v_balance::text;
            END IF;
        ELSE
            -- the part of this debit below zero available (never more than the debit: an earlier debt is its own)
            v_overrun := LEAST(-p_amount, GREATEST(0, v_held - v_balance));
        END IF;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no customer account %', p_account_id USING ERRCODE = 'ML003';
    END IF;
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, description,
                           balance_after_micros, overrun_micros)
    VALUES (p_account_id,
            CASE WHEN p_amount > 0 THEN v_operator ELSE p_account_id END,
            CASE WHEN p_amount > 0 THEN p_account_id ELSE v_operator END,
            abs(p_amount), p_kind, p_description, v_balance, v_overrun)
    RETURNING transfers.id, transfers.created_at INTO v_id, v_created;
    IF p_kind = 'topup' THEN  -- its webhook event, in the same transaction (the outbox)
        PERFORM meterline_webhook_emit(p_account_id, 'topup.posted', jsonb_build_object(
            'account_id', p_account_id, 'transfer_id', v_id, 'amount_micros', p_amount,
            'balance_micros', v_balance, 'available_micros', v_balance - v_held, 'description', p_description,
            'created_at', v_created), 'topup.posted:' || v_id, NULL);
    END IF;
    RETURN QUERY SELECT v_id, v_balance, v_held, v_created;
END $$;
