-- Migration 0011: credit grants (issue 16), and expired Checkout Sessions. Every credit is a grant (paid or
-- promotional, with a priority, an effective time and an optional expiry); charges and debits draw on the grants in the
-- spending order, and the unspent part of a grant is transferred to op_expired when it expires. Existing balances
-- become one paid grant per account, so every balance stays what it was.

ALTER TABLE accounts
    DROP CONSTRAINT accounts_kind_check,
    ADD CONSTRAINT accounts_kind_check
        CHECK (kind IN ('customer', 'revenue', 'funding', 'adjustments', 'promotions', 'expired')),
    ADD COLUMN grants_due_at timestamptz;
CREATE INDEX accounts_grants_due ON accounts (grants_due_at) WHERE grants_due_at IS NOT NULL;

ALTER TABLE transfers
    DROP CONSTRAINT transfers_kind_check,
    ADD CONSTRAINT transfers_kind_check
        CHECK (kind IN ('topup', 'adjustment', 'charge', 'grant', 'expiry', 'refund')),
    ADD COLUMN grant_id text;

-- The card the account last paid a checkout with (saved off-session): what an auto top-up charges by default.
ALTER TABLE accounts ADD COLUMN stripe_payment_method text;

-- A Checkout Session that expired unpaid (checkout.session.expired) leaves its payment `expired`, not open.
ALTER TABLE payments
    DROP CONSTRAINT payments_status_check,
    ADD CONSTRAINT payments_status_check CHECK (status IN ('open', 'paid', 'failed', 'expired'));

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

-- Existing balances: one paid grant per account in credit, with no transfer (its credits are posted already).
INSERT INTO credit_grants (id, account_id, category, amount_micros, remaining_micros, effective_at, description,
                           posted_at)
SELECT 'grant_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 24), a.id, 'paid',
       a.credits_posted - a.debits_posted, a.credits_posted - a.debits_posted, a.created_at,
       'the balance before credit grants', now()
  FROM accounts a WHERE a.kind = 'customer' AND a.credits_posted > a.debits_posted;

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

-- The money steps draw on the grants and bring them to the clock first.

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
    v_due     timestamptz;
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
              a.auto_topup_fired_at, a.grants_due_at
         INTO v_balance, v_held, v_low, v_alerted, v_topup, v_due;
    INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, request_id,
                           overrun_micros, estimated, balance_after_micros)
    VALUES (h.account_id, h.account_id, 'op_revenue', p_actual, 'charge', p_request_id,
            v_overrun, p_estimated, v_balance);
    IF p_actual > 0 THEN  -- the charge is drawn from the account's grants in the spending order
        PERFORM meterline_grants_draw(h.account_id, p_actual, false);
    END IF;
    IF v_due <= meterline_now() THEN  -- an expiry waiting on this hold, or a grant's time come
        PERFORM meterline_grants_due(h.account_id);
    END IF;
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
