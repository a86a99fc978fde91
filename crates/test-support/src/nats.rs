//! [`NatsServer`]: a `nats-server` of the test's own — plain with JetStream, or
//! started from a configuration the test writes (accounts, users and permissions,
//! TLS, a cluster block) — and [`NatsCluster`]: several of them routed together.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::free_port;
use crate::process::{self, ExitGuard, log_tail};

/// How long [`NatsServer::start`] and [`NatsServer::restart`] wait for the server.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports [`NatsServer::start`] tries when the chosen one was taken.
const PORT_ATTEMPTS: usize = 5;

/// A `nats-server` with JetStream, started by the test on a free port of 127.0.0.1.
///
/// It runs `nats-server -a 127.0.0.1 -p <port> -js -sd <tempdir>`, logging to
/// `<tempdir>/nats-server.log`. [`stop`](Self::stop) and [`restart`](Self::restart)
/// take the server away and bring it back on the same port with the same JetStream
/// store, for fault tests. Dropping the value kills the server and removes the
/// temporary directory.
///
/// `nats-server` is looked up on `PATH` and in the usual system directories
/// (`/usr/sbin` on Debian).
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    /// The monitoring port (`/connz`, `/routez`), when the server has one.
    monitor_port: Option<u16>,
    /// `-c <dir>/nats.conf` instead of `-js`, for servers started from a
    /// configuration.
    configured: bool,
    dir: TempDir,
    child: Mutex<Option<Child>>,
    exit_guard: ExitGuard,
}

enum Launch {
    Ready(Child),
    Exited(String),
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections and sends
    /// its `INFO` line.
    ///
    /// # Panics
    ///
    /// If `nats-server` is not installed, the temporary directory cannot be created,
    /// or the server does not become ready within 10 seconds.
    pub fn start() -> NatsServer {
        NatsServer::start_inner(None)
    }

    /// Starts a server from a configuration file with `config` as its text (users,
    /// accounts, permissions, `tls { … }`, a `cluster { … }` block — anything
    /// nats-server reads), on a free client port and with a monitoring port (see
    /// [`connection_names`](Self::connection_names)); no JetStream. Paths inside
    /// `config` should be absolute. The listen address and port given on the command
    /// line win over the file's.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start), and when nats-server refuses the configuration (the
    /// panic shows its log).
    pub fn start_with_config(config: &str) -> NatsServer {
        NatsServer::start_inner(Some(config))
    }

