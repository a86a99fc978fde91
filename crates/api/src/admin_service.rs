//! gRPC `beamline.flow.v1.RouterAdmin`: the operator API. One method per CLI command
//! plus the original's policy and status methods. Every method checks the caller's
//! key and role first (see [`crate::auth`]); writes go to the database in one
//! audited transaction and are followed by a sync of what changed, and are refused
//! while the registry reads fixtures.

use std::sync::Arc;
use std::time::Duration;

use beamline_model::{ExtensionType, Policy};
use beamline_pipeline::Pipeline;
use beamline_registry::writes::{self, ExtensionChange, InstanceChange, NewVersion, Routing};
use beamline_registry::{ActiveSource, ErrorKind, RegistryError, SourceMode};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Caller, Role};
use crate::json::to_proto;
use crate::proto;
use crate::proto::router_admin_server::RouterAdmin;

/// The runbook version this router implements, reported by `GetCheckpointStatus`.
pub const CHECKPOINT: &str = "CP2-LC";

#[derive(Clone)]
pub struct AdminService {
    pipeline: Pipeline,
    auth: Arc<Authenticator>,
    started_ms: i64,
}

fn reply(v: Value) -> Result<Response<proto::JsonReply>, Status> {
    Ok(Response::new(proto::JsonReply {
        result: Some(to_proto(&v)),
    }))
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The gRPC status for a registry error, with the error's own words.
pub fn status_of_registry(e: &RegistryError) -> Status {
    let m = e.to_string();
    match e.kind() {
        ErrorKind::InvalidData => Status::invalid_argument(m),
        ErrorKind::NotFound => Status::not_found(m),
        ErrorKind::Conflict => Status::already_exists(m),
        ErrorKind::Unreachable => Status::unavailable(m),
        ErrorKind::SchemaMissing | ErrorKind::Unsupported | ErrorKind::Io => {
            Status::failed_precondition(m)
        }
        ErrorKind::Database => Status::internal(m),
    }
}

/// The log line of an operator's canary move (the judge logs its own).
fn log_rollout_move(r: &beamline_registry::canary::Rollout, by: &str) {
    tracing::info!(
        extension_id = %r.extension_id,
        rollout_id = r.id,
        candidate = %r.candidate_version,
        baseline = %r.baseline_version,
        state = r.state.as_str(),
        step = r.current_step + 1,
        steps = r.plan.steps.len(),
        by,
        reason = r.reason.as_deref().unwrap_or(""),
        "canary rollout {} by {by}: {} {} → {}",
        r.state,
        r.extension_id,
        r.baseline_version,
        r.candidate_version
    );
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl AdminService {
    pub fn new(pipeline: Pipeline, auth: Arc<Authenticator>) -> AdminService {
        AdminService {
            pipeline,
            auth,
            started_ms: now_ms(),
        }
    }

    fn check<T>(
        &self,
        req: &Request<T>,
        role: Role,
        resource: &'static str,
    ) -> Result<Caller, Status> {
        self.auth.authorize(req.metadata(), role, resource)
    }

    /// The pool to write to, or why writes are refused.
    fn writable(&self, what: &str) -> Result<(sqlx::PgPool, String), Status> {
        let registry = self.pipeline.registry();
        let config = registry.config();
        let reading_fixtures = config.source == SourceMode::Fixtures
            || registry.snapshot().source == ActiveSource::Fixtures;
        if reading_fixtures {
            let dir = config
                .fixtures_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "the fixtures folder".into());
            return Err(Status::failed_precondition(format!(
                "the registry reads fixtures (source = {}), so {what} cannot be written through the API: edit the files in {dir} and run `beamline-router registry reload`",
                config.source
            )));
        }
        let pool = registry.pool().ok_or_else(|| {
            Status::failed_precondition("the database is disabled (db_enabled = false)")
        })?;
        Ok((pool, config.database_display()))
    }

    /// Makes this router serve the write before the call returns: it reads what
    /// changed since its last read (the write included), not the whole registry;
    /// other routers get it by NOTIFY.
    async fn reload_after_write(&self) -> Value {
        let registry = self.pipeline.registry();
        match registry
            .sync_changes(beamline_registry::Trigger::Manual)
            .await
        {
            Ok(r) => json!({"reloaded": true, "generation": r.generation}),
            Err(e) => json!({"reloaded": false, "reload_error": e.to_string()}),
        }
    }

    fn extension_json(&self, id: &str) -> Result<Value, Status> {
        let snap = self.pipeline.registry().snapshot();
        snap.lookup(id)
            .map(|e| to_json(e.as_ref()))
            .ok_or_else(|| Status::not_found(format!("extension '{id}' not found")))
    }

    async fn change_extension(
        &self,
        req: Request<impl Sized>,
        id: String,
        change: ExtensionChange,
        role: Role,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let caller = self.check(&req, role, "extension")?;
        let (pool, db) = self.writable("extensions")?;
        let limits = self.pipeline.registry().limits();
        let outcome = writes::update_extension(&pool, &db, &id, &change, &caller.name, &limits)
            .await
            .map_err(|e| status_of_registry(&e))?;
        let reload = self.reload_after_write().await;
        reply(
            json!({"extension": outcome.new, "previous": outcome.old, "changed_by": caller.name, "reload": reload}),
        )
    }

    /// A registry write: checks the role, refuses it in fixtures mode, runs `write`
    /// (one audited transaction), then makes this router serve it. The reply is
    /// `write`'s object plus `changed_by` and `reload`.
    async fn write<T>(
        &self,
        req: &Request<T>,
        role: Role,
        what: &'static str,
        write: impl AsyncFnOnce(&sqlx::PgPool, &str, &str) -> Result<Value, RegistryError>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let caller = self.check(req, role, "extension")?;
        let (pool, db) = self.writable(what)?;
        let mut result = write(&pool, &db, &caller.name)
            .await
            .map_err(|e| status_of_registry(&e))?;
        let reload = self.reload_after_write().await;
        if let Value::Object(m) = &mut result {
            m.insert("changed_by".into(), Value::String(caller.name.clone()));
            m.insert("reload".into(), reload);
        }
        reply(result)
    }

    /// `json` as an optional JSON value of field `field`.
    fn parse_json_field(field: &str, text: Option<&String>) -> Result<Option<Value>, Status> {
        text.map(|t| {
            serde_json::from_str::<Value>(t)
                .map_err(|e| Status::invalid_argument(format!("{field} is not JSON: {e}")))
        })
        .transpose()
    }

    fn instance_change(r: &proto::InstanceRequest) -> InstanceChange {
        InstanceChange {
            id: r.id.clone(),
            instance_id: r.instance_id.clone(),
            weight: r.weight.map(i64::from),
            subject: r.subject.clone(),
            enabled: r.enabled,
        }
    }

    /// `ext rollout` / `ext rollback` (role operator): writes the version's
    /// routing_rules, then answers what the version now serves.
    async fn route<T>(
        &self,
        req: &Request<T>,
        id: String,
        version: Option<String>,
        routing: Routing,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let limits = self.pipeline.registry().limits();
        self.write(req, Role::Operator, "versions", async |pool, db, by| {
            let o = writes::route_version(pool, db, &id, version.as_deref(), &routing, by, &limits)
                .await?;
            if let Some(rollout) = o.paused_rollout {
                tracing::warn!(extension_id = %id, rollout_id = rollout, version = %o.version, by, "canary rollout paused: {id}'s routing changed by hand");
            }
            Ok(json!({
                "extension_id": id,
                "version": o.version,
                "routing_rules": o.new,
                "previous_routing_rules": o.old,
                "changed": o.changed,
                "paused_rollout": o.paused_rollout,
            }))
        })
        .await
    }

    fn admin_policy(p: &Policy) -> proto::AdminPolicy {
        proto::AdminPolicy {
            policy_id: p.policy_id.clone(),
            providers: p
                .document
                .providers
                .iter()
                .map(|pr| proto::AdminProvider {
                    id: pr.name.clone(),
                    weight: f64::from(pr.weight),
                })
                .collect(),
            sticky: p.document.sticky,
            rules: Vec::new(),
            policy_json: serde_json::to_string(&p.document).unwrap_or_default(),
            tenant_id: p.tenant_id.clone(),
            enabled: p.enabled,
        }
    }

    /// The pool to read rollouts from, or why there are none.
    fn rollout_store(&self) -> Result<(sqlx::PgPool, String), Status> {
        let registry = self.pipeline.registry();
        let config = registry.config();
        if !config.uses_database() {
            return Err(Status::failed_precondition(format!(
                "canary rollouts live in the database, and the registry reads fixtures (source = {})",
                config.source
            )));
        }
        let pool = registry.pool().ok_or_else(|| {
            Status::failed_precondition("the database is disabled (db_enabled = false)")
        })?;
        Ok((pool, config.database_display()))
    }

    /// `ext canary pause|resume|abort` (role operator).
    async fn canary_move(
        &self,
        req: Request<proto::ExtensionIdRequest>,
        mv: beamline_registry::canary::OperatorMove,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let id = req.get_ref().id.clone();
        self.write(&req, Role::Operator, "rollouts", async |pool, db, by| {
            let r = beamline_registry::canary::operator_move(pool, db, &id, mv, by).await?;
            log_rollout_move(&r, by);
            Ok(json!({"rollout": r.to_json()}))
        })
        .await
    }

    async fn database_check(&self) -> (String, String) {
        let registry = self.pipeline.registry();
        if !registry.config().uses_database() {
            return (
                "disabled".into(),
                format!("source = {}", registry.config().source),
            );
        }
        match tokio::time::timeout(Duration::from_secs(3), registry.test_connection()).await {
            Ok(Ok(())) => (
                "serving".into(),
                format!("connected to {}", registry.config().database_display()),
            ),
            Ok(Err(e)) => ("not_serving".into(), e.to_string()),
            Err(_) => ("not_serving".into(), "no answer within 3 s".into()),
        }
    }
}

#[tonic::async_trait]
impl RouterAdmin for AdminService {
    async fn upsert_policy(
        &self,
        req: Request<proto::UpsertPolicyRequest>,
    ) -> Result<Response<proto::UpsertPolicyResponse>, Status> {
        let caller = self.check(&req, Role::Admin, "policy")?;
        let (pool, db) = self.writable("policies")?;
        let r = req.into_inner();
        let policy = r
            .policy
            .ok_or_else(|| Status::invalid_argument("policy is required"))?;
        let tenant = if r.tenant_id.is_empty() {
            policy.tenant_id.clone()
        } else {
            r.tenant_id.clone()
        };
        if tenant.is_empty() || policy.policy_id.is_empty() {
            return Err(Status::invalid_argument(
                "tenant_id and policy.policy_id are required",
            ));
        }
        if !policy.rules.is_empty() {
            return Err(Status::invalid_argument(
                "policy.rules is not supported; express fallbacks in policy_json (\"fallbacks\": [{\"when\", \"retry\", \"to\"}])",
            ));
        }
        let document: Value = if policy.policy_json.trim().is_empty() {
            json!({
                "providers": policy.providers.iter().map(|p| json!({"name": p.id, "weight": p.weight.round() as u64})).collect::<Vec<_>>(),
                "sticky": policy.sticky,
            })
        } else {
            serde_json::from_str(&policy.policy_json)
                .map_err(|e| Status::invalid_argument(format!("policy_json is not JSON: {e}")))?
        };
        let limits = self.pipeline.registry().limits();
        writes::upsert_policy(
            &pool,
            &db,
            &tenant,
            &policy.policy_id,
            document.clone(),
            true,
            &caller.name,
            &limits,
        )
        .await
        .map_err(|e| status_of_registry(&e))?;
        self.reload_after_write().await;
        // Written, so it parses; warn about what will not work as written.
        let warnings = Policy::parse_document(document)
            .ok()
            .and_then(|d| Policy::from_document(&tenant, &policy.policy_id, true, d, &limits).ok())
            .map(|p| self.pipeline.registry().snapshot().warnings_for(&p))
            .unwrap_or_default();
        Ok(Response::new(proto::UpsertPolicyResponse {
            ok: true,
            warnings,
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<proto::DeletePolicyRequest>,
    ) -> Result<Response<proto::DeletePolicyResponse>, Status> {
        let caller = self.check(&req, Role::Admin, "policy")?;
        let (pool, db) = self.writable("policies")?;
        let r = req.into_inner();
        writes::delete_policy(&pool, &db, &r.tenant_id, &r.policy_id, &caller.name)
            .await
            .map_err(|e| status_of_registry(&e))?;
        self.reload_after_write().await;
        Ok(Response::new(proto::DeletePolicyResponse { ok: true }))
    }

    async fn get_policy(
        &self,
        req: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::GetPolicyResponse>, Status> {
        self.check(&req, Role::Viewer, "policy")?;
        let r = req.into_inner();
        let snap = self.pipeline.registry().snapshot();
        let p = snap
            .policies()
            .into_iter()
            .find(|p| p.tenant_id == r.tenant_id && p.policy_id == r.policy_id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "policy '{}' of tenant '{}' not found",
                    r.policy_id, r.tenant_id
                ))
            })?;
        Ok(Response::new(proto::GetPolicyResponse {
            policy: Some(Self::admin_policy(&p)),
        }))
    }

    async fn list_policies(
        &self,
        req: Request<proto::ListPoliciesRequest>,
    ) -> Result<Response<proto::ListPoliciesResponse>, Status> {
        self.check(&req, Role::Viewer, "policy")?;
        let tenant = req.into_inner().tenant_id;
        let snap = self.pipeline.registry().snapshot();
        let policies = snap
            .policies()
            .iter()
            .filter(|p| tenant.is_empty() || p.tenant_id == tenant)
            .map(|p| Self::admin_policy(p))
            .collect();
        Ok(Response::new(proto::ListPoliciesResponse { policies }))
    }

    async fn get_checkpoint_status(
        &self,
        req: Request<proto::GetCheckpointStatusRequest>,
    ) -> Result<Response<proto::GetCheckpointStatusResponse>, Status> {
        self.check(&req, Role::Viewer, "status")?;
        Ok(Response::new(proto::GetCheckpointStatusResponse {
            status: Some(proto::CheckpointStatus {
                current_cp: CHECKPOINT.into(),
                cp2_plus_allowed: true,
                updated_at_ms: self.started_ms,
            }),
        }))
    }

    async fn get_validators_health(
        &self,
        req: Request<proto::GetValidatorsHealthRequest>,
    ) -> Result<Response<proto::GetValidatorsHealthResponse>, Status> {
        self.check(&req, Role::Viewer, "status")?;
        let ts = now_ms();
        let registry = self.pipeline.registry();
        let status = registry.status();
        let (db_status, db_details) = self.database_check().await;
        let nats_state = self.pipeline.nats().connection_state();
        let nats_ok = matches!(nats_state, async_nats::connection::State::Connected);
        let v = |name: &str, ok: &str, details: String| proto::ValidatorStatus {
            name: name.into(),
            status: ok.into(),
            timestamp_ms: ts,
            details,
        };
        Ok(Response::new(proto::GetValidatorsHealthResponse {
            validators: vec![
                v(
                    "grpc_health",
                    "serving",
                    "answering on the gRPC listener".into(),
                ),
                v(
                    "registry",
                    if status.loaded {
                        "serving"
                    } else {
                        "not_serving"
                    },
                    format!(
                        "{} extensions, {} policies from {} (generation {}){}",
                        status.size,
                        status.counts.policies,
                        status.active_source.as_str(),
                        status.generation,
                        status
                            .last_error
                            .map(|e| format!("; last error: {e}"))
                            .unwrap_or_default()
                    ),
                ),
                v("database", &db_status, db_details),
                v(
                    "nats",
                    if nats_ok { "serving" } else { "not_serving" },
                    format!("connection {nats_state:?}").to_lowercase(),
                ),
            ],
        }))
    }

    async fn get_registry_status(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "registry")?;
        let registry = self.pipeline.registry();
        let mut status = registry.status();
        if registry.is_loaded()
            && let Some(w) = registry.snapshot().fallback_policy_warning()
        {
            status.warnings.push(w);
        }
        reply(to_json(&status))
    }

    async fn test_connection(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "registry")?;
        let registry = self.pipeline.registry();
        registry
            .test_connection()
            .await
            .map_err(|e| status_of_registry(&e))?;
        reply(json!({"status": "connected", "database": registry.config().database_display()}))
    }

    async fn reload_registry(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Operator, "registry")?;
        match self.pipeline.registry().reload().await {
            Ok(r) => reply(to_json(&r)),
            Err(e) => Err(Status::failed_precondition(format!(
                "reload refused, the previous snapshot keeps serving: {e}"
            ))),
        }
    }

    async fn set_registry_source(
        &self,
        req: Request<proto::SetSourceRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Operator, "registry")?;
        let source: SourceMode = req
            .into_inner()
            .source
            .parse()
            .map_err(Status::invalid_argument)?;
        let registry = self.pipeline.registry();
        match registry.set_source(source).await {
            Ok(r) => reply(
                json!({"source": source, "reload": to_json(&r), "status": to_json(&registry.status())}),
            ),
            Err(e) if e.kind() == ErrorKind::Unsupported => Err(status_of_registry(&e)),
            Err(e) => reply(json!({
                "source": source,
                "reload_error": e.to_string(),
                "note": "the switch stands; the previous snapshot keeps serving until a sync from the new source succeeds",
                "status": to_json(&registry.status()),
            })),
        }
    }

    async fn get_extension(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "extension")?;
        reply(self.extension_json(&req.into_inner().id)?)
    }

    async fn list_extensions(
        &self,
        req: Request<proto::ListExtensionsRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "extension")?;
        let t = req.into_inner().r#type;
        let snap = self.pipeline.registry().snapshot();
        let list: Vec<Value> = if t.is_empty() {
            snap.list().iter().map(|e| to_json(e.as_ref())).collect()
        } else {
            let ty: ExtensionType = t.parse().map_err(Status::invalid_argument)?;
            snap.list_by_type(ty)
                .iter()
                .map(|e| to_json(e.as_ref()))
                .collect()
        };
        reply(Value::Array(list))
    }

    async fn resolve_extension(
        &self,
        req: Request<proto::ResolveExtensionRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "extension")?;
        let r = req.into_inner();
        let snap = self.pipeline.registry().snapshot();
        let ctx: std::collections::HashMap<String, String> = r.context;
        let e = snap
            .resolve(&r.id, &ctx)
            .ok_or_else(|| Status::not_found(format!("extension '{}' not found", r.id)))?;
        reply(to_json(e.as_ref()))
    }

    async fn enable_extension(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let id = req.get_ref().id.clone();
        self.change_extension(
            req,
            id,
            ExtensionChange {
                enabled: Some(true),
                ..Default::default()
            },
            Role::Operator,
        )
        .await
    }

    async fn disable_extension(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let id = req.get_ref().id.clone();
        self.change_extension(
            req,
            id,
            ExtensionChange {
                enabled: Some(false),
                ..Default::default()
            },
            Role::Operator,
        )
        .await
    }

    async fn set_extension(
        &self,
        req: Request<proto::SetExtensionRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        let config = match &r.config_json {
            None => None,
            Some(text) => Some(
                serde_json::from_str::<Value>(text)
                    .map_err(|e| Status::invalid_argument(format!("config is not JSON: {e}")))?,
            ),
        };
        if r.timeout_ms.is_none() && r.retry.is_none() && config.is_none() {
            return Err(Status::invalid_argument(
                "nothing to set: give timeout_ms, retry or config",
            ));
        }
        let change = ExtensionChange {
            enabled: None,
            timeout_ms: r.timeout_ms.map(i64::from),
            retry: r.retry.map(i64::from),
            config,
        };
        self.change_extension(req, r.id, change, Role::Admin).await
    }

    async fn get_health(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "health")?;
        let id = req.into_inner().id;
        if self.pipeline.registry().snapshot().lookup(&id).is_none() {
            return Err(Status::not_found(format!("extension '{id}' not found")));
        }
        let rt = self.pipeline.runtime();
        reply(to_json(&rt.health_of(&id, rt.now())))
    }

    async fn get_health_summary(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "health")?;
        let snap = self.pipeline.registry().snapshot();
        let rt = self.pipeline.runtime();
        let ids = snap.list();
        reply(to_json(
            &rt.summary(ids.iter().map(|e| e.id.as_str()), rt.now()),
        ))
    }

    async fn list_health(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "health")?;
        let snap = self.pipeline.registry().snapshot();
        let rt = self.pipeline.runtime();
        let now = rt.now();
        reply(Value::Array(
            snap.list()
                .iter()
                .map(|e| to_json(&rt.health_of(&e.id, now)))
                .collect(),
        ))
    }

    async fn reset_breaker(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let caller = self.check(&req, Role::Operator, "breaker")?;
        let id = req.into_inner().id;
        if self.pipeline.registry().snapshot().lookup(&id).is_none() {
            return Err(Status::not_found(format!("extension '{id}' not found")));
        }
        let changed = self.pipeline.runtime().reset_breakers(&id);
        for t in &changed {
            tracing::warn!(extension_id = %id, from = t.from.as_str(), to = t.to.as_str(), by = %caller.name, "circuit breaker reset by operator");
        }
        // Tell every other router through the table, as the runbook's SQL would.
        let registry = self.pipeline.registry();
        let propagated = match (registry.config().uses_database(), registry.pool()) {
            (true, Some(pool)) => beamline_registry::health_store::request_reset(
                &pool,
                &registry.config().database_display(),
                &id,
                &caller.name,
            )
            .await
            .map_err(|e| e.to_string()),
            _ => Err("no database: only this router was reset".to_string()),
        };
        reply(json!({
            "extension_id": id,
            "circuit_breaker_state": "closed",
            "was": changed.iter().map(|t| t.from.as_str()).collect::<Vec<_>>(),
            "propagated": propagated.is_ok(),
            "propagation_error": propagated.err(),
        }))
    }

    async fn policy_uses(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "policy")?;
        let id = req.into_inner().id;
        let snap = self.pipeline.registry().snapshot();
        let uses: Vec<Value> = snap
            .policies()
            .iter()
            .flat_map(|p| {
                p.extension_refs()
                    .into_iter()
                    .filter(|(_, _, ext)| *ext == id)
                    .map(|(field, _, _)| json!({"tenant_id": p.tenant_id, "policy_id": p.policy_id, "field": field, "enabled": p.enabled}))
                    .collect::<Vec<_>>()
            })
            .collect();
        reply(Value::Array(uses))
    }

    async fn add_extension(
        &self,
        req: Request<proto::AddExtensionRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref();
        let name = if r.source_name.is_empty() {
            "the request".to_string()
        } else {
            r.source_name.clone()
        };
        let data = beamline_registry::fixtures::parse_request(&name, &r.records_json)
            .map_err(|e| status_of_registry(&e))?;
        let limits = self.pipeline.registry().limits();
        self.write(&req, Role::Admin, "extensions", async |pool, db, by| {
            let written = writes::add_extensions(pool, db, data, by, &limits).await?;
            Ok(json!({"extensions": written}))
        })
        .await
    }

    async fn remove_extension(
        &self,
        req: Request<proto::RemoveExtensionRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        // Role and mode first: a viewer learns nothing about policies here.
        self.check(&req, Role::Admin, "extension")?;
        self.writable("extensions")?;
        if !r.force {
            let users: Vec<String> = self
                .pipeline
                .registry()
                .snapshot()
                .policies()
                .iter()
                .flat_map(|p| {
                    p.extension_refs()
                        .into_iter()
                        .filter(|(_, _, ext)| *ext == r.id)
                        .map(|(field, _, _)| format!("{}/{} ({field})", p.tenant_id, p.policy_id))
                        .collect::<Vec<_>>()
                })
                .collect();
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "extension '{}' is used by policies {}: take it out of them first (`policy upsert`), or pass --force (their requests then fail with extension_not_found)",
                    r.id,
                    users.join(", ")
                )));
            }
        }
        self.write(&req, Role::Admin, "extensions", async |pool, db, by| {
            let old = writes::remove_extension(pool, db, &r.id, by).await?;
            Ok(json!({"removed": old}))
        })
        .await
    }

    async fn add_version(
        &self,
        req: Request<proto::AddVersionRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        let new = NewVersion {
            id: r.id,
            version: r.version,
            subject: r.subject,
            timeout_ms: r.timeout_ms.map(i64::from),
            retry: r.retry.map(i64::from),
            config: Self::parse_json_field("config", r.config_json.as_ref())?,
            metadata: Self::parse_json_field("metadata", r.metadata_json.as_ref())?,
            routing_rules: Self::parse_json_field("routing_rules", r.routing_rules_json.as_ref())?,
        };
        let limits = self.pipeline.registry().limits();
        self.write(&req, Role::Admin, "versions", async |pool, db, by| {
            let row = writes::add_version(pool, db, new, by, &limits).await?;
            Ok(json!({"version": row}))
        })
        .await
    }

    async fn list_versions(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "extension")?;
        let id = req.into_inner().id;
        let snap = self.pipeline.registry().snapshot();
        let entry = snap
            .entry(&id)
            .ok_or_else(|| Status::not_found(format!("extension '{id}' not found")))?;
        let mut rows: Vec<Value> = entry
            .versions
            .iter()
            .map(|v| {
                let v = &v.version;
                json!({
                    "version": v.version,
                    "subject": v.subject,
                    "timeout_ms": v.timeout_ms,
                    "retry": v.retry,
                    "enabled": v.enabled,
                    "routing_rules": v.routing_rules.to_json(),
                    "receives_traffic": v.enabled && !v.routing_rules.matches_nothing(),
                    "created_at": v.created_at,
                    "base": false,
                })
            })
            .collect();
        let b = &entry.base;
        rows.push(json!({
            "version": b.version,
            "subject": b.subject,
            "timeout_ms": b.timeout_ms,
            "retry": b.retry,
            "enabled": b.enabled,
            "routing_rules": "base record: when no version matches",
            "receives_traffic": true,
            "created_at": null,
            "base": true,
        }));
        reply(Value::Array(rows))
    }

    async fn remove_version(
        &self,
        req: Request<proto::VersionRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        self.write(&req, Role::Admin, "versions", async |pool, db, by| {
            let old = writes::remove_version(pool, db, &r.id, &r.version, by).await?;
            Ok(json!({"removed": old}))
        })
        .await
    }

    async fn rollout_version(
        &self,
        req: Request<proto::RolloutRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        let routing = match (r.all_tenants, r.tenants.is_empty()) {
            (true, true) => Routing::AllTenants,
            (false, false) => Routing::AddTenants(r.tenants.clone()),
            (true, false) => {
                return Err(Status::invalid_argument(
                    "give tenants or all_tenants, not both",
                ));
            }
            (false, true) => {
                return Err(Status::invalid_argument(
                    "give at least one tenant, or all_tenants",
                ));
            }
        };
        if r.version.is_empty() {
            return Err(Status::invalid_argument("version is required"));
        }
        self.route(&req, r.id, Some(r.version), routing).await
    }

    async fn rollback_version(
        &self,
        req: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        let version = (!r.version.is_empty()).then_some(r.version);
        self.route(&req, r.id, version, Routing::NoTraffic).await
    }

    async fn add_instance(
        &self,
        req: Request<proto::InstanceRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let change = Self::instance_change(req.get_ref());
        self.write(&req, Role::Admin, "instances", async |pool, db, by| {
            let row = writes::add_instance(pool, db, change, by).await?;
            Ok(json!({"instance": row}))
        })
        .await
    }

    async fn set_instance(
        &self,
        req: Request<proto::InstanceRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let change = Self::instance_change(req.get_ref());
        if change.weight.is_none() && change.subject.is_none() && change.enabled.is_none() {
            return Err(Status::invalid_argument(
                "nothing to set: give weight, subject or enabled",
            ));
        }
        self.write(&req, Role::Operator, "instances", async |pool, db, by| {
            let o = writes::set_instance(pool, db, change, by).await?;
            Ok(json!({"instance": o.new, "previous": o.old}))
        })
        .await
    }

    async fn remove_instance(
        &self,
        req: Request<proto::InstanceRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        self.write(&req, Role::Admin, "instances", async |pool, db, by| {
            let old = writes::remove_instance(pool, db, &r.id, &r.instance_id, by).await?;
            Ok(json!({"removed": old}))
        })
        .await
    }

    async fn canary_start(
        &self,
        req: Request<proto::CanaryStartRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        let r = req.get_ref().clone();
        // Role first: a viewer learns nothing about the plan's problems.
        self.check(&req, Role::Operator, "extension")?;
        if r.version.is_empty() {
            return Err(Status::invalid_argument("version is required"));
        }
        let steps = beamline_model::canary::parse_steps_arg(&r.steps)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut plan = beamline_model::canary::RolloutPlan::new(steps);
        if let Some(n) = r.min_calls {
            plan.min_calls_per_step = n;
        }
        if let Some(ms) = r.step_duration_ms {
            plan.step_duration = Duration::from_millis(ms);
        }
        if let Some(d) = r.max_error_rate_delta {
            plan.criteria.max_error_rate_delta = d;
        }
        if let Some(k) = r.max_p95_ratio {
            plan.criteria.max_p95_ratio = k;
        }
        if let Some(b) = r.breaker_never_opened {
            plan.criteria.breaker_never_opened = b;
        }
        plan.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let start = beamline_registry::canary::StartRollout {
            extension_id: r.id,
            candidate_version: r.version,
            baseline_version: (!r.baseline.is_empty()).then_some(r.baseline),
            plan,
        };
        self.write(&req, Role::Operator, "rollouts", async |pool, db, by| {
            let r = beamline_registry::canary::start(pool, db, start, by).await?;
            log_rollout_move(&r, by);
            Ok(json!({"rollout": r.to_json()}))
        })
        .await
    }

    async fn canary_status(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "extension")?;
        let (pool, db) = self.rollout_store()?;
        let id = req.into_inner().id;
        let mut status = beamline_registry::canary::status(&pool, &db, &id)
            .await
            .map_err(|e| status_of_registry(&e))?;
        if let Value::Object(m) = &mut status {
            m.insert(
                "this_router_judges".into(),
                Value::Bool(self.pipeline.canary().is_judge()),
            );
        }
        reply(status)
    }

    async fn canary_pause(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.canary_move(req, beamline_registry::canary::OperatorMove::Pause)
            .await
    }

    async fn canary_resume(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.canary_move(req, beamline_registry::canary::OperatorMove::Resume)
            .await
    }

    async fn canary_abort(
        &self,
        req: Request<proto::ExtensionIdRequest>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.canary_move(req, beamline_registry::canary::OperatorMove::Abort)
            .await
    }

    async fn validate_registry(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "registry")?;
        let report = self
            .pipeline
            .registry()
            .validate()
            .await
            .map_err(|e| status_of_registry(&e))?;
        reply(to_json(&report))
    }

    async fn diff_registry(
        &self,
        req: Request<proto::Empty>,
    ) -> Result<Response<proto::JsonReply>, Status> {
        self.check(&req, Role::Viewer, "registry")?;
        let report = self
            .pipeline
            .registry()
            .diff()
            .await
            .map_err(|e| status_of_registry(&e))?;
        reply(to_json(&report))
    }
}
