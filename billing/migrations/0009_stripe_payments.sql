-- Migration 0009: Stripe top-ups (issue 16). An account is linked to its Stripe customer, payments are recorded,
-- and meterline_post may overdraw for a reversal of paid money (a refund or a lost dispute).

ALTER TABLE accounts ADD COLUMN stripe_customer_id text UNIQUE;

-- Payments (issue 16): money a customer paid through Stripe, one row per Checkout Session. A row is written when
-- the session is created (status open) and turned paid by exactly one webhook delivery: the conditional UPDATE
-- on status is the gate, in the same transaction as the top-up it posts. `kind` leaves room for other ways in
-- (an auto top-up's PaymentIntent). Reversals are cumulative per payment: refunded_micros follows the charge's
-- amount_refunded (a delivery posts only what it adds), and a lost dispute is recorded once by its id.
CREATE TABLE payments (
    id              text PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    kind            text NOT NULL CHECK (kind IN ('checkout')),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid')),
    session_id      text NOT NULL UNIQUE,
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
    CHECK (refunded_micros + disputed_micros <= COALESCE(paid_micros, 0))
);
CREATE INDEX payments_account ON payments (account_id, created_at);

-- A new argument is a new signature: the old four-argument function is dropped, so a call with four stays
-- unambiguous (the default fills the fifth).
DROP FUNCTION meterline_post(text, text, bigint, text);

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
                   >= a.low_balance_micros THEN NULL ELSE a.low_balance_alerted_at END
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
