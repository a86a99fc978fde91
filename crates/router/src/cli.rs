//! Command-line arguments.
//!
//! `serve` and `migrate` take only their own flags. The client flags (`--addr`,
//! `--api-key`, `--output`, `--tls-ca`) belong to the commands that talk to a running
//! router (`decide`, `registry`, `ext`, `health`, `breaker`, `policy`), after the
//! command's name (`beamline-router ext --output json get ID` or `… ext get ID --output
//! json`). Written before the command's name, as older scripts do (`beamline-router
//! --addr URL ext get ID`), they are moved after it by [`hoist_client_flags`] before
//! parsing, so those scripts keep working and `serve --addr` is still refused.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "beamline-router",
    version,
    about = "Extension registry and pipeline of the Beamline request router",
    after_help = "Client commands (decide, registry, ext, health, breaker, policy) take \
                  --addr, --api-key, --output and --tls-ca; see `beamline-router ext --help`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Flags of every command that talks to a running router.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// gRPC address of the running router (Decide and the admin API).
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        default_value = "http://127.0.0.1:9000",
        env = "BEAMLINE_ADDR",
        value_name = "URL"
    )]
    pub addr: String,
    /// API key for the admin API (and for Decide when the router requires one).
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "BEAMLINE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Output format: a table for people, or JSON (the runbook's field names) for scripts.
    #[arg(long, global = true,
        help_heading = "Client options", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// PEM CA certificate to verify the router's TLS certificate (with an https:// --addr).
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "BEAMLINE_TLS_CA",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
}

/// The client flags, as written on the command line.
const CLIENT_FLAGS: [&str; 4] = ["--addr", "--api-key", "--output", "--tls-ca"];

/// Moves client flags written before the command's name to just after it, where the
/// command declares them (see the module docs). Everything else is left in place.
pub fn hoist_client_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut rest = args.into_iter();
    let mut out: Vec<OsString> = rest.next().into_iter().collect();
    let mut hoisted = Vec::new();
    let mut rest = rest.peekable();
    while let Some(arg) = rest.peek() {
        let text = arg.to_string_lossy();
        let Some(flag) = CLIENT_FLAGS
            .iter()
            .find(|f| text == **f || text.starts_with(&format!("{f}=")))
        else {
            break;
        };
        let with_value = text.len() > flag.len();
        hoisted.extend(rest.next());
        if !with_value {
            hoisted.extend(rest.next());
        }
    }
    match rest.next() {
        Some(command) => {
            out.push(command);
            out.extend(hoisted);
        }
        None => out.extend(hoisted),
    }
    out.extend(rest);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the router until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Apply the PostgreSQL schema (idempotent); --seed-default also writes the
    /// reference extensions and a `default` policy.
    Migrate(MigrateArgs),
    /// Send one request through the pipeline (gRPC Router/Decide) and print the decision.
    #[command(after_help = DECIDE_EXIT_CODES)]
    Decide(DecideArgs),
    /// The registry of the running router.
    Registry(Client<RegistryCmd>),
    /// Extensions: look up, register, version, roll out, roll back, instances.
    Ext(Client<ExtCmd>),
    /// Extension health.
    Health(Client<HealthCmd>),
    /// Circuit breakers.
    Breaker(Client<BreakerCmd>),
    /// Tenant policies.
    Policy(Client<PolicyCmd>),
}

/// A group of client commands with the client flags.
#[derive(Debug, Args)]
pub struct Client<C: Subcommand> {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: C,
}

