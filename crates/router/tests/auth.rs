//! Auth against the running server: no key, wrong key, x-api-key and Bearer, every
//! role against every RouterAdmin method; health and reflection need no key; a real
//! gRPC health client and a reflection client (as grpc_health_probe and grpcurl use).

mod common;

use beamline_api::proto;
use beamline_api::proto::router_admin_client::RouterAdminClient;
use beamline_test_support::NatsServer;
use common::*;
use tonic::transport::Channel;

use tonic::{Code, Request};

#[derive(Clone, Copy, Debug)]
enum Method {
    UpsertPolicy,
    DeletePolicy,
    GetPolicy,
    ListPolicies,
    GetCheckpointStatus,
    GetValidatorsHealth,
    GetRegistryStatus,
    TestConnection,
    ReloadRegistry,
    SetRegistrySource,
    GetExtension,
    ListExtensions,
    ResolveExtension,
    EnableExtension,
    DisableExtension,
    SetExtension,
    GetHealth,
    GetHealthSummary,
    ListHealth,
    ResetBreaker,
    PolicyUses,
    AddExtension,
    RemoveExtension,
    AddVersion,
    ListVersions,
    RemoveVersion,
    RolloutVersion,
    RollbackVersion,
    AddInstance,
    SetInstance,
    RemoveInstance,
    ValidateRegistry,
    DiffRegistry,
    CanaryStart,
    CanaryStatus,
    CanaryPause,
    CanaryResume,
    CanaryAbort,
}

use Method::*;

/// (method, least role: 0 viewer, 1 operator, 2 admin)
const MATRIX: &[(Method, u8)] = &[
    (GetPolicy, 0),
    (ListPolicies, 0),
    (GetCheckpointStatus, 0),
    (GetValidatorsHealth, 0),
    (GetRegistryStatus, 0),
    (TestConnection, 0),
    (GetExtension, 0),
    (ListExtensions, 0),
    (ResolveExtension, 0),
    (GetHealth, 0),
    (GetHealthSummary, 0),
    (ListHealth, 0),
    (PolicyUses, 0),
    (ListVersions, 0),
    (ValidateRegistry, 0),
    (DiffRegistry, 0),
    (ReloadRegistry, 1),
    (SetRegistrySource, 1),
    (EnableExtension, 1),
    (DisableExtension, 1),
    (ResetBreaker, 1),
    (RolloutVersion, 1),
    (RollbackVersion, 1),
    (SetInstance, 1),
    (CanaryStart, 1),
    // After the start: there is a rollout to show.
    (CanaryStatus, 0),
    (CanaryPause, 1),
    (CanaryResume, 1),
    (CanaryAbort, 1),
    (SetExtension, 2),
    (AddExtension, 2),
    (AddVersion, 2),
    (AddInstance, 2),
    (RemoveVersion, 2),
    (RemoveInstance, 2),
    (RemoveExtension, 2),
    (UpsertPolicy, 2),
    (DeletePolicy, 2),
];

