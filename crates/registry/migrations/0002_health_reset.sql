-- Health written by several routers, and the runbook's manual breaker reset.
--
-- Routers write extension_health inside transactions that `SET LOCAL
-- beamline.writer = 'router'`. Any other change that closes a breaker — the
-- runbook's `UPDATE extension_health SET circuit_breaker_state = 'closed', …` — is an
-- operator's reset: the trigger stamps `manual_reset_at` and notifies channel
-- `beamline_health`, and every router closes its live breaker at once (or at its next
-- sync, if it was not listening).

ALTER TABLE extension_health
    ADD COLUMN manual_reset_at timestamptz,
    ADD COLUMN updated_by text;

CREATE FUNCTION beamline_health_manual_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Any write by someone other than a router that leaves the breaker closed is a
    -- request to close it (the row may still say 'closed' from a router's last
    -- report while that router's live breaker has opened since).
    IF coalesce(current_setting('beamline.writer', true), '') <> 'router'
       AND NEW.circuit_breaker_state = 'closed' THEN
        NEW.manual_reset_at := clock_timestamp();
        -- Who reset it: the writer's own value when it set one (`breaker reset` writes
        -- the API key's name), else the database user behind the SQL.
        IF TG_OP = 'INSERT' THEN
            NEW.updated_by := coalesce(NEW.updated_by, 'sql:' || current_user);
        ELSIF NEW.updated_by IS NOT DISTINCT FROM OLD.updated_by THEN
            NEW.updated_by := 'sql:' || current_user;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER extension_health_manual_reset BEFORE INSERT OR UPDATE ON extension_health
    FOR EACH ROW EXECUTE FUNCTION beamline_health_manual_reset();

CREATE FUNCTION beamline_health_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('beamline_health', NEW.extension_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER extension_health_notify_update AFTER UPDATE ON extension_health
    FOR EACH ROW
    WHEN (NEW.manual_reset_at IS DISTINCT FROM OLD.manual_reset_at)
    EXECUTE FUNCTION beamline_health_notify();
CREATE TRIGGER extension_health_notify_insert AFTER INSERT ON extension_health
    FOR EACH ROW
    WHEN (NEW.manual_reset_at IS NOT NULL)
    EXECUTE FUNCTION beamline_health_notify();