const DECIDE_EXIT_CODES: &str = "Exit codes: 0 a decision; 2 invalid_request; \
3 the router cannot be reached; 4 policy_not_found or extension_not_found; 5 missing or \
invalid key (when Decide requires one); 7 validator_blocked (a validator refused the \
request); 8 an extension failed (extension_timeout, extension_unavailable, extension_error, \
invalid_response_format, pre_processor_failed, post_processor_failed, deadline_exceeded, \
decision_failed); 1 anything else (internal).";

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("input").args(["payload", "file"]))]
pub struct DecideArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The tenant the request is for (message.tenant_id).
    #[arg(long, value_name = "TENANT")]
    pub tenant: String,
    /// The tenant's policy to run; empty means `default`.
    #[arg(long, value_name = "POLICY_ID", default_value = "")]
    pub policy: String,
    /// The request text. Without --payload or --file, standard input is read.
    #[arg(long, value_name = "TEXT")]
    pub payload: Option<String>,
    /// Read the request text from this file ("-" is standard input).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The message type (message.message_type).
    #[arg(long = "type", value_name = "TYPE", default_value = "chat")]
    pub message_type: String,
    /// A request context entry, key=value, repeatable (`when` conditions and version
    /// routing read them; tenant_id is set from --tenant unless given here).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Skip every extension call (context dry_run=true): shows which steps would run
    /// and which provider would be chosen.
    #[arg(long)]
    pub dry_run: bool,
    /// Also print every executed step: type, id, version, instance, status, latency.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCmd {
    /// Running, size, source, database state, last sync, configuration (redacted),
    /// and warnings (policies naming missing extensions, no `default` policy, …).
    Status,
    /// Check the router's database connection.
    TestConnection,
    /// Reload from the current source (refused reloads keep the previous snapshot).
    Reload,
    /// Switch the source live, without a restart.
    Source {
        /// fixtures, database or auto.
        mode: String,
    },
    /// Read the configured source and list every invalid row or file with its field
    /// path; changes nothing. Exit code 9 when any record is invalid.
    Validate,
    /// What a reload would add, change and remove, per table; changes nothing.
    Diff,
}

#[derive(Debug, Subcommand)]
pub enum ExtCmd {
    /// One extension's base record.
    Get {
        /// Extension id.
        id: String,
    },
    /// Every extension, or those of one type.
    List {
        /// Only this type: pre, validator, provider or post.
        #[arg(long = "type", value_name = "TYPE")]
        ext_type: Option<String>,
    },
    /// The record an extension resolves to for a context (version routing).
    Resolve {
        /// Extension id.
        id: String,
        /// key=value, repeatable: --context tenant_id=premium_tenant
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
        context: Vec<(String, String)>,
    },
    /// Enable (database write, audit-logged, then reload). Role operator.
    Enable {
        /// Extension id.
        id: String,
    },
    /// Disable (database write, audit-logged, then reload). Role operator.
    Disable {
        /// Extension id.
        id: String,
    },
    /// Change timeout, retry and/or config (database write, audit-logged, then
    /// reload). Role admin.
    Set {
        /// Extension id.
        id: String,
        /// Per-attempt timeout in milliseconds ([limits], 10..=5000 by default).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<i32>,
        /// Retries after a failed attempt (0..=3 by default).
        #[arg(long, value_name = "N")]
        retry: Option<i32>,
        /// A JSON object replacing the config.
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
    },
    /// Register extensions: from a file in the fixture format (one record or an array,
    /// with optional versions and instances), or one record from flags. Role admin.
    #[command(group = clap::ArgGroup::new("from").args(["file", "id"]).required(true))]
    Add(ExtAddArgs),
    /// Remove an extension with its versions and instances. Refused while a policy
    /// uses it, unless --force. Role admin.
    Remove {
        /// Extension id.
        id: String,
        /// Remove it even though policies use it (their requests then fail with
        /// extension_not_found).
        #[arg(long)]
        force: bool,
    },
    /// An extension's versions (extension_versions).
    #[command(subcommand)]
    Version(VersionCmd),
    /// Route tenants to a version: adds them to the version's routing_rules.tenant_id
    /// (the runbook's "enable new version gradually"), or --all-tenants (`{}`). Role
    /// operator.
    #[command(group = clap::ArgGroup::new("who").args(["tenant", "all_tenants"]).required(true))]
    Rollout {
        /// Extension id.
        id: String,
        /// The version to route to.
        #[arg(long, value_name = "VERSION")]
        version: String,
        /// A tenant to add, repeatable.
        #[arg(long = "tenant", value_name = "TENANT")]
        tenant: Vec<String>,
        /// Route every request to this version (routing_rules `{}`).
        #[arg(long)]
        all_tenants: bool,
    },
    /// Take a version out of routing (routing_rules `{"tenant_id": []}`, the runbook's
    /// rollback): requests fall back to the base record. Role operator.
    Rollback {
        /// Extension id.
        id: String,
        /// The version to roll back; by default the one version that receives traffic.
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
    },
    /// An extension's instances (extension_instances): weighted load balancing.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Canary rollouts the routers judge on their own: a candidate version serves a
    /// growing share of tenants, is promoted to the base record when every step holds
    /// its criteria, and is rolled back at once when one fails (docs/RUNBOOK.md,
    /// "Progressive delivery").
    #[command(subcommand)]
    Canary(CanaryCmd),
}

