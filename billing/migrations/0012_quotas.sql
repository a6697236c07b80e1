-- Migration 0012: quota grants (issue 17). A gateway process holds a quota on an account: a durable hold, decided
-- atomically like any hold, which the process spends call by call in memory and charges as each call ends. A call
-- charged under a quota gets its hold row at settlement (born settled or voided), so one statement and one commit
-- take the call from admitted to charged. A quota's in-flight calls are written onto it off the critical path (the
-- intent record), so the reconciliation report names those whose charge never came when a process dies.

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

-- Whether a key has a spend limit is cached with it (its calls take per-call holds, never a quota): setting or
-- clearing one is announced to every gateway like the key's other cached columns.
DROP TRIGGER api_keys_changed ON api_keys;
CREATE TRIGGER api_keys_changed
    AFTER INSERT OR DELETE OR UPDATE OF account_id, name, prefix, digest, revoked_at, rpm_limit, rpd_limit,
        detailed_logging, limit_micros
    ON api_keys FOR EACH ROW EXECUTE FUNCTION meterline_key_changed();

-- The quota a call was charged under (NULL: its own per-call hold).
ALTER TABLE holds ADD COLUMN quota_id text;

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
