//! Operator commands: each calls one RouterAdmin method of a running router and
//! prints the answer — a table for people, or the JSON document (`--output json`,
//! field names as the runbook prints them) for scripts.

use std::time::Duration;

use beamline_api::json::from_proto;
use beamline_api::proto;
use beamline_api::proto::router_admin_client::RouterAdminClient;
use serde_json::{Value, json};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::cli::{
    BreakerCmd, CanaryCmd, Client, ClientArgs, Command, ExtAddArgs, ExtCmd, HealthCmd, InstanceCmd,
    Output, PolicyCmd, RegistryCmd, VersionCmd,
};

/// The router could not be reached at all.
#[derive(Debug, thiserror::Error)]
#[error(
    "router unreachable at {addr}: {reason} (is `beamline-router serve` running there? see --addr)"
)]
pub struct Unreachable {
    addr: String,
    reason: String,
}

/// A connection to a running router: the channel and the key every call carries.
pub struct Connection {
    pub channel: Channel,
    key: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Connection {
    pub async fn open(client: &ClientArgs) -> anyhow::Result<Connection> {
        let unreachable = |reason: String| Unreachable {
            addr: client.addr.clone(),
            reason,
        };
        let mut endpoint = Channel::from_shared(client.addr.clone())
            .map_err(|e| unreachable(format!("invalid address: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60));
        if client.addr.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &client.tls_ca {
                let pem = std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("cannot read --tls-ca {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            // The useful part (refused, TLS name mismatch, unknown CA) is in the sources.
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason.push_str(": ");
                reason.push_str(&s.to_string());
                source = s.source();
            }
            unreachable(reason)
        })?;
        let key = match &client.api_key {
            None => None,
            Some(k) => Some(k.parse().map_err(|_| {
                anyhow::anyhow!("the API key contains characters a header cannot carry")
            })?),
        };
        Ok(Connection { channel, key })
    }

    /// A request with the key.
    pub fn request<T>(&self, body: T) -> Request<T> {
        let mut r = Request::new(body);
        if let Some(k) = &self.key {
            r.metadata_mut().insert("x-api-key", k.clone());
        }
        r
    }
}

struct Admin {
    client: RouterAdminClient<Channel>,
    connection: Connection,
}

impl Admin {
    async fn connect(client: &ClientArgs) -> anyhow::Result<Admin> {
        let connection = Connection::open(client).await?;
        Ok(Admin {
            client: RouterAdminClient::new(connection.channel.clone()),
            connection,
        })
    }

    fn req<T>(&self, body: T) -> Request<T> {
        self.connection.request(body)
    }
}

fn json_of(r: tonic::Response<proto::JsonReply>) -> Value {
    r.into_inner()
        .result
        .as_ref()
        .map(from_proto)
        .unwrap_or(Value::Null)
}

fn policy_json(p: &proto::AdminPolicy) -> Value {
    let document: Value = serde_json::from_str(&p.policy_json).unwrap_or(Value::Null);
    json!({"tenant_id": p.tenant_id, "policy_id": p.policy_id, "enabled": p.enabled, "policy": document})
}

/// Reads a file named on the command line ("-" is standard input).
fn read_input(path: &std::path::Path, flag: &str) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        return Ok(std::io::read_to_string(std::io::stdin())?);
    }
    std::fs::read_to_string(path).map_err(|e| {
        anyhow::Error::new(tonic::Status::invalid_argument(format!(
            "cannot read {flag} {}: {e}",
            path.display()
        )))
    })
}

/// A JSON flag's value, checked here so the error names the flag.
fn json_flag(flag: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        anyhow::Error::new(tonic::Status::invalid_argument(format!(
            "{flag} is not JSON: {e}"
        )))
    })
}

