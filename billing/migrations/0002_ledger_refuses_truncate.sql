-- Migration 0002: the ledger refuses TRUNCATE as it refuses UPDATE and DELETE; numbered migrations replace the
-- digest of a whole schema.sql (meterline_schema), which could not change a column or a function's signature.

DROP TABLE IF EXISTS meterline_schema;

CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION meterline_append_only();
CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON holds
    FOR EACH STATEMENT EXECUTE FUNCTION meterline_append_only();
