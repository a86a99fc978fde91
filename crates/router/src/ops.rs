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
    BreakerCmd, Command, ExtCmd, GlobalArgs, HealthCmd, Output, PolicyCmd, RegistryCmd,
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

struct Admin {
    client: RouterAdminClient<Channel>,
    key: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Admin {
    async fn connect(global: &GlobalArgs) -> anyhow::Result<Admin> {
        let unreachable = |reason: String| Unreachable {
            addr: global.addr.clone(),
            reason,
        };
        let mut endpoint = Channel::from_shared(global.addr.clone())
            .map_err(|e| unreachable(format!("invalid address: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60));
        if global.addr.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &global.tls_ca {
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
        let key = match &global.api_key {
            None => None,
            Some(k) => Some(k.parse().map_err(|_| {
                anyhow::anyhow!("the API key contains characters a header cannot carry")
            })?),
        };
        Ok(Admin {
            client: RouterAdminClient::new(channel),
            key,
        })
    }

    fn req<T>(&self, body: T) -> Request<T> {
        let mut r = Request::new(body);
        if let Some(k) = &self.key {
            r.metadata_mut().insert("x-api-key", k.clone());
        }
        r
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

/// Runs one operator command.
pub async fn run(global: &GlobalArgs, command: Command) -> anyhow::Result<()> {
    let mut admin = Admin::connect(global).await?;
    let (value, view) = match command {
        Command::Registry(c) => match c {
            RegistryCmd::Status => (
                json_of(
                    admin
                        .client
                        .get_registry_status(admin.req(proto::Empty {}))
                        .await?,
                ),
                View::Fields,
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
                View::Fields,
            ),
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
        Command::Ext(c) => match c {
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
        },
        Command::Health(c) => match c {
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
        Command::Breaker(BreakerCmd::Reset { id }) => (
            json_of(
                admin
                    .client
                    .reset_breaker(admin.req(proto::ExtensionIdRequest { id }))
                    .await?,
            ),
            View::Fields,
        ),
        Command::Policy(c) => match c {
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
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&file)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
                };
                serde_json::from_str::<Value>(&text).map_err(|e| {
                    anyhow::Error::new(tonic::Status::invalid_argument(format!(
                        "{} is not JSON: {e}",
                        file.display()
                    )))
                })?;
                let body = proto::UpsertPolicyRequest {
                    tenant_id: tenant.clone(),
                    policy: Some(proto::AdminPolicy {
                        policy_id: policy.clone(),
                        policy_json: text,
                        tenant_id: tenant.clone(),
                        ..Default::default()
                    }),
                };
                let ok = admin
                    .client
                    .upsert_policy(admin.req(body))
                    .await?
                    .into_inner()
                    .ok;
                (
                    json!({"ok": ok, "tenant_id": tenant, "policy_id": policy}),
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
        Command::Serve(_) | Command::Migrate(_) => unreachable!("handled by main"),
    };
    match global.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => print!("{}", render(&value, view)),
    }
    Ok(())
}

/// How to show a result to a person.
#[derive(Clone, Copy)]
enum View {
    /// `key  value` lines.
    Fields,
    /// A table with these columns.
    Table(&'static [&'static str]),
    /// A write: the new record, then what changed.
    Write,
}

fn cell(v: &Value) -> String {
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

fn render(v: &Value, view: View) -> String {
    match (view, v) {
        (View::Table(cols), Value::Array(rows)) => {
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
