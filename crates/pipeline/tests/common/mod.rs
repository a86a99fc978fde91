//! A pipeline wired to real NATS and a fixtures registry in a temp dir, plus test
//! extensions built on the SDK. Every harness uses its own subject prefix, so tests
//! sharing one NATS server never hear each other.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use beamline_model::Limits;
use beamline_model::wire::Message;
use beamline_pipeline::{BreakerConfig, DecideRequest, InvokerConfig, Pipeline, PipelineConfig};
use beamline_registry::{Registry, RegistryConfig, SourceMode};
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use serde_json::{Map, Value, json};

pub struct Harness {
    pub pipeline: Pipeline,
    pub client: async_nats::Client,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn fast_invoker() -> InvokerConfig {
    InvokerConfig {
        retry_backoff_base_ms: 5,
        retry_backoff_max_ms: 20,
        ..InvokerConfig::default()
    }
}

impl Harness {
    /// `extensions` and `policy` may use `{p}` for the subject prefix.
    pub async fn new(extensions: Value, policy: Value) -> Harness {
        Self::with(
            extensions,
            policy,
            BreakerConfig::default(),
            Limits::default(),
        )
        .await
    }

    pub async fn with(
        extensions: Value,
        policy: Value,
        breaker: BreakerConfig,
        limits: Limits,
    ) -> Harness {
        let config = PipelineConfig {
            invoker: fast_invoker(),
            ..PipelineConfig::default()
        };
        Self::custom(
            extensions,
            policy,
            breaker,
            limits,
            config,
            &beamline_test_support::nats_url(),
        )
        .await
    }

    /// Full control: pipeline settings and the NATS server to use.
    pub async fn custom(
        extensions: Value,
        policy: Value,
        breaker: BreakerConfig,
        limits: Limits,
        config: PipelineConfig,
        nats_url: &str,
    ) -> Harness {
        let prefix = format!(
            "t{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().unwrap();
        let ext_dir = dir.path().join("extensions");
        let pol_dir = dir.path().join("policies/acme");
        std::fs::create_dir_all(&ext_dir).unwrap();
        std::fs::create_dir_all(&pol_dir).unwrap();
        let fill = |v: &Value| v.to_string().replace("{p}", &prefix);
        std::fs::write(ext_dir.join("all.json"), fill(&extensions)).unwrap();
        std::fs::write(pol_dir.join("default.json"), fill(&policy)).unwrap();
        let registry = Registry::start(
            RegistryConfig {
                source: SourceMode::Fixtures,
                fixtures_dir: Some(ext_dir),
                policies_dir: Some(dir.path().join("policies")),
                ..RegistryConfig::default()
            },
            limits.clone(),
        )
        .await
        .unwrap();
        assert!(registry.is_loaded(), "{:?}", registry.status().last_error);
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats_url)
            .await
            .expect("NATS");
        // The invoker refuses calls while the connection is not up (NatsDown), so a
        // test's first Decide must wait for it, as `serve` does at start.
        wait_connected(&client).await;
        let pipeline = Pipeline::new(registry, client.clone(), config, breaker, limits);
        Harness {
            pipeline,
            client,
            prefix,
            dir,
            tasks: Vec::new(),
        }
    }

    pub fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    pub async fn serve<H: Handler>(&mut self, name: &str, handler: H) {
        let t = beamline_sdk::spawn(
            self.client.clone(),
            &self.subject(name),
            handler,
            ServeOptions::default(),
        )
        .await
        .unwrap();
        self.tasks.push(t);
    }

    /// Stops every served extension (they vanish from NATS).
    pub async fn stop_extensions(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        self.client.flush().await.unwrap();
    }

    pub fn request(&self, text: &str) -> DecideRequest {
        self.request_for("acme", text)
    }

    pub fn request_for(&self, tenant: &str, text: &str) -> DecideRequest {
        DecideRequest {
            request_id: "r1".into(),
            message: Message {
                message_id: "m1".into(),
                tenant_id: tenant.into(),
                trace_id: "trace-1".into(),
                message_type: "chat".into(),
                payload: text.into(),
                payload_ref: None,
                metadata: Map::new(),
            },
            policy_id: String::new(),
            context: Map::new(),
        }
    }
}

/// Counts requests and delegates.
pub struct Counted<H> {
    pub hits: Arc<AtomicU64>,
    pub inner: H,
}

pub fn counted<H>(inner: H) -> (Counted<H>, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    (
        Counted {
            hits: hits.clone(),
            inner,
        },
        hits,
    )
}

impl<H: Handler> Handler for Counted<H> {
    async fn handle(&self, r: ExtensionRequest) -> Result<Response, ExtensionError> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.inner.handle(r).await
    }
}

/// Appends a tag to the text, so the test sees which extension ran, in what order.
pub struct Tag(pub &'static str);

impl Handler for Tag {
    async fn handle(&self, r: ExtensionRequest) -> Result<Response, ExtensionError> {
        let mut m = r.payload;
        m.payload = format!("{}+{}", m.payload, self.0).into();
        let mut out = Response::transform(m);
        if let Response::Transform { metadata, .. } = &mut out {
            metadata.insert(format!("seen_{}", self.0), json!(true));
        }
        Ok(out)
    }
}

/// Sleeps, then answers unchanged.
pub struct Slow(pub Duration);

impl Handler for Slow {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        tokio::time::sleep(self.0).await;
        Ok(Response::unchanged())
    }
}

