-- The extension registry (REFERENCE.md §2) plus `policies`.
--
-- CHECK constraints keep rows out that no router could use (unknown type, weight out
-- of 0..100, JSON that is not an object). Range limits that operators can tune
-- (timeout_ms within 10..5000, retry <= 3) are enforced by the router's validation
-- instead, so changing `[limits]` never needs a migration; a row that breaks them is
-- refused at reload with the table, row and field named, and the previous snapshot
-- keeps serving.

CREATE TABLE extensions (
    id          text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    type        text NOT NULL CHECK (type IN ('pre', 'validator', 'post', 'provider')),
    subject     text NOT NULL CHECK (length(subject) BETWEEN 1 AND 512),
    timeout_ms  integer NOT NULL DEFAULT 5000 CHECK (timeout_ms > 0),
    retry       integer NOT NULL DEFAULT 0 CHECK (retry >= 0),
    enabled     boolean NOT NULL DEFAULT true,
    version     text NOT NULL DEFAULT 'v1' CHECK (length(version) BETWEEN 1 AND 32),
    config      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(config) = 'object'),
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text,
    updated_by  text
);

CREATE TABLE extension_versions (
    id            text NOT NULL REFERENCES extensions (id) ON DELETE CASCADE,
    version       text NOT NULL CHECK (length(version) BETWEEN 1 AND 32),
    subject       text NOT NULL CHECK (length(subject) BETWEEN 1 AND 512),
    timeout_ms    integer NOT NULL CHECK (timeout_ms > 0),
    retry         integer NOT NULL CHECK (retry >= 0),
    config        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(config) = 'object'),
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    routing_rules jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(routing_rules) = 'object'),
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text,
    PRIMARY KEY (id, version)
);

CREATE TABLE extension_instances (
    extension_id      text NOT NULL REFERENCES extensions (id) ON DELETE CASCADE,
    instance_id       text NOT NULL CHECK (length(instance_id) BETWEEN 1 AND 255),
    subject           text NOT NULL CHECK (length(subject) BETWEEN 1 AND 512),
    weight            integer NOT NULL DEFAULT 100 CHECK (weight BETWEEN 0 AND 100),
    enabled           boolean NOT NULL DEFAULT true,
    health_status     text NOT NULL DEFAULT 'unknown'
                      CHECK (health_status IN ('healthy', 'degraded', 'unhealthy', 'unknown')),
    last_health_check timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (extension_id, instance_id)
);

-- Health as last written by the routers (see docs/RUNBOOK.md for what it means with
-- several routers). No foreign key: a router in fixtures or auto mode may report
-- health for an extension the database does not hold.
CREATE TABLE extension_health (
    extension_id              text PRIMARY KEY,
    last_success              timestamptz,
    last_failure              timestamptz,
    success_count             bigint NOT NULL DEFAULT 0,
    failure_count             bigint NOT NULL DEFAULT 0,
    avg_latency_ms            double precision,
    p50_latency_ms            double precision,
    p95_latency_ms            double precision,
    p99_latency_ms            double precision,
    circuit_breaker_state     text NOT NULL DEFAULT 'closed'
                              CHECK (circuit_breaker_state IN ('closed', 'open', 'half_open')),
    circuit_breaker_opened_at timestamptz,
    failure_threshold         integer,
    error_rate_threshold      double precision,
    open_timeout_ms           integer,
    half_open_max_requests    integer,
    updated_at                timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE extension_audit_log (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    extension_id text NOT NULL,
    action       text NOT NULL CHECK (action IN ('create', 'update', 'delete', 'enable', 'disable')),
    old_values   jsonb,
    new_values   jsonb,
    changed_by   text,
    changed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX extension_audit_log_extension_idx ON extension_audit_log (extension_id, changed_at);

-- One policy document per (tenant, policy), the same JSON as a policy fixture file.
CREATE TABLE policies (
    tenant_id  text NOT NULL CHECK (length(tenant_id) BETWEEN 1 AND 255),
    policy_id  text NOT NULL CHECK (length(policy_id) BETWEEN 1 AND 255),
    policy     jsonb NOT NULL CHECK (jsonb_typeof(policy) = 'object'),
    enabled    boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, policy_id)
);

-- Keep updated_at honest whatever client writes the row.
CREATE FUNCTION beamline_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER extensions_touch BEFORE UPDATE ON extensions
    FOR EACH ROW EXECUTE FUNCTION beamline_touch_updated_at();
CREATE TRIGGER extension_instances_touch BEFORE UPDATE ON extension_instances
    FOR EACH ROW EXECUTE FUNCTION beamline_touch_updated_at();
CREATE TRIGGER policies_touch BEFORE UPDATE ON policies
    FOR EACH ROW EXECUTE FUNCTION beamline_touch_updated_at();

-- Every committed change to the registry tables wakes every router through
-- LISTEN/NOTIFY on channel `beamline_registry`. One notification per statement (a bulk
-- UPDATE is one reload, not thousands); PostgreSQL delivers it only after COMMIT and
-- folds identical payloads of one transaction into one.
CREATE FUNCTION beamline_registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('beamline_registry', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER extensions_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON extensions
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_notify();
CREATE TRIGGER extension_versions_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON extension_versions
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_notify();
CREATE TRIGGER extension_instances_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON extension_instances
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_notify();
CREATE TRIGGER policies_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION beamline_registry_notify();