    fn start_inner(config: Option<&str>) -> NatsServer {
        let binary = process::find_executable("nats-server").unwrap_or_else(|| {
            panic!(
                "NatsServer::start: nats-server not found on PATH or in /usr/sbin: \
                 install the Debian package nats-server or run scripts/test"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("beamline-nats-")
            .tempdir()
            .unwrap_or_else(|e| {
                panic!("NatsServer::start: cannot create a temporary directory: {e}")
            });
        if let Some(text) = config {
            std::fs::write(dir.path().join("nats.conf"), text).unwrap_or_else(|e| {
                panic!("NatsServer::start: cannot write the configuration file: {e}")
            });
        }
        let exit_guard = ExitGuard::new(dir.path(), libc::SIGKILL);
        let mut server = NatsServer {
            binary,
            port: 0,
            monitor_port: None,
            configured: config.is_some(),
            dir,
            child: Mutex::new(None),
            exit_guard,
        };
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            if server.configured {
                server.monitor_port = Some(free_port());
            }
            // A fresh log per attempt, so that an earlier attempt's error is not
            // mistaken for this one's.
            let _ = std::fs::remove_file(server.log_file());
            match server.launch() {
                Launch::Ready(child) => {
                    server.set_child(child);
                    return server;
                }
                Launch::Exited(log) if log.contains("address already in use") => {
                    failures.push(format!("port {} was taken", server.port));
                }
                Launch::Exited(log) => panic!(
                    "NatsServer::start: nats-server exited during startup on port {}\n{log}",
                    server.port
                ),
            }
        }
        panic!(
            "NatsServer::start: could not start nats-server on a free port after {} attempts: {}",
            PORT_ATTEMPTS,
            failures.join(", ")
        );
    }

    /// The names clients gave their connections (`ConnectOptions::name`) on this
    /// server right now, from its monitoring endpoint `/connz`. Empty for a server
    /// without monitoring (one from [`start`](Self::start)) or that is down.
    pub fn connection_names(&self) -> Vec<String> {
        let Some(body) = self.monitor("/connz") else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            return Vec::new();
        };
        v["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    }

    /// How many routes to other cluster nodes this server has (`/routez`), if it
    /// answers.
    pub fn route_count(&self) -> Option<u64> {
        let body = self.monitor("/routez")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["num_routes"].as_u64()
    }

    /// GET `path` on the monitoring port; the body.
    fn monitor(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let port = self.monitor_port?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).ok()?;
        raw.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port. It stays the same across [`stop`](Self::stop) and
    /// [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary directory, given as its store directory (`-sd`; the
    /// JetStream data is in its `jetstream` subdirectory), kept across restarts and
    /// removed on drop. It also holds the log file.
    pub fn store_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file (stdout and stderr of every run, appended).
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The process id of the running server, if it is running.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let child = guard.as_mut()?;
        process::is_alive(child).then(|| child.id())
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Freezes the server with SIGSTOP, as a hung host or a stalled VM would: its
    /// connections stay open and nothing answers on them. Undone by
    /// [`resume`](Self::resume); [`stop`](Self::stop) and drop work on a paused server.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            process::signal_pids(&[pid], libc::SIGSTOP);
        }
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            process::signal_pids(&[pid], libc::SIGCONT);
        }
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. The port and
    /// the store directory are kept for [`restart`](Self::restart). Does nothing if
    /// the server is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.take_child() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store directory, and
    /// waits until it is ready. Stops it first if it is running.
    ///
    /// # Panics
    ///
    /// If the server does not come back within 10 seconds, e.g. because another
    /// process took the port meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        match self.launch() {
            Launch::Ready(child) => {
                self.set_child(child);
            }
            Launch::Exited(log) => panic!(
                "NatsServer::restart: nats-server exited during startup on port {} \
                 (was the port taken by another process meanwhile?)\n{log}",
                self.port
            ),
        }
    }

    fn set_child(&mut self, child: Child) {
        self.exit_guard.set_pid(Some(child.id()));
        *self.child.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(child);
    }

    fn take_child(&mut self) -> Option<Child> {
        self.exit_guard.set_pid(None);
        self.child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn launch(&self) -> Launch {
        let log_path = self.log_file();
        let (stdout, stderr) = process::log_handles(&log_path).unwrap_or_else(|e| {
            panic!(
                "NatsServer: cannot open log file {}: {e}",
                log_path.display()
            )
        });
        let mut cmd = Command::new(&self.binary);
        if self.configured {
            cmd.arg("-c").arg(self.dir.path().join("nats.conf"));
        } else {
            cmd.arg("-js").arg("-sd").arg(self.store_dir());
        }
        if let Some(m) = self.monitor_port {
            cmd.arg("-m").arg(m.to_string());
        }
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        process::prepare(&mut cmd, None);
        let mut child = process::spawn_server(cmd)
            .unwrap_or_else(|e| panic!("NatsServer: cannot run {}: {e}", self.binary.display()));

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Launch::Exited(format!(
                    "exit status: {status}\n{}",
                    log_tail(&log_path, 30)
                ));
            }
            if info_line(self.port).is_some() {
                // Make sure the INFO came from our process and not from a server that
                // already held the port.
                thread::sleep(Duration::from_millis(20));
                if process::is_alive(&mut child) {
                    return Launch::Ready(child);
                }
                continue;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "NatsServer: nats-server on port {} did not send its INFO line within {:?}\n{}",
                    self.port,
                    READY_TIMEOUT,
                    log_tail(&log_path, 30)
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Connects to 127.0.0.1:`port` and returns the first line if it is a NATS `INFO`.
fn info_line(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field removes the directory after this.
    }
}

/// How long [`NatsCluster::start_with_config`] waits for the nodes to route to each
/// other.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Several [`NatsServer`]s routed into one cluster (each node's configuration gets a
/// `cluster { … }` block naming every other node as a route), so a client connected
/// to any node reaches subscribers on all of them and learns the others' addresses.
/// Nodes can be stopped, paused and restarted one by one; dropping the cluster stops
/// them all and removes their directories.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until each has a route to every other.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start_with_config`], or when the nodes are not routed to each
    /// other within 30 seconds.
    pub fn start(size: usize) -> NatsCluster {
        NatsCluster::start_with_config(size, "")
    }

    /// [`start`](Self::start), with `config` (users, permissions, TLS …) in every
    /// node's configuration.
    pub fn start_with_config(size: usize, config: &str) -> NatsCluster {
        assert!(size >= 2, "NatsCluster: a cluster has at least two nodes");
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes: Vec<NatsServer> = (0..size)
            .map(|i| {
                let routes: Vec<String> = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                    .collect();
                NatsServer::start_with_config(&format!(
                    "{config}\nserver_name: node{i}\ncluster {{\n  name: beamline-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    cluster_ports[i],
                    routes.join(", ")
                ))
            })
            .collect();
        let cluster = NatsCluster { nodes };
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while !cluster.is_routed() {
            assert!(
                Instant::now() < deadline,
                "NatsCluster: the {size} nodes did not route to each other within {CLUSTER_TIMEOUT:?}\n{}",
                cluster
                    .nodes
                    .iter()
                    .map(|n| log_tail(&n.log_file(), 10))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Whether every running node has a route to every other running node.
    pub fn is_routed(&self) -> bool {
        let running: Vec<&NatsServer> = self.nodes.iter().filter(|n| n.is_running()).collect();
        running
            .iter()
            .all(|n| n.route_count() == Some(running.len() as u64 - 1))
    }

    /// The nodes, in order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// One node, to stop, pause or restart.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Every node's client URL, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The index of the node a client connection named `name` is on, if any.
    pub fn node_with_connection(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.connection_names().iter().any(|c| c == name))
    }
}
