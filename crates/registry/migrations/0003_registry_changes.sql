-- A log of which registry keys each transaction changed, so a router woken by NOTIFY
-- re-reads only those instead of everything.
--
-- 0001's triggers only said "a table changed", and every router answered with a full
-- reload: at 10 000 extensions about 100 ms of work per router per commit. Now every
-- statement also records the keys it touched in `registry_changes`, stamped with its
-- transaction id. A router remembers the MVCC snapshot (`pg_current_snapshot()`) its
-- registry state was read at; woken by NOTIFY, it opens one REPEATABLE READ
-- transaction, takes the keys of every transaction visible now but not at its last
-- read, and re-reads exactly those. Its new state is therefore exactly the database
-- at one instant: a transaction that changed two extensions is never seen half
-- applied, whatever order the notifications arrive in.
--
-- The key is the extension id for extensions, extension_versions and
-- extension_instances (a router rebuilds that extension's entry whole) and the
-- tenant id for policies. A statement over more than 256 keys, or a TRUNCATE, logs
-- one row with a NULL key: "read everything". Rows older than an hour are pruned by
-- `beamline_registry_prune_changes()` (routers call it on their periodic sync); a
-- router whose state is older than that does a full reload instead.
--
-- PostgreSQL allows transition tables only on single-event triggers, hence one
-- trigger per event.

CREATE TABLE registry_changes (
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_name text NOT NULL,
    key        text,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX registry_changes_changed_at_idx ON registry_changes (changed_at);

-- SECURITY DEFINER: a role allowed to edit the registry tables need not be granted
-- anything on the log.
CREATE FUNCTION beamline_registry_log(tbl text, keys text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF keys IS NULL OR cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    IF cardinality(keys) > 256 THEN
        INSERT INTO registry_changes (table_name, key) VALUES (tbl, NULL);
    ELSE
        INSERT INTO registry_changes (table_name, key) SELECT tbl, k FROM unnest(keys) k;
    END IF;
    PERFORM pg_notify('beamline_registry', tbl);
END;
$$;

CREATE FUNCTION beamline_registry_prune_changes() RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM registry_changes WHERE changed_at < clock_timestamp() - interval '1 hour'
        RETURNING 1
    )
    SELECT count(*) FROM gone;
$$;

-- One function for every row-event trigger; its argument names the key column.
-- Only the branch of the firing event runs, so each reads only the transition
-- tables its trigger has.
CREATE FUNCTION beamline_registry_log_keys() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    keys text[];
    col text := quote_ident(TG_ARGV[0]);
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT array_agg(DISTINCT %s) FROM new_rows', col) INTO keys;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE format(
            'SELECT array_agg(DISTINCT k) FROM '
            '(SELECT %s AS k FROM new_rows UNION SELECT %s FROM old_rows) changed',
            col, col) INTO keys;
    ELSE
        EXECUTE format('SELECT array_agg(DISTINCT %s) FROM old_rows', col) INTO keys;
    END IF;
    PERFORM beamline_registry_log(TG_TABLE_NAME, keys);
    RETURN NULL;
END;
$$;

CREATE FUNCTION beamline_registry_log_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM beamline_registry_log(TG_TABLE_NAME, ARRAY[NULL::text]);
    RETURN NULL;
END;
$$;

DROP TRIGGER extensions_notify ON extensions;
DROP TRIGGER extension_versions_notify ON extension_versions;
DROP TRIGGER extension_instances_notify ON extension_instances;
DROP TRIGGER policies_notify ON policies;

CREATE TRIGGER extensions_log_insert AFTER INSERT ON extensions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('id');
CREATE TRIGGER extensions_log_update AFTER UPDATE ON extensions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('id');
CREATE TRIGGER extensions_log_delete AFTER DELETE ON extensions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('id');
CREATE TRIGGER extensions_log_truncate AFTER TRUNCATE ON extensions
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_truncate();

CREATE TRIGGER extension_versions_log_insert AFTER INSERT ON extension_versions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('id');
CREATE TRIGGER extension_versions_log_update AFTER UPDATE ON extension_versions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('id');
CREATE TRIGGER extension_versions_log_delete AFTER DELETE ON extension_versions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('id');
CREATE TRIGGER extension_versions_log_truncate AFTER TRUNCATE ON extension_versions
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_truncate();

CREATE TRIGGER extension_instances_log_insert AFTER INSERT ON extension_instances
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('extension_id');
CREATE TRIGGER extension_instances_log_update AFTER UPDATE ON extension_instances
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('extension_id');
CREATE TRIGGER extension_instances_log_delete AFTER DELETE ON extension_instances
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('extension_id');
CREATE TRIGGER extension_instances_log_truncate AFTER TRUNCATE ON extension_instances
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_truncate();

CREATE TRIGGER policies_log_insert AFTER INSERT ON policies
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('tenant_id');
CREATE TRIGGER policies_log_update AFTER UPDATE ON policies
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('tenant_id');
CREATE TRIGGER policies_log_delete AFTER DELETE ON policies
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_keys('tenant_id');
CREATE TRIGGER policies_log_truncate AFTER TRUNCATE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_log_truncate();