/// `ext add`: the fixture-format text to send, and what to call it in errors.
fn ext_add_records(a: ExtAddArgs) -> anyhow::Result<(String, String)> {
    if let Some(file) = &a.file {
        let name = if file.as_os_str() == "-" {
            "standard input".to_string()
        } else {
            format!("file {}", file.display())
        };
        return Ok((read_input(file, "--file")?, name));
    }
    let mut record = serde_json::Map::new();
    record.insert("id".into(), json!(a.id));
    record.insert("type".into(), json!(a.ext_type));
    record.insert("subject".into(), json!(a.subject));
    if let Some(t) = a.timeout_ms {
        record.insert("timeout_ms".into(), json!(t));
    }
    if let Some(r) = a.retry {
        record.insert("retry".into(), json!(r));
    }
    if let Some(c) = &a.config {
        record.insert("config".into(), json_flag("--config", c)?);
    }
    if let Some(m) = &a.metadata {
        record.insert("metadata".into(), json_flag("--metadata", m)?);
    }
    if let Some(v) = a.ext_version {
        record.insert("version".into(), json!(v));
    }
    if a.disabled {
        record.insert("enabled".into(), json!(false));
    }
    Ok((
        Value::Object(record).to_string(),
        "the command line".to_string(),
    ))
}