#[derive(Debug, Subcommand)]
pub enum CanaryCmd {
    /// Start a rollout of VERSION (an extension_versions row without traffic):
    /// pending until the judge writes its first step. Role operator.
    Start {
        /// Extension id.
        id: String,
        /// The candidate version.
        #[arg(long, value_name = "VERSION")]
        version: String,
        /// Percent of tenants per step, by a stable hash of tenant_id (`5,25,100`),
        /// or a JSON array with tenant lists (`[{"tenants":["a","b"]},25,100]`). The
        /// last step is 100.
        #[arg(long, value_name = "STEPS")]
        steps: String,
        /// Candidate calls a step needs (summed over every router) before it is
        /// judged (default 100).
        #[arg(long, value_name = "N")]
        min_calls: Option<u64>,
        /// How long a step lasts at least once its calls are in: 60s, 5m, 1h, 500ms
        /// (default 60s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
        step_duration: Option<std::time::Duration>,
        /// Roll back when the candidate's error rate exceeds the baseline's by more
        /// than this (default 0.05).
        #[arg(long, value_name = "DELTA")]
        max_error_rate_delta: Option<f64>,
        /// Roll back when the candidate's p95 latency exceeds the baseline's times
        /// this (default 1.5).
        #[arg(long, value_name = "RATIO")]
        max_p95_ratio: Option<f64>,
        /// The version to compare with (default: the base record's).
        #[arg(long, value_name = "VERSION")]
        baseline: Option<String>,
        /// Do not roll back merely because the candidate's breaker opened.
        #[arg(long)]
        allow_breaker_open: bool,
    },
    /// The extension's latest rollout: state, step, the candidate's and baseline's
    /// calls in the step's window, each criterion measured against its threshold,
    /// and the history.
    Status {
        /// Extension id.
        id: String,
    },
    /// Hold the rollout where it is (the judge leaves it alone). Role operator.
    Pause {
        /// Extension id.
        id: String,
    },
    /// Continue a paused rollout: the current step's routing rules are written again
    /// and the step starts over. Role operator.
    Resume {
        /// Extension id.
        id: String,
    },
    /// Stop the rollout and take the candidate out of routing (every tenant back on
    /// the baseline). Role operator.
    Abort {
        /// Extension id.
        id: String,
    },
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    beamline_model::canary::parse_duration(s)
}

#[derive(Debug, Args)]
pub struct ExtAddArgs {
    /// A JSON file in the fixture format (docs/REGISTRY.md); "-" reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["ext_type", "subject", "timeout_ms", "retry", "config", "metadata", "ext_version", "disabled"])]
    pub file: Option<PathBuf>,
    /// Extension id (with --type and --subject).
    #[arg(requires_all = ["ext_type", "subject"])]
    pub id: Option<String>,
    /// pre, validator, provider or post.
    #[arg(long = "type", value_name = "TYPE")]
    pub ext_type: Option<String>,
    /// The NATS subject the extension answers on (no wildcards).
    #[arg(long, value_name = "SUBJECT")]
    pub subject: Option<String>,
    /// Per-attempt timeout in milliseconds (default 5000).
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<i64>,
    /// Retries after a failed attempt (default 0).
    #[arg(long, value_name = "N")]
    pub retry: Option<i64>,
    /// The extension's config, a JSON object.
    #[arg(long, value_name = "JSON")]
    pub config: Option<String>,
    /// The extension's metadata, a JSON object.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// The base record's version name (default v1).
    #[arg(long = "version", value_name = "VERSION")]
    pub ext_version: Option<String>,
    /// Register it disabled.
    #[arg(long)]
    pub disabled: bool,
}

