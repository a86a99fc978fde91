//! [`PgCluster`]: a throwaway PostgreSQL cluster of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tempfile::TempDir;

use crate::free_port;
use crate::process::{self, ExitGuard, RunAs, log_tail};

/// How long [`PgCluster::start`] and [`PgCluster::restart`] wait for the server.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How many free ports [`PgCluster::start`] tries when the chosen one was taken.
const PORT_ATTEMPTS: usize = 5;
/// Where the Debian packages install the server binaries, one directory per version.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// A throwaway PostgreSQL cluster on a free port of 127.0.0.1.
///
/// [`start`](Self::start) runs `initdb` (superuser `postgres`, trust authentication,
/// `--no-sync`) in a new temporary directory under `/tmp` and starts `postgres` on it,
/// listening on 127.0.0.1 only, with its unix socket in the temporary directory and
/// `fsync=off`. [`stop`](Self::stop) and [`restart`](Self::restart) take the server
/// away and bring it back on the same port with the same data, for fault tests.
/// Dropping the value shuts the server down (immediate mode) and removes the
/// directory.
///
/// The binaries are taken from `PG_BIN` if set, else from the highest version under
/// `/usr/lib/postgresql/*/bin`, else from `PATH`. PostgreSQL refuses to run as root:
/// when the tests run as root, `initdb` and `postgres` run as the OS user `postgres`
/// (which the Debian package creates), and the directory is owned by that user.
///
/// Create databases on the cluster with
/// [`TestDatabase::create_on(&cluster.url())`](crate::TestDatabase::create_on).
#[derive(Debug)]
pub struct PgCluster {
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    dir: TempDir,
    child: Mutex<Option<Child>>,
    exit_guard: ExitGuard,
}

enum Launch {
    Ready(Child),
    Exited(String),
}

impl PgCluster {
    /// Creates and starts a cluster on a free port and waits until it accepts
    /// connections (a successful `select 1`).
    ///
    /// # Panics
    ///
    /// If the PostgreSQL binaries are missing, `initdb` fails, or the server does not
    /// become ready within 60 seconds.
    pub fn start() -> PgCluster {
        let bin_dir = find_bin_dir();
        let run_as = if process::running_as_root() {
            Some(process::lookup_user("postgres").unwrap_or_else(|| {
                panic!(
                    "PgCluster::start: running as root, but there is no OS user `postgres` \
                     to run PostgreSQL as (it refuses to run as root): install the Debian \
                     package postgresql, which creates it, or run the tests as another user"
                )
            }))
        } else {
            None
        };

        // Under /tmp rather than $TMPDIR: the postgres user must be able to reach it,
        // and the unix socket path must stay short (about 100 bytes at most).
        let tmp_root = Path::new("/tmp");
        let mut builder = tempfile::Builder::new();
        builder.prefix("beamline-pg-");
        let dir = if tmp_root.is_dir() {
            builder.tempdir_in(tmp_root)
        } else {
            builder.tempdir()
        }
        .unwrap_or_else(|e| panic!("PgCluster::start: cannot create a temporary directory: {e}"));
        if let Some(user) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap_or_else(
                |e| {
                    panic!(
                        "PgCluster::start: cannot give {} to the postgres user (uid {}): {e}",
                        dir.path().display(),
                        user.uid
                    )
                },
            );
        }