/// Runs one operator command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    let client = match &command {
        Command::Registry(g) => g.client.clone(),
        Command::Ext(g) => g.client.clone(),
        Command::Health(g) => g.client.clone(),
        Command::Breaker(g) => g.client.clone(),
        Command::Policy(g) => g.client.clone(),
        Command::Serve(_) | Command::Migrate(_) | Command::Decide(_) => {
            unreachable!("handled by main")
        }
    };
    let mut admin = Admin::connect(&client).await?;
    let mut warnings: Vec<String> = Vec::new();
    let (value, view) = match command {
        Command::Registry(g) => match g.command {
            RegistryCmd::Status => (
                json_of(
                    admin
                        .client
                        .get_registry_status(admin.req(proto::Empty {}))
                        .await?,
                ),
                View::Quarantine,
            ),
            RegistryCmd::TestConnection => (
                json_of(
                    admin
                        .client
                        .test_connection(admin.req(proto::Empty {}))
                        .await?,
                ),
                View::Fields,
            ),
            RegistryCmd::Reload => (
                json_of(
                    admin
                        .client
                        .reload_registry(admin.req(proto::Empty {}))
                        .await?,
                ),
                View::Quarantine,
            ),
            RegistryCmd::Validate => {
                let r = admin
                    .client
                    .validate_registry(admin.req(proto::Empty {}))
                    .await?;
                return crate::registry_check::validate(client.output, &json_of(r));
            }
            RegistryCmd::Diff => {
                let r = admin
                    .client
                    .diff_registry(admin.req(proto::Empty {}))
                    .await?;
                return crate::registry_check::diff(client.output, &json_of(r));
            }
            RegistryCmd::Source { mode } => (
                json_of(
                    admin
                        .client
                        .set_registry_source(admin.req(proto::SetSourceRequest { source: mode }))
                        .await?,
                ),
                View::Fields,
            ),
        },
        Command::Ext(g) => match g.command {
            ExtCmd::Get { id } => (
                json_of(
                    admin
                        .client
                        .get_extension(admin.req(proto::ExtensionIdRequest { id }))
                        .await?,
                ),
                View::Fields,
            ),
            ExtCmd::List { ext_type } => (
                json_of(
                    admin
                        .client
                        .list_extensions(admin.req(proto::ListExtensionsRequest {
                            r#type: ext_type.unwrap_or_default(),
                        }))
                        .await?,
                ),
                View::Table(&[
                    "id",
                    "type",
                    "subject",
                    "timeout_ms",
                    "retry",
                    "enabled",
                    "version",
                ]),
            ),
            ExtCmd::Resolve { id, context } => (
                json_of(
                    admin
                        .client
                        .resolve_extension(admin.req(proto::ResolveExtensionRequest {
                            id,
                            context: context.into_iter().collect(),
                        }))
                        .await?,
                ),
                View::Fields,
            ),
            ExtCmd::Enable { id } => (
                json_of(
                    admin
                        .client
                        .enable_extension(admin.req(proto::ExtensionIdRequest { id }))
                        .await?,
                ),
                View::Write,
            ),
            ExtCmd::Disable { id } => (
                json_of(
                    admin
                        .client
                        .disable_extension(admin.req(proto::ExtensionIdRequest { id }))
                        .await?,
                ),
                View::Write,
            ),
            ExtCmd::Set {
                id,
                timeout_ms,
                retry,
                config,
            } => (
                json_of(
                    admin
                        .client
                        .set_extension(admin.req(proto::SetExtensionRequest {
                            id,
                            timeout_ms,
                            retry,
                            config_json: config,
                        }))
                        .await?,
                ),
                View::Write,
            ),
            ExtCmd::Add(a) => {
                let (records_json, source_name) = ext_add_records(a)?;
                let v = json_of(
                    admin
                        .client
                        .add_extension(admin.req(proto::AddExtensionRequest {
                            records_json,
                            source_name,
                        }))
                        .await?,
                );
                (v, View::Written("extensions"))
            }
            ExtCmd::Remove { id, force } => (
                json_of(
                    admin
                        .client
                        .remove_extension(admin.req(proto::RemoveExtensionRequest { id, force }))
                        .await?,
                ),
                View::Written("removed"),
            ),
            ExtCmd::Version(VersionCmd::Add {
                id,
                version,
                subject,
                timeout_ms,
                retry,
                config,
                metadata,
                routing_rules,
            }) => {
                for (flag, text) in [
                    ("--config", &config),
                    ("--metadata", &metadata),
                    ("--routing-rules", &routing_rules),
                ] {
                    if let Some(t) = text {
                        json_flag(flag, t)?;
                    }
                }
                (
                    json_of(
                        admin
                            .client
                            .add_version(admin.req(proto::AddVersionRequest {
                                id,
                                version,
                                subject,
                                timeout_ms,
                                retry,
                                config_json: config,
                                metadata_json: metadata,
                                routing_rules_json: routing_rules,
                            }))
                            .await?,
                    ),
                    View::Written("version"),
                )
            }
            ExtCmd::Version(VersionCmd::List { id }) => (
                json_of(
                    admin
                        .client
                        .list_versions(admin.req(proto::ExtensionIdRequest { id }))
                        .await?,
                ),
                View::Table(&[
                    "version",
                    "subject",
                    "timeout_ms",
                    "retry",
                    "enabled",
                    "routing_rules",
                    "receives_traffic",
                    "created_at",
                ]),
            ),
            ExtCmd::Version(VersionCmd::Remove { id, version }) => (
                json_of(
                    admin
                        .client
                        .remove_version(admin.req(proto::VersionRequest { id, version }))
                        .await?,
                ),
                View::Written("removed"),
            ),
            ExtCmd::Rollout {
                id,
                version,
                tenant,
                all_tenants,
            } => (
                json_of(
                    admin
                        .client
                        .rollout_version(admin.req(proto::RolloutRequest {
                            id,
                            version,
                            tenants: tenant,
                            all_tenants,
                        }))
                        .await?,
                ),
                View::Fields,
            ),
            ExtCmd::Rollback { id, version } => (
                json_of(
                    admin
                        .client
                        .rollback_version(admin.req(proto::RollbackRequest {
                            id,
                            version: version.unwrap_or_default(),
                        }))
                        .await?,
                ),
                View::Fields,
            ),
            ExtCmd::Canary(c) => {
                let id_req = |id: String| proto::ExtensionIdRequest { id };
                let reply = match c {
                    CanaryCmd::Start {
                        id,
                        version,
                        steps,
                        min_calls,
                        step_duration,
                        max_error_rate_delta,
                        max_p95_ratio,
                        baseline,
                        allow_breaker_open,
                    } => {
                        admin
                            .client
                            .canary_start(admin.req(proto::CanaryStartRequest {
                                id,
                                version,
                                steps,
                                min_calls,
                                step_duration_ms: step_duration.map(|d| d.as_millis() as u64),
                                max_error_rate_delta,
                                max_p95_ratio,
                                baseline: baseline.unwrap_or_default(),
                                breaker_never_opened: allow_breaker_open.then_some(false),
                            }))
                            .await?
                    }
                    CanaryCmd::Status { id } => {
                        let v = json_of(admin.client.canary_status(admin.req(id_req(id))).await?);
                        match client.output {
                            Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                            Output::Table => print!("{}", render_canary_status(&v)),
                        }
                        return Ok(());
                    }
                    CanaryCmd::Pause { id } => {
                        admin.client.canary_pause(admin.req(id_req(id))).await?
                    }
                    CanaryCmd::Resume { id } => {
                        admin.client.canary_resume(admin.req(id_req(id))).await?
                    }
                    CanaryCmd::Abort { id } => {
                        admin.client.canary_abort(admin.req(id_req(id))).await?
                    }
                };
                (json_of(reply), View::Written("rollout"))
            }
            ExtCmd::Instance(c) => {
                let (call, body) = match c {
                    InstanceCmd::Add {
                        id,
                        instance,
                        weight,
                        subject,
                        disabled,
                    } => (
                        InstanceCall::Add,
                        proto::InstanceRequest {
                            id,
                            instance_id: instance,
                            weight,
                            subject,
                            enabled: disabled.then_some(false),
                        },
                    ),
                    InstanceCmd::Set {
                        id,
                        instance,
                        weight,
                        subject,
                        enabled,
                    } => (
                        InstanceCall::Set,
                        proto::InstanceRequest {
                            id,
                            instance_id: instance,
                            weight,
                            subject,
                            enabled,
                        },
                    ),
                    InstanceCmd::Remove { id, instance } => (
                        InstanceCall::Remove,
                        proto::InstanceRequest {
                            id,
                            instance_id: instance,
                            ..Default::default()
                        },
                    ),
                };
                let r = admin.req(body);
                let reply = match call {
                    InstanceCall::Add => admin.client.add_instance(r).await?,
                    InstanceCall::Set => admin.client.set_instance(r).await?,
                    InstanceCall::Remove => admin.client.remove_instance(r).await?,
                };
                let view = match call {
                    InstanceCall::Remove => View::Written("removed"),
                    _ => View::Written("instance"),
                };
                (json_of(reply), view)
            }
        },
        Command::Health(g) => match g.command {
            HealthCmd::Get { id } => (
                json_of(
                    admin
                        .client
                        .get_health(admin.req(proto::ExtensionIdRequest { id }))
                        .await?,
                ),
                View::Fields,
            ),
            HealthCmd::Summary => (
                json_of(
                    admin
                        .client
                        .get_health_summary(admin.req(proto::Empty {}))
                        .await?,
                ),
                View::Fields,
            ),
            HealthCmd::Checks => {
                let r = admin
                    .client
                    .get_validators_health(admin.req(proto::GetValidatorsHealthRequest::default()))
                    .await?
                    .into_inner();
                (
                    Value::Array(
                        r.validators
                            .iter()
                            .map(|v| json!({"name": v.name, "status": v.status, "details": v.details, "timestamp_ms": v.timestamp_ms}))
                            .collect(),
                    ),
                    View::Table(&["name", "status", "details"]),
                )
            }
            HealthCmd::List => (
                json_of(admin.client.list_health(admin.req(proto::Empty {})).await?),
                View::Table(&[
                    "extension_id",
                    "circuit_breaker_state",
                    "success_rate",
                    "p95_latency_ms",
                    "success_count",
                    "failure_count",
                ]),
            ),
        },
        Command::Breaker(Client {
            command: BreakerCmd::Reset { id },
            ..
        }) => (
            json_of(
                admin
                    .client
                    .reset_breaker(admin.req(proto::ExtensionIdRequest { id }))
                    .await?,
            ),
            View::Fields,
        ),
        Command::Policy(g) => match g.command {
            PolicyCmd::Uses { id } => (
                json_of(
                    admin
                        .client
                        .policy_uses(admin.req(proto::ExtensionIdRequest { id }))
                        .await?,
                ),
                View::Table(&["tenant_id", "policy_id", "field", "enabled"]),
            ),
            PolicyCmd::List { tenant } => {
                let r = admin
                    .client
                    .list_policies(admin.req(proto::ListPoliciesRequest {
                        tenant_id: tenant.unwrap_or_default(),
                    }))
                    .await?;
                (
                    Value::Array(r.into_inner().policies.iter().map(policy_json).collect()),
                    View::Table(&["tenant_id", "policy_id", "enabled"]),
                )
            }
            PolicyCmd::Get { tenant, policy } => {
                let r = admin
                    .client
                    .get_policy(admin.req(proto::GetPolicyRequest {
                        tenant_id: tenant,
                        policy_id: policy,
                    }))
                    .await?;
                (
                    r.into_inner()
                        .policy
                        .as_ref()
                        .map(policy_json)
                        .unwrap_or(Value::Null),
                    View::Fields,
                )
            }
            PolicyCmd::Upsert {
                tenant,
                policy,
                file,
            } => {
                let text = read_input(&file, "--file")?;
                json_flag(&file.display().to_string(), &text)?;
                let body = proto::UpsertPolicyRequest {
                    tenant_id: tenant.clone(),
                    policy: Some(proto::AdminPolicy {
                        policy_id: policy.clone(),
                        policy_json: text,
                        tenant_id: tenant.clone(),
                        ..Default::default()
                    }),
                };
                let r = admin
                    .client
                    .upsert_policy(admin.req(body))
                    .await?
                    .into_inner();
                (
                    json!({"ok": r.ok, "tenant_id": tenant, "policy_id": policy, "warnings": r.warnings}),
                    View::Fields,
                )
            }
            PolicyCmd::Delete { tenant, policy } => {
                let ok = admin
                    .client
                    .delete_policy(admin.req(proto::DeletePolicyRequest {
                        tenant_id: tenant.clone(),
                        policy_id: policy.clone(),
                    }))
                    .await?
                    .into_inner()
                    .ok;
                (
                    json!({"ok": ok, "tenant_id": tenant, "policy_id": policy}),
                    View::Fields,
                )
            }
        },
        Command::Serve(_) | Command::Migrate(_) | Command::Decide(_) => {
            unreachable!("handled by main")
        }
    };
    if let Some(Value::Array(list)) = value.get("warnings") {
        warnings.extend(list.iter().filter_map(Value::as_str).map(str::to_string));
    }
    match client.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => print!("{}", render(&value, view)),
    }
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// A number for a table cell: `-` when absent.
fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() => format!("{f:.digits$}"),
        Some(_) => v.to_string(),
        None => "-".into(),
    }
}

