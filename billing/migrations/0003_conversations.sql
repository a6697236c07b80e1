-- Migration 0003: stored conversations and memory (lumyx's Detailed Logging), per key.

ALTER TABLE api_keys ADD COLUMN detailed_logging boolean NOT NULL DEFAULT false;

-- Gateways cache the setting with the key, so changing it must be announced like a revocation.
DROP TRIGGER api_keys_changed ON api_keys;
CREATE TRIGGER api_keys_changed
    AFTER INSERT OR DELETE OR UPDATE OF account_id, name, prefix, digest, revoked_at, rpm_limit, rpd_limit,
        detailed_logging
    ON api_keys FOR EACH ROW EXECUTE FUNCTION meterline_key_changed();

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