        let exit_guard = ExitGuard::new(dir.path(), libc::SIGQUIT);
        let mut cluster = PgCluster {
            bin_dir,
            run_as,
            port: 0,
            dir,
            child: Mutex::new(None),
            exit_guard,
        };
        cluster.initdb();

        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port();
            // A fresh log per attempt, so that an earlier attempt's error is not
            // mistaken for this one's.
            let _ = std::fs::remove_file(cluster.log_file());
            match cluster.launch() {
                Launch::Ready(child) => {
                    cluster.set_child(child);
                    return cluster;
                }
                Launch::Exited(log) if log.contains("Address already in use") => {
                    failures.push(format!("port {} was taken", cluster.port));
                }
                Launch::Exited(log) => panic!(
                    "PgCluster::start: postgres exited during startup on port {}\n{log}",
                    cluster.port
                ),
            }
        }
        panic!(
            "PgCluster::start: could not start postgres on a free port after {} attempts: {}",
            PORT_ATTEMPTS,
            failures.join(", ")
        );
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port. It stays the same across [`stop`](Self::stop) and
    /// [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (`PGDATA`), kept across restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (stdout and stderr of every run, appended).
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The process id of the running postmaster, if it is running.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let child = guard.as_mut()?;
        process::is_alive(child).then(|| child.id())
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Freezes the whole server with SIGSTOP — the postmaster and every backend — as a
    /// hung host would: connections stay open, queries and new connections get no
    /// answer. Undone by [`resume`](Self::resume); [`stop`](Self::stop) and drop
    /// resume a paused server before shutting it down.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            // The postmaster first, so that it forks no new backend meanwhile.
            process::signal_pids(&process::process_tree(pid), libc::SIGSTOP);
        }
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT to every process).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            let tree = process::process_tree(pid);
            // Children first, so that the postmaster finds its backends running.
            let mut reversed = tree.clone();
            reversed.reverse();
            process::signal_pids(&reversed, libc::SIGCONT);
        }
    }

    /// Shuts the server down in fast mode (SIGINT: running transactions are rolled
    /// back, clients disconnected, a checkpoint written) and waits for it to exit,
    /// escalating to immediate mode and SIGKILL if that takes too long. The port and
    /// the data are kept for [`restart`](Self::restart). Does nothing if the server is
    /// not running.
    pub fn stop(&mut self) {
        self.shutdown(&[
            (libc::SIGINT, Duration::from_secs(60)),
            (libc::SIGQUIT, Duration::from_secs(10)),
        ]);
    }

    /// Starts the server again on the same port with the same data directory, and
    /// waits until it accepts connections. Stops it first if it is running.
    ///
    /// # Panics
    ///
    /// If the server does not come back within 60 seconds, e.g. because another
    /// process took the port meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        match self.launch() {
            Launch::Ready(child) => {
                self.set_child(child);
            }
            Launch::Exited(log) => panic!(
                "PgCluster::restart: postgres exited during startup on port {} \
                 (was the port taken by another process meanwhile?)\n{log}",
                self.port
            ),
        }
    }

    fn shutdown(&mut self, steps: &[(libc::c_int, Duration)]) {
        // A paused server handles no signal but SIGKILL until it runs again.
        self.resume();
        if let Some(mut child) = self.take_child() {
            process::stop_child(&mut child, steps);
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        // The postgres user may not be allowed into the test's working directory.
        cmd.current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        cmd
    }

    fn initdb(&self) {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]);
        process::prepare(&mut cmd, self.run_as);
        let output = cmd.output().unwrap_or_else(|e| {
            panic!(
                "PgCluster::start: cannot run {}: {e}",
                self.bin_dir.join("initdb").display()
            )
        });
        if !output.status.success() {
            panic!(
                "PgCluster::start: initdb failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
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
                "PgCluster: cannot open log file {}: {e}",
                log_path.display()
            )
        });
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdout(stdout)
            .stderr(stderr);
        process::prepare(&mut cmd, self.run_as);
        let mut child = process::spawn_server(cmd).unwrap_or_else(|e| {
            panic!(
                "PgCluster: cannot run {}: {e}",
                self.bin_dir.join("postgres").display()
            )
        });

        let url = self.url();
        let ready = process::block_on_fresh_runtime(async {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Some(status));
                }
                let attempt = async {
                    let mut conn = sqlx::PgConnection::connect(&url).await?;
                    sqlx::query("select 1").execute(&mut conn).await?;
                    conn.close().await
                };
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(None);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        match ready {
            Ok(Ok(())) if process::is_alive(&mut child) => Launch::Ready(child),
            Ok(Ok(())) => Launch::Exited(format!(
                "postgres exited although port {} answered (another server on it?)\n{}",
                self.port,
                log_tail(&log_path, 30)
            )),
            Ok(Err(Some(status))) => Launch::Exited(format!(
                "exit status: {status}\n{}",
                log_tail(&log_path, 30)
            )),
            Ok(Err(None)) => {
                process::stop_child(&mut child, &[(libc::SIGQUIT, Duration::from_secs(5))]);
                panic!(
                    "PgCluster: postgres on port {} did not accept connections within {:?}\n{}",
                    self.port,
                    READY_TIMEOUT,
                    log_tail(&log_path, 30)
                );
            }
            Err(e) => {
                process::stop_child(&mut child, &[(libc::SIGQUIT, Duration::from_secs(5))]);
                panic!("PgCluster: cannot wait for postgres to become ready: {e}");
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster stops its children and exits without a
        // checkpoint; the data is thrown away anyway.
        self.shutdown(&[(libc::SIGQUIT, Duration::from_secs(15))]);
        // The TempDir field removes the directory after this.
    }
}

/// The directory holding `initdb` and `postgres`.
fn find_bin_dir() -> PathBuf {
    let has_binaries = |dir: &Path| {
        process::is_executable(&dir.join("initdb")) && process::is_executable(&dir.join("postgres"))
    };

    if let Some(dir) = std::env::var_os("PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if !has_binaries(&dir) {
            panic!(
                "PgCluster: PG_BIN={} does not contain the executables initdb and postgres",
                dir.display()
            );
        }
        return dir;
    }

    if let Ok(entries) = std::fs::read_dir(DEBIAN_PG_ROOT) {
        let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let version = name
                    .split('.')
                    .map(|part| part.parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()?;
                let bin = entry.path().join("bin");
                has_binaries(&bin).then_some((version, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return bin;
        }
    }

    if let Some(initdb) = process::find_executable("initdb")
        && let Some(dir) = initdb.parent()
        && has_binaries(dir)
    {
        return dir.to_path_buf();
    }

    panic!(
        "PgCluster: PostgreSQL server binaries (initdb, postgres) not found in PG_BIN, \
         {DEBIAN_PG_ROOT}/*/bin or on PATH: install the Debian package postgresql, set PG_BIN, \
         or run scripts/test"
    );
}