/// `ext canary status` for people: the rollout, both versions' calls in the step's
/// window, each gate and criterion against its threshold, then the history.
pub fn render_canary_status(v: &Value) -> String {
    let mut out = String::new();
    let step = &v["step"];
    let mut fields: Vec<(&str, String)> = vec![
        ("extension", cell(&v["extension_id"])),
        (
            "rollout",
            format!(
                "{} ({} → {})",
                cell(&v["rollout_id"]),
                cell(&v["baseline_version"]),
                cell(&v["candidate_version"])
            ),
        ),
        ("state", cell(&v["state"])),
        (
            "step",
            format!(
                "{} of {}: {} (steps {}, since {})",
                cell(&step["number"]),
                cell(&step["of"]),
                cell(&step["description"]),
                cell(&v["steps"]),
                cell(&step["started_at"])
            ),
        ),
        (
            "next",
            format!(
                "{}{}",
                cell(&v["next"]["action"]),
                v["next"]["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        ),
    ];
    if let Some(r) = v["reason"].as_str() {
        fields.push(("reason", r.to_string()));
    }
    fields.push((
        "judge",
        format!(
            "{} at {}{}",
            cell(&v["judged_by"]),
            cell(&v["judged_at"]),
            if v["this_router_judges"] == true {
                " (this router)"
            } else {
                ""
            }
        ),
    ));
    if let Some(m) = v["measured"].as_str() {
        fields.push(("measured", m.to_string()));
    }
    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, val) in &fields {
        out.push_str(&format!("{k:<w$}  {val}\n"));
    }
    out.push('\n');
    let versions: Vec<Value> = ["candidate", "baseline"]
        .iter()
        .map(|k| {
            let s = &v[*k];
            json!({
                "role": k,
                "version": s["version"],
                "calls": s["calls"],
                "errors": s["errors"],
                "error_rate": num(&s["error_rate"], 4),
                "p95_ms": num(&s["p95_latency_ms"], 3),
                "breaker_opened": s["breaker_opened"],
                "routers": s["routers"],
            })
        })
        .collect();
    out.push_str(&render_columns(
        &Value::Array(versions),
        &[
            "role",
            "version",
            "calls",
            "errors",
            "error_rate",
            "p95_ms",
            "breaker_opened",
            "routers",
        ],
    ));
    out.push('\n');
    let criteria: Vec<Value> = v["criteria"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let ok = match c["ok"].as_bool() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            let digits = if c["name"] == "error_rate" { 4 } else { 3 };
            json!({
                "criterion": c["name"],
                "measured": num(&c["measured"], digits),
                "threshold": num(&c["threshold"], digits),
                "ok": ok,
                "detail": c["detail"],
            })
        })
        .collect();
    out.push_str(&render_columns(
        &Value::Array(criteria),
        &["criterion", "measured", "threshold", "ok", "detail"],
    ));
    out.push('\n');
    let history: Vec<Value> = v["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|h| {
            json!({
                "at": h["at"],
                "action": h["action"],
                "step": h["step"].as_u64().map(|s| s + 1),
                "to": h["to_state"],
                "by": h["actor"],
                "reason": h["reason"],
            })
        })
        .collect();
    out.push_str(&render_columns(
        &Value::Array(history),
        &["at", "action", "step", "to", "by", "reason"],
    ));
    out
}