/// Always fails with an error reply.
pub struct Fail;

impl Handler for Fail {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Err(ExtensionError::new("boom", "deliberate failure"))
    }
}

/// Times out (sleeps past any timeout) the first `n` times, then answers.
pub struct SlowFirst {
    pub n: u64,
    pub seen: AtomicU64,
}

impl Handler for SlowFirst {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        if self.seen.fetch_add(1, Ordering::Relaxed) < self.n {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(Response::unchanged())
    }
}

/// Validator with a fixed verdict.
pub struct Verdict(pub bool);

impl Handler for Verdict {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(if self.0 {
            Response::Ok
        } else {
            Response::reject("nope", json!({"why": "test"}))
        })
    }
}

/// Provider answering with its own name.
pub struct Provider(pub &'static str);

impl Handler for Provider {
    async fn handle(&self, r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(Response::Provider {
            provider_id: self.0.into(),
            output: Value::String(format!("{} says {}", self.0, r.payload.payload)),
            usage: Default::default(),
            metadata: Map::new(),
        })
    }
}

/// Answers raw bytes (garbage, oversized) by talking NATS directly.
pub async fn serve_raw(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    let mut sub = client.subscribe(subject.to_string()).await.unwrap();
    client.flush().await.unwrap();
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                // A reply the client refuses to send (over the server's max_payload)
                // must fail the test, not leave the router waiting for a timeout.
                client
                    .publish(reply, body.clone().into())
                    .await
                    .expect("serve_raw: the reply could not be published");
                client.flush().await.expect("serve_raw: flush");
            }
        }
    })
}

/// One request an extension received: its headers and its JSON body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: std::collections::HashMap<String, String>,
    pub body: Value,
}

/// Serves `subject` straight on NATS, as an extension in another language would:
/// records every request and answers what `reply` makes of its body.
pub async fn serve_recording(
    client: &async_nats::Client,
    subject: &str,
    reply: impl Fn(&Value) -> Value + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::Mutex<Vec<Seen>>>,
) {
    use futures::StreamExt;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut sub = client.subscribe(subject.to_string()).await.unwrap();
    client.flush().await.unwrap();
    let client = client.clone();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let body: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
            let headers = msg
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_string())))
                .collect();
            let answer = reply(&body);
            log.lock().unwrap().push(Seen { headers, body });
            if let Some(to) = msg.reply {
                let _ = client.publish(to, answer.to_string().into()).await;
            }
        }
    });
    (task, seen)
}

pub fn ext(id: &str, t: &str, timeout_ms: u64, retry: u64) -> Value {
    json!({"id": id, "type": t, "subject": format!("{{p}}.{id}"), "timeout_ms": timeout_ms, "retry": retry})
}

/// Waits (up to 10 s) until `client` is connected: with `retry_on_initial_connect`,
/// `connect` returns before the connection is up.
pub async fn wait_connected(client: &async_nats::Client) {
    let up = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !matches!(
        client.connection_state(),
        async_nats::connection::State::Connected
    ) {
        assert!(
            tokio::time::Instant::now() < up,
            "NATS did not connect within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Waits until nobody answers on `subject` any more ("no responders"), so a test
/// that stopped an extension knows NATS has dropped its subscription.
pub async fn wait_no_responders(client: &async_nats::Client, subject: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let request = async_nats::Request::new()
            .payload(bytes::Bytes::from_static(b"{}"))
            .timeout(Some(std::time::Duration::from_secs(1)));
        match client.send_request(subject.to_string(), request).await {
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => return,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{subject} still has a responder after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Records what the pipeline reports through its observer hooks.
#[derive(Default)]
pub struct Recorder {
    pub payload_too_large: std::sync::Mutex<Vec<String>>,
    pub retry_limit_exceeded: std::sync::Mutex<Vec<String>>,
    pub instance_selected: std::sync::Mutex<Vec<(String, String)>>,
}

impl beamline_pipeline::Observer for Recorder {
    fn payload_too_large(&self, extension_id: &str) {
        self.payload_too_large
            .lock()
            .unwrap()
            .push(extension_id.to_string());
    }
    fn retry_limit_exceeded(&self, extension_id: &str) {
        self.retry_limit_exceeded
            .lock()
            .unwrap()
            .push(extension_id.to_string());
    }
    fn instance_selected(&self, extension_id: &str, instance_id: &str) {
        self.instance_selected
            .lock()
            .unwrap()
            .push((extension_id.to_string(), instance_id.to_string()));
    }
}

impl Harness {
    /// Puts `recorder` behind the pipeline's observer hooks (a fresh runtime: call it
    /// before the first Decide).
    pub fn observe(&mut self) -> Arc<Recorder> {
        let recorder = Arc::new(Recorder::default());
        self.pipeline = self.pipeline.clone().with_observer(recorder.clone());
        recorder
    }

    /// Copies the acme policies to `tenant` and reloads, so `tenant` has the same
    /// policy.
    pub async fn policy_for(&self, tenant: &str) {
        let to = self.dir.path().join("policies").join(tenant);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(
            self.dir.path().join("policies/acme/default.json"),
            to.join("default.json"),
        )
        .unwrap();
        self.pipeline.registry().reload().await.unwrap();
    }
}
