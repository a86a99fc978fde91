//! A private nats-server for `serve --demo`, so that the one command a newcomer runs
//! gives a working pipeline on a machine where no NATS server runs.
//!
//! Only `--demo` does this: its extensions run in-process, so a private server is
//! all they need. A production router never starts one — it waits for the NATS it
//! was configured with, and says so at start.
//!
//! The server runs as the router's child on 127.0.0.1: on the configured port when
//! that is a loopback address nothing listens on (so `nats request` and other tools
//! pointed at the usual URL reach it), else on a free port. It ends with the router:
//! stopped at shutdown, killed with the child on drop, and (Linux) sent SIGTERM by the
//! kernel if the router dies without a shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// How long a NATS server may take to send its INFO line.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the private server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The Debian command that installs nats-server, for the message when it is missing.
pub const INSTALL_HINT: &str = "sudo apt-get install -y nats-server";

/// Host and port of the first server of a NATS URL list (`nats://[user:pass@]host[:port],…`).
pub fn first_server(url: &str) -> Option<(String, u16)> {
    let first = url.split(',').next()?.trim();
    let parsed = url::Url::parse(first).ok()?;
    let host = parsed.host_str()?.trim_matches(['[', ']']).to_string();
    Some((host, parsed.port().unwrap_or(4222)))
}

/// Whether a NATS server answers at `host:port` (sends its `INFO` line) within the
/// probe timeout.
pub async fn answers(host: &str, port: u16) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        Some(line.starts_with("INFO"))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// The environment variable naming the nats-server binary to use.
pub const BINARY_ENV: &str = "BEAMLINE_NATS_SERVER";

/// The system directories Debian installs nats-server to, searched after PATH.
const SYSTEM_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// `$BEAMLINE_NATS_SERVER` when set, else `nats-server` on PATH or in the system
/// directories Debian installs it to.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        return Some(PathBuf::from(path)).filter(|p| is_executable(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(SYSTEM_DIRS.map(PathBuf::from));
    find_in(dirs)
}

fn find_in(dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    dirs.into_iter()
        .map(|dir| dir.join("nats-server"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where [`find_binary`] looked, for the message when it found nothing.
fn looked_in() -> String {
    match std::env::var_os(BINARY_ENV) {
        Some(p) => format!("{BINARY_ENV}={} is not an executable", p.to_string_lossy()),
        None => format!("not on PATH nor in {}", SYSTEM_DIRS.join(", ")),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A port of 127.0.0.1 nothing listens on now.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(listener.local_addr()?.port())
}

/// A running private nats-server.
pub struct PrivateNats {
    child: tokio::process::Child,
    pub url: String,
}

/// Why no private server could be started, in one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "nats-server is not installed ({0}): install it with `{INSTALL_HINT}` (scripts/run does), or point [nats] url / BEAMLINE_NATS_URL at a NATS server"
    )]
    NotInstalled(String),
    #[error("nats-server did not start: {0}")]
    Failed(String),
}

impl PrivateNats {
    /// Starts one, on `wanted_port` when `wanted_host` is a loopback address (the port
    /// is then known to be free of NATS), else on a free port.
    pub async fn start(wanted_host: &str, wanted_port: u16) -> Result<PrivateNats, StartError> {
        let binary = find_binary().ok_or_else(|| StartError::NotInstalled(looked_in()))?;
        let mut ports = Vec::new();
        if is_loopback(wanted_host) {
            ports.push(wanted_port);
        }
        let mut failures = Vec::new();
        for _ in 0..4 {
            let port = match ports.pop() {
                Some(p) => p,
                None => {
                    free_port().map_err(|e| StartError::Failed(format!("no free port: {e}")))?
                }
            };
            match Self::launch(&binary, port).await {
                Ok(server) => return Ok(server),
                Err(e) => failures.push(format!("port {port}: {e}")),
            }
        }
        Err(StartError::Failed(failures.join("; ")))
    }

    async fn launch(binary: &PathBuf, port: u16) -> Result<PrivateNats, String> {
        let mut command = tokio::process::Command::new(binary);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C in the terminal reaches the router only,
            // which stops this server after its own shutdown (it still needs NATS
            // while it drains).
            .process_group(0)
            .kill_on_drop(true);
        // The kernel sends the parent-death signal when the thread that spawned the
        // child ends: `serve` starts it from the thread running its main future
        // (`block_on` on the main thread), which lives as long as the process.
        // SAFETY: prctl(2) only sets this process's parent-death signal; it is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut log = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), err.read_to_string(&mut log))
                            .await;
                }
                let last = log.lines().last().unwrap_or("").to_string();
                return Err(format!("exited ({status}): {last}"));
            }
            if answers("127.0.0.1", port).await {
                // Keep reading its log so it never blocks on a full pipe.
                if let Some(err) = child.stderr.take() {
                    tokio::spawn(async move {
                        let mut lines = BufReader::new(err).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::debug!(target: "nats_server", "{line}");
                        }
                    });
                }
                return Ok(PrivateNats {
                    child,
                    url: format!("nats://127.0.0.1:{port}"),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(format!("no answer within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_server_of_a_url_list() {
        assert_eq!(
            first_server("nats://u:p@10.0.0.1:4333,nats://b:4222"),
            Some(("10.0.0.1".into(), 4333))
        );
        assert_eq!(
            first_server("nats://127.0.0.1"),
            Some(("127.0.0.1".into(), 4222))
        );
        assert!(is_loopback("localhost") && is_loopback("::1") && !is_loopback("10.0.0.1"));
    }

    #[test]
    fn the_binary_is_the_first_executable_in_the_directories() {
        use std::os::unix::fs::PermissionsExt;
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let plain = a.path().join("nats-server");
        std::fs::write(&plain, "").unwrap();
        let exe = b.path().join("nats-server");
        std::fs::write(&exe, "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dirs = || [a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find_in(dirs()), Some(exe));
        assert_eq!(find_in([a.path().to_path_buf()]), None);
    }
}