enum InstanceCall {
    Add,
    Set,
    Remove,
}

/// `key  value` lines, as every single-record answer prints.
pub(crate) fn render_fields(v: &Value) -> String {
    render(v, View::Fields)
}

/// How to show a result to a person.
#[derive(Clone, Copy)]
pub enum View {
    /// `key  value` lines, then the quarantined records as a table (`registry
    /// status`, `registry reload`).
    Quarantine,
    /// `key  value` lines.
    Fields,
    /// A table with these columns.
    Table(&'static [&'static str]),
    /// A write: the new record, then what changed.
    Write,
    /// A registry write: the record(s) under this key, then who and the reload.
    Written(&'static str),
}

pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A table of `rows` (a JSON array of objects) with these columns.
pub fn render_columns(rows: &Value, cols: &[&str]) -> String {
    let Value::Array(rows) = rows else {
        return render(rows, View::Fields);
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |items: Vec<String>| {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        out.push_str(&line(r));
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

pub fn render(v: &Value, view: View) -> String {
    match (view, v) {
        (View::Quarantine, _) => crate::registry_check::status_table(v),
        (View::Table(cols), rows @ Value::Array(_)) => render_columns(rows, cols),
        (View::Written(key), Value::Object(m)) => {
            let mut out = String::new();
            match m.get(key) {
                Some(Value::Array(items)) => {
                    for item in items {
                        out.push_str(&render(item, View::Fields));
                        out.push('\n');
                    }
                }
                Some(item) => out.push_str(&render(item, View::Fields)),
                None => {}
            }
            for k in ["previous", "changed_by", "reload"] {
                if let Some(v) = m.get(k) {
                    out.push_str(&format!("{k:<10}  {}\n", cell(v)));
                }
            }
            out
        }
        (View::Write, Value::Object(m)) => {
            let mut out = render(m.get("extension").unwrap_or(&Value::Null), View::Fields);
            if let (Some(Value::Object(new)), Some(Value::Object(old))) =
                (m.get("extension"), m.get("previous"))
            {
                for (k, nv) in new {
                    if old.get(k) != Some(nv) {
                        out.push_str(&format!(
                            "changed  {k}: {} → {}\n",
                            cell(old.get(k).unwrap_or(&Value::Null)),
                            cell(nv)
                        ));
                    }
                }
            }
            if let Some(r) = m.get("reload") {
                out.push_str(&format!("reload   {}\n", r));
            }
            out
        }
        (_, Value::Object(m)) => {
            let w = m.keys().map(|k| k.len()).max().unwrap_or(0);
            m.iter()
                .map(|(k, v)| format!("{k:<w$}  {}\n", cell(v)))
                .collect()
        }
        (_, Value::Array(rows)) => rows.iter().map(|r| format!("{}\n", cell(r))).collect(),
        (_, other) => format!("{}\n", cell(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_fields_list() {
        let v = json!([{"id": "a", "type": "pre"}, {"id": "longer", "type": "post"}]);
        let t = render(&v, View::Table(&["id", "type"]));
        assert_eq!(t, "ID      TYPE\na       pre\nlonger  post\n");
        let f = render(&json!({"size": 4, "running": true}), View::Fields);
        assert!(
            f.contains("size     4") && f.contains("running  true"),
            "{f}"
        );
    }
}