fn req<T>(body: T, header: Option<(&'static str, String)>) -> Request<T> {
    let mut r = Request::new(body);
    if let Some((k, v)) = header {
        r.metadata_mut().insert(k, v.parse().unwrap());
    }
    r
}

async fn call(
    c: &mut RouterAdminClient<Channel>,
    m: Method,
    h: Option<(&'static str, String)>,
) -> Result<(), tonic::Status> {
    let id = || proto::ExtensionIdRequest {
        id: "pii_guard".into(),
    };
    // Canary rollouts need an extension without instances (mask_pii).
    let canary = || proto::ExtensionIdRequest {
        id: "mask_pii".into(),
    };
    match m {
        UpsertPolicy => c
            .upsert_policy(req(
                proto::UpsertPolicyRequest {
                    tenant_id: "acme".into(),
                    policy: Some(proto::AdminPolicy {
                        policy_id: "p".into(),
                        policy_json: "{\"providers\": [{\"name\": \"x\"}]}".into(),
                        ..Default::default()
                    }),
                },
                h,
            ))
            .await
            .map(|_| ()),
        DeletePolicy => c
            .delete_policy(req(
                proto::DeletePolicyRequest {
                    tenant_id: "acme".into(),
                    policy_id: "p".into(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        GetPolicy => c
            .get_policy(req(
                proto::GetPolicyRequest {
                    tenant_id: "default".into(),
                    policy_id: "default".into(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        ListPolicies => c
            .list_policies(req(proto::ListPoliciesRequest::default(), h))
            .await
            .map(|_| ()),
        GetCheckpointStatus => c
            .get_checkpoint_status(req(proto::GetCheckpointStatusRequest {}, h))
            .await
            .map(|_| ()),
        GetValidatorsHealth => c
            .get_validators_health(req(proto::GetValidatorsHealthRequest::default(), h))
            .await
            .map(|_| ()),
        GetRegistryStatus => c
            .get_registry_status(req(proto::Empty {}, h))
            .await
            .map(|_| ()),
        TestConnection => c.test_connection(req(proto::Empty {}, h)).await.map(|_| ()),
        ReloadRegistry => c.reload_registry(req(proto::Empty {}, h)).await.map(|_| ()),
        SetRegistrySource => c
            .set_registry_source(req(
                proto::SetSourceRequest {
                    source: "database".into(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        GetExtension => c.get_extension(req(id(), h)).await.map(|_| ()),
        ListExtensions => c
            .list_extensions(req(proto::ListExtensionsRequest::default(), h))
            .await
            .map(|_| ()),
        ResolveExtension => c
            .resolve_extension(req(
                proto::ResolveExtensionRequest {
                    id: "pii_guard".into(),
                    context: Default::default(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        EnableExtension => c.enable_extension(req(id(), h)).await.map(|_| ()),
        DisableExtension => c.disable_extension(req(id(), h)).await.map(|_| ()),
        SetExtension => c
            .set_extension(req(
                proto::SetExtensionRequest {
                    id: "pii_guard".into(),
                    timeout_ms: Some(250),
                    ..Default::default()
                },
                h,
            ))
            .await
            .map(|_| ()),
        GetHealth => c.get_health(req(id(), h)).await.map(|_| ()),
        GetHealthSummary => c
            .get_health_summary(req(proto::Empty {}, h))
            .await
            .map(|_| ()),
        ListHealth => c.list_health(req(proto::Empty {}, h)).await.map(|_| ()),
        ResetBreaker => c.reset_breaker(req(id(), h)).await.map(|_| ()),
        PolicyUses => c.policy_uses(req(id(), h)).await.map(|_| ()),
        AddExtension => c
            .add_extension(req(
                proto::AddExtensionRequest {
                    records_json: r#"{"id": "added", "type": "pre", "subject": "s.added"}"#.into(),
                    source_name: String::new(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        RemoveExtension => c
            .remove_extension(req(
                proto::RemoveExtensionRequest {
                    id: "added".into(),
                    force: false,
                },
                h,
            ))
            .await
            .map(|_| ()),
        AddVersion => c
            .add_version(req(
                proto::AddVersionRequest {
                    id: "pii_guard".into(),
                    version: "v2".into(),
                    ..Default::default()
                },
                h,
            ))
            .await
            .map(|_| ()),
        ListVersions => c.list_versions(req(id(), h)).await.map(|_| ()),
        RemoveVersion => c
            .remove_version(req(
                proto::VersionRequest {
                    id: "pii_guard".into(),
                    version: "v2".into(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        RolloutVersion => c
            .rollout_version(req(
                proto::RolloutRequest {
                    id: "pii_guard".into(),
                    version: "v3".into(),
                    tenants: vec!["acme".into()],
                    all_tenants: false,
                },
                h,
            ))
            .await
            .map(|_| ()),
        RollbackVersion => c
            .rollback_version(req(
                proto::RollbackRequest {
                    id: "pii_guard".into(),
                    version: "v3".into(),
                },
                h,
            ))
            .await
            .map(|_| ()),
        AddInstance | SetInstance | RemoveInstance => {
            let body = proto::InstanceRequest {
                id: "pii_guard".into(),
                // Set works on the seeded pii-c; add and remove on pii-b.
                instance_id: if matches!(m, SetInstance) {
                    "pii-c"
                } else {
                    "pii-b"
                }
                .into(),
                weight: Some(10),
                ..Default::default()
            };
            match m {
                AddInstance => c.add_instance(req(body, h)).await.map(|_| ()),
                SetInstance => c.set_instance(req(body, h)).await.map(|_| ()),
                _ => c.remove_instance(req(body, h)).await.map(|_| ()),
            }
        }
        ValidateRegistry => c
            .validate_registry(req(proto::Empty {}, h))
            .await
            .map(|_| ()),
        DiffRegistry => c.diff_registry(req(proto::Empty {}, h)).await.map(|_| ()),
        CanaryStart => c
            .canary_start(req(
                proto::CanaryStartRequest {
                    id: "mask_pii".into(),
                    version: "v2".into(),
                    steps: "5,25,100".into(),
                    ..Default::default()
                },
                h,
            ))
            .await
            .map(|_| ()),
        CanaryStatus => c.canary_status(req(canary(), h)).await.map(|_| ()),
        CanaryPause => c.canary_pause(req(canary(), h)).await.map(|_| ()),
        CanaryResume => c.canary_resume(req(canary(), h)).await.map(|_| ()),
        CanaryAbort => c.canary_abort(req(canary(), h)).await.map(|_| ()),
    }
}

#[tokio::test]
async fn every_role_against_every_method() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    // What rollout, rollback and instance set work on (add and remove make their own).
    sqlx::raw_sql(
        "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry) VALUES ('pii_guard', 'v3', 'beamline.ext.validate.pii_guard.v3', 200, 0);
         INSERT INTO extension_instances (extension_id, instance_id, subject, weight) VALUES ('pii_guard', 'pii-c', 'beamline.ext.validate.pii_guard.v1', 10);
         INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules) VALUES ('mask_pii', 'v2', 'beamline.ext.post.mask_pii.v2', 150, 0, '{\"tenant_id\": []}');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let mut c = RouterAdminClient::connect(router.addr.clone())
        .await
        .unwrap();

    for &(m, least) in MATRIX {
        // The first allowed call must succeed; the repeats of a call that creates or
        // removes something answer the one code saying it was already done.
        let repeat = match m {
            AddExtension | AddVersion | AddInstance => Some(Code::AlreadyExists),
            RemoveExtension | RemoveVersion | RemoveInstance | DeletePolicy => Some(Code::NotFound),
            // A second start while one is active; pausing a paused rollout, resuming a
            // running one; aborting when none is active any more.
            CanaryStart => Some(Code::AlreadyExists),
            CanaryPause | CanaryResume => Some(Code::FailedPrecondition),
            CanaryAbort => Some(Code::NotFound),
            _ => None,
        };
        let mut allowed_calls = 0;
        let e = call(&mut c, m, None).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{m:?} without a key");
        let e = call(
            &mut c,
            m,
            Some(("x-api-key", "not-a-real-key-000000".into())),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{m:?} with a wrong key");
        for (role, key) in [(0u8, VIEWER_KEY), (1, OPERATOR_KEY), (2, ADMIN_KEY)] {
            for header in [
                ("x-api-key", key.to_string()),
                ("authorization", format!("Bearer {key}")),
            ] {
                let r = call(&mut c, m, Some(header.clone())).await;
                if role >= least {
                    allowed_calls += 1;
                    match (&r, repeat) {
                        (Ok(()), _) => {}
                        (Err(e), Some(code)) if allowed_calls > 1 && e.code() == code => {}
                        (Err(e), _) => panic!(
                            "{m:?} as role {role} via {} (allowed call {allowed_calls}) failed: {e:?}",
                            header.0
                        ),
                    }
                } else {
                    assert_eq!(
                        r.unwrap_err().code(),
                        Code::PermissionDenied,
                        "{m:?} as role {role}"
                    );
                }
            }
        }
    }
    // The validators are real checks.
    let v = c
        .get_validators_health(req(
            proto::GetValidatorsHealthRequest::default(),
            Some(("x-api-key", VIEWER_KEY.into())),
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(&str, &str)> = v
        .validators
        .iter()
        .map(|v| (v.name.as_str(), v.status.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("grpc_health", "serving"),
            ("registry", "serving"),
            ("database", "serving"),
            ("nats", "serving")
        ]
    );
    let log = router.log.lock().unwrap().clone();
    for key in [ADMIN_KEY, OPERATOR_KEY, VIEWER_KEY] {
        assert!(!log.contains(key), "a key reached the log");
    }
}

#[tokio::test]
async fn health_and_reflection_need_no_key() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let db = migrated_database().await;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let channel = Channel::from_shared(router.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    let mut serving = false;
    for _ in 0..100 {
        let s = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if s == ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(serving, "grpc.health.v1 never SERVING");

    let mut refl = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let stream = tokio_stream::iter(vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "beamline.flow.v1.RouterAdmin".into(),
        )),
    ]);
    let mut answers = refl
        .server_reflection_info(stream)
        .await
        .unwrap()
        .into_inner();
    let first = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("{first:?}")
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "beamline.flow.v1.Router",
        "beamline.flow.v1.RouterAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|x| x == s),
            "{s} not listed: {services:?}"
        );
    }
    let second = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(fd)) = second.message_response else {
        panic!("{second:?}")
    };
    let text = fd
        .file_descriptor_proto
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect::<String>();
    assert!(
        text.contains("GetValidatorsHealth"),
        "descriptor lacks the method"
    );
}

#[tokio::test]
async fn decide_needs_a_key_only_when_configured() {
    use beamline_api::proto::router_client::RouterClient;
    let db = migrated_database().await;
    sqlx::raw_sql(SEED).execute(&db.pool().await).await.unwrap();
    let nats = NatsServer::start();
    let request = || proto::RouteRequest {
        message: Some(proto::Message {
            tenant_id: "acme".into(),
            payload: b"x".to_vec(),
            ..Default::default()
        }),
        policy_id: "missing".into(),
        ..Default::default()
    };
    for (required, dir) in [
        (false, tempfile::tempdir().unwrap()),
        (true, tempfile::tempdir().unwrap()),
    ] {
        let extra = if required {
            "\n[admin]\ndecide_requires_key = true\n"
        } else {
            ""
        };
        // `[admin]` must come before the `[[admin.api_keys]]` tables in TOML.
        let config = write_config(dir.path(), db.url(), &nats.url(), "");
        if required {
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(
                &config,
                text.replacen(
                    "[[admin.api_keys]]",
                    &format!("{extra}\n[[admin.api_keys]]"),
                    1,
                ),
            )
            .unwrap();
        }
        let router = start(&config);
        let mut c = RouterClient::connect(router.addr.clone()).await.unwrap();
        let anonymous = c.decide(request()).await.unwrap_err();
        let with_key = c
            .decide(req(
                request(),
                Some(("authorization", format!("Bearer {VIEWER_KEY}"))),
            ))
            .await
            .unwrap_err();
        // The policy does not exist: a call that passed auth says policy_not_found.
        assert!(
            with_key.message().starts_with("policy_not_found"),
            "{with_key:?}"
        );
        if required {
            assert_eq!(
                anonymous.code(),
                Code::Unauthenticated,
                "{anonymous:?}\n{}",
                std::fs::read_to_string(&config).unwrap()
            );
            // The CLI's decide: no key is an auth failure (exit 5), not a refusal.
            let out = router.cli(None, &["decide", "--tenant", "acme", "--payload", "x"]);
            assert_eq!(out.status.code(), Some(5), "{out:?}");
            let out = router.cli(
                Some(VIEWER_KEY),
                &[
                    "decide",
                    "--tenant",
                    "acme",
                    "--policy",
                    "missing",
                    "--payload",
                    "x",
                ],
            );
            assert_eq!(out.status.code(), Some(4), "policy_not_found: {out:?}");
        } else {
            assert!(
                anonymous.message().starts_with("policy_not_found"),
                "{anonymous:?}"
            );
        }
    }
}

#[tokio::test]
async fn grpc_over_tls_with_the_cli() {
    let db = migrated_database().await;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // A test CA, then a server certificate it signs.
    let test_ca = beamline_test_support::TestCa::new();
    let leaf = test_ca.issue("localhost", true);
    let (cert, key, ca) = (leaf.cert, leaf.key, test_ca.ca_pem());
    let config = write_config(dir.path(), db.url(), &nats.url(), "");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[grpc]\nlisten = \"127.0.0.1:0\"",
        &format!(
            "[grpc]\nlisten = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            cert.display(),
            key.display()
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let router = start(&config);
    let tls_addr = router.addr.replace("http://", "https://");
    let out = bin()
        .args(["--addr", &tls_addr, "--tls-ca"])
        .arg(&ca)
        .args([
            "--api-key",
            VIEWER_KEY,
            "--output",
            "json",
            "registry",
            "status",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plaintext to a TLS listener does not get through.
    let plain = bin()
        .args([
            "--addr",
            &router.addr,
            "--api-key",
            VIEWER_KEY,
            "registry",
            "status",
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success());
}
