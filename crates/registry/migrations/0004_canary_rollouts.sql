-- Progressive delivery (DESIGN.md §12): canary rollouts judged by the routers.
--
-- `extension_rollouts` holds each rollout's plan and where it stands. The state lives
-- here, not in any router: the router that holds the judge's advisory lock reads a
-- rollout, judges its current step from the whole cluster's traffic, and writes its
-- move (the candidate's routing_rules, the new state and step) in one transaction;
-- if it dies, the next lock holder continues from the same row. At most one rollout
-- per extension is active (pending, running or paused) at a time.
--
-- `extension_rollout_history` is every move of every rollout: who (a router's judge
-- or an API key), when, from which state to which, at which step, with the
-- measurements and the reason.
--
-- `extension_version_health` is what every router reports, once per evaluation
-- interval, about each version of an extension under an active rollout: calls,
-- errors, a latency histogram and breaker openings since its previous report. The
-- judge sums the rows of every router since the step started. Rows are pruned an hour
-- after they stop mattering (no active rollout of that extension needs them).
--
-- No existing table changes: every statement of the runbook keeps working.

CREATE TABLE extension_rollouts (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    extension_id       text NOT NULL REFERENCES extensions (id) ON DELETE CASCADE,
    candidate_version  text NOT NULL CHECK (length(candidate_version) BETWEEN 1 AND 32),
    baseline_version   text NOT NULL CHECK (length(baseline_version) BETWEEN 1 AND 32),
    -- [5, 25, 100] or [{"tenants": ["a", "b"]}, 25, 100]; the last step is 100.
    steps              jsonb NOT NULL
                       CHECK (jsonb_typeof(steps) = 'array'
                              AND jsonb_array_length(steps) BETWEEN 1 AND 20),
    min_calls_per_step bigint NOT NULL DEFAULT 100 CHECK (min_calls_per_step BETWEEN 1 AND 1000000000),
    step_duration      interval NOT NULL DEFAULT interval '60 seconds'
                       CHECK (step_duration >= interval '0' AND step_duration <= interval '7 days'),
    -- {"max_error_rate_delta": 0.05, "max_p95_ratio": 1.5, "breaker_never_opened": true}
    criteria           jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(criteria) = 'object'),
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'running', 'paused', 'promoted', 'rolled_back', 'aborted')),
    current_step       integer NOT NULL DEFAULT 0 CHECK (current_step >= 0),
    step_started_at    timestamptz,
    -- The candidate's routing_rules as the judge last wrote them: anything else found
    -- there is a manual change (the runbook's SQL, `ext rollout`), which pauses the
    -- rollout.
    written_rules      jsonb CHECK (written_rules IS NULL OR jsonb_typeof(written_rules) = 'object'),
    -- The baseline's figures at the end of the last step where it had enough calls
    -- (a 100 % step leaves the baseline none to compare with).
    baseline_reference jsonb CHECK (baseline_reference IS NULL OR jsonb_typeof(baseline_reference) = 'object'),
    reason             text,
    judged_by          text,
    judged_at          timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    created_by         text,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    updated_by         text,
    ended_at           timestamptz,
    CHECK (candidate_version <> baseline_version),
    CHECK (current_step < jsonb_array_length(steps)),
    CHECK ((state IN ('promoted', 'rolled_back', 'aborted')) = (ended_at IS NOT NULL)),
    CHECK (state <> 'running' OR step_started_at IS NOT NULL)
);
CREATE UNIQUE INDEX extension_rollouts_one_active ON extension_rollouts (extension_id)
    WHERE state IN ('pending', 'running', 'paused');
CREATE INDEX extension_rollouts_extension_idx ON extension_rollouts (extension_id, id);

CREATE TRIGGER extension_rollouts_touch BEFORE UPDATE ON extension_rollouts
    FOR EACH ROW EXECUTE FUNCTION beamline_touch_updated_at();

CREATE TABLE extension_rollout_history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id   bigint NOT NULL REFERENCES extension_rollouts (id) ON DELETE CASCADE,
    extension_id text NOT NULL,
    action       text NOT NULL
                 CHECK (action IN ('created', 'started', 'advanced', 'paused', 'resumed',
                                   'promoted', 'rolled_back', 'aborted')),
    from_state   text CHECK (from_state IN ('pending', 'running', 'paused', 'promoted', 'rolled_back', 'aborted')),
    to_state     text NOT NULL
                 CHECK (to_state IN ('pending', 'running', 'paused', 'promoted', 'rolled_back', 'aborted')),
    step         integer NOT NULL CHECK (step >= 0),
    routing_rules jsonb,
    measurements jsonb,
    reason       text,
    actor        text NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX extension_rollout_history_rollout_idx ON extension_rollout_history (rollout_id, id);

CREATE TABLE extension_version_health (
    extension_id    text NOT NULL CHECK (length(extension_id) BETWEEN 1 AND 255),
    version         text NOT NULL CHECK (length(version) BETWEEN 1 AND 32),
    router_id       text NOT NULL CHECK (length(router_id) BETWEEN 1 AND 255),
    reported_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    calls           bigint NOT NULL CHECK (calls >= 0),
    errors          bigint NOT NULL CHECK (errors >= 0 AND errors <= calls),
    -- Upper bound of a latency bucket in microseconds → calls: {"1250": 17, …}.
    latency_buckets jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(latency_buckets) = 'object'),
    breaker_opened  integer NOT NULL DEFAULT 0 CHECK (breaker_opened >= 0)
);
CREATE INDEX extension_version_health_idx
    ON extension_version_health (extension_id, version, reported_at);
