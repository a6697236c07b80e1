-- Migration 0008: several providers per model (issue 15). A request record says which provider served it, under
-- which model id, every provider tried, and the upstream's own id for the call; a video job keeps the provider
-- that accepted it. Records written before stay as they were (these columns NULL).

ALTER TABLE requests ADD COLUMN provider text;
ALTER TABLE requests ADD COLUMN provider_model text;
ALTER TABLE requests ADD COLUMN attempts jsonb;
ALTER TABLE requests ADD COLUMN generation_id text;
CREATE INDEX requests_account_generation ON requests (account_id, generation_id) WHERE generation_id IS NOT NULL;

ALTER TABLE videos ADD COLUMN provider text;
ALTER TABLE videos ADD COLUMN provider_model text;
ALTER TABLE videos ADD COLUMN upstream_cost_micros bigint;
ALTER TABLE videos ADD COLUMN attempts jsonb;

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