#[derive(Debug, Subcommand)]
pub enum VersionCmd {
    /// Add a version. Omitted fields take the base record's; it receives no traffic
    /// (routing_rules `{"tenant_id": []}`) until `ext rollout`, unless --routing-rules.
    /// Role admin.
    Add {
        /// Extension id.
        id: String,
        /// Version name (1–32 characters: letters, digits, '_', '-', '.').
        version: String,
        /// The NATS subject of this version (default: the base record's).
        #[arg(long, value_name = "SUBJECT")]
        subject: Option<String>,
        /// Per-attempt timeout in milliseconds.
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<i32>,
        /// Retries after a failed attempt.
        #[arg(long, value_name = "N")]
        retry: Option<i32>,
        /// The version's config, a JSON object.
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// The version's metadata, a JSON object.
        #[arg(long, value_name = "JSON")]
        metadata: Option<String>,
        /// routing_rules, a JSON object: `{}` routes everything to it at once,
        /// `{"tenant_id": ["a"]}` tenant a.
        #[arg(long, value_name = "JSON")]
        routing_rules: Option<String>,
    },
    /// Every version of an extension, in resolution order (newest first).
    List {
        /// Extension id.
        id: String,
    },
    /// Remove a version. Role admin.
    Remove {
        /// Extension id.
        id: String,
        /// Version name.
        version: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Add an instance. Role admin.
    Add {
        /// Extension id.
        id: String,
        /// Instance id.
        instance: String,
        /// Share of the calls, 0..=100 (default 100).
        #[arg(long, value_name = "N")]
        weight: Option<i32>,
        /// The instance's NATS subject (default: the extension's).
        #[arg(long, value_name = "SUBJECT")]
        subject: Option<String>,
        /// Register it disabled (no calls).
        #[arg(long)]
        disabled: bool,
    },
    /// Change an instance's weight, subject or enabled flag. Role operator.
    Set {
        /// Extension id.
        id: String,
        /// Instance id.
        instance: String,
        /// Share of the calls, 0..=100.
        #[arg(long, value_name = "N")]
        weight: Option<i32>,
        /// The instance's NATS subject.
        #[arg(long, value_name = "SUBJECT")]
        subject: Option<String>,
        /// true sends it calls, false none.
        #[arg(long, value_name = "BOOL")]
        enabled: Option<bool>,
    },
    /// Remove an instance. Role admin.
    Remove {
        /// Extension id.
        id: String,
        /// Instance id.
        instance: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum HealthCmd {
    /// One extension's health and breaker.
    Get {
        /// Extension id.
        id: String,
    },
    /// Totals over every extension.
    Summary,
    /// Every extension's health.
    List,
    /// The router's own checks (GetValidatorsHealth): gRPC, registry, database, NATS.
    Checks,
}

#[derive(Debug, Subcommand)]
pub enum BreakerCmd {
    /// Close an extension's breakers here and, through the database, on every router.
    /// Role operator.
    Reset {
        /// Extension id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Which policies use an extension.
    Uses {
        /// Extension id.
        id: String,
    },
    /// Every policy (of one tenant).
    List {
        /// Only this tenant's policies.
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
    },
    /// One policy document.
    Get {
        /// Tenant id (`default` holds the policies every tenant without its own uses).
        tenant: String,
        /// Policy id (`default` is the one a request without policy_id uses).
        policy: String,
    },
    /// Create or replace a policy from a JSON file (docs/REGISTRY.md); warns about a
    /// provider that names a provider extension without `extension`. Role admin.
    Upsert {
        /// Tenant id (`default` holds the policies every tenant without its own uses).
        tenant: String,
        /// Policy id (`default` is the one a request without policy_id uses).
        policy: String,
        /// The policy document, a JSON file; "-" reads standard input.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Delete a policy. Role admin.
    Delete {
        /// Tenant id.
        tenant: String,
        /// Policy id.
        policy: String,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("'{s}' is not key=value"))
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the router runs on its built-in fixtures.
    #[arg(long, env = "BEAMLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also run the reference extensions (normalize_text, pii_guard, mask_pii,
    /// test_provider) in-process: a working pipeline in one command. When no NATS
    /// server answers at [nats] url, starts a private nats-server for the router's
    /// lifetime.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database to migrate; defaults to the configuration's database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Configuration file to take the database from when --database-url is not given.
    #[arg(long, env = "BEAMLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also write the reference extensions (normalize_text, pii_guard, mask_pii,
    /// test_provider) and the `default` policy of tenant `default`, where no row of
    /// that key exists yet (never overwrites); audit-logged as `migrate --seed-default`.
    #[arg(long)]
    pub seed_default: bool,
}

/// Exit codes scripts can rely on: 2 bad configuration, usage or input; 3 the router
/// or a dependency cannot be reached; 4 not found; 5 missing/invalid key or role too
/// small; 6 refused in the current state (fixtures mode, reload refused); 7 a
/// validator blocked the request (`decide`); 8 an extension failed (`decide`); 9
/// `registry validate` found invalid records; 1 anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::registry_check::InvalidRecords>()
        .is_some()
    {
        return 9;
    }
    if e.downcast_ref::<crate::config::ConfigError>().is_some() {
        return 2;
    }
    if let Some(refused) = e.downcast_ref::<crate::decide::Refused>() {
        return refused.exit_code();
    }
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return match s.code() {
            tonic::Code::InvalidArgument => 2,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 3,
            tonic::Code::NotFound => 4,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => 5,
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => 6,
            _ => 1,
        };
    }
    if e.downcast_ref::<crate::ops::Unreachable>().is_some()
        || e.downcast_ref::<crate::serve::Unmet>().is_some()
    {
        return 3;
    }
    if let Some(r) = e.downcast_ref::<beamline_registry::RegistryError>() {
        return match r.kind() {
            beamline_registry::ErrorKind::Unreachable => 3,
            beamline_registry::ErrorKind::Unsupported => 2,
            _ => 1,
        };
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn client_flags_before_the_command_move_after_its_name() {
        assert_eq!(
            hoist_client_flags(os(&[
                "b",
                "--addr",
                "http://h:1",
                "--output=json",
                "ext",
                "get",
                "x"
            ])),
            os(&[
                "b",
                "ext",
                "--addr",
                "http://h:1",
                "--output=json",
                "get",
                "x"
            ])
        );
        assert_eq!(
            hoist_client_flags(os(&["b", "serve", "--demo"])),
            os(&["b", "serve", "--demo"])
        );
        // Parsed: the hoisted flags are the group's.
        let cli = Cli::parse_from(hoist_client_flags(os(&[
            "b",
            "--api-key",
            "k",
            "ext",
            "get",
            "x",
        ])));
        let Command::Ext(g) = cli.command else {
            panic!("not ext")
        };
        assert_eq!(g.client.api_key.as_deref(), Some("k"));
        // Still refused where they mean nothing.
        assert!(
            Cli::try_parse_from(hoist_client_flags(os(&["b", "--addr", "x", "serve"]))).is_err()
        );
    }

    #[test]
    fn serve_and_migrate_show_only_their_own_flags_and_every_argument_has_help() {
        let mut root = Cli::command();
        root.build();
        for name in ["serve", "migrate"] {
            let sub = root.find_subcommand(name).unwrap();
            for flag in ["addr", "api_key", "output", "tls_ca"] {
                assert!(
                    sub.get_arguments().all(|a| a.get_id() != flag),
                    "{name} has --{flag}"
                );
            }
        }
        fn walk(cmd: &clap::Command, path: &str) {
            for a in cmd.get_arguments() {
                if a.is_hide_set() || ["help", "version"].contains(&a.get_id().as_str()) {
                    continue;
                }
                assert!(
                    a.get_help().is_some(),
                    "{path}: argument {} has no help",
                    a.get_id()
                );
            }
            for s in cmd.get_subcommands() {
                assert!(
                    s.get_about().is_some(),
                    "{path} {} has no about",
                    s.get_name()
                );
                walk(s, &format!("{path} {}", s.get_name()));
            }
        }
        walk(&root, "beamline-router");
        let ext = root.find_subcommand("ext").unwrap();
        assert!(ext.get_arguments().any(|a| a.get_id() == "addr"));
    }
}
