//! Spawning, supervising and stopping the server processes.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Directories searched after `PATH`: `nats-server` lives in `/usr/sbin` on Debian,
/// which is not on the `PATH` of every user.
const EXTRA_BIN_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The first executable file called `name` on `PATH` or in the usual system
/// directories.
pub(crate) fn find_executable(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// An OS user the servers run as when the tests run as root (PostgreSQL refuses to
/// run as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Looks up an OS user by name.
pub(crate) fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the duration of the call and `buf` is as long
    // as we say it is; getpwnam_r is the thread-safe variant.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `cmd` run as `run_as` (when given) and, on Linux, die with the test process.
///
/// Everything happens in the forked child right before `exec`, in this order:
/// supplementary groups, group, user, and then `PR_SET_PDEATHSIG` (Linux clears the
/// parent-death signal when credentials change, so it must come last).
pub(crate) fn prepare(cmd: &mut Command, run_as: Option<RunAs>) {
    let parent = std::process::id();
    // SAFETY: the closure only makes async-signal-safe system calls and touches no
    // memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(RunAs { uid, gid }) = run_as {
                let groups = [gid as libc::gid_t];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(gid as libc::gid_t) != 0
                    || libc::setuid(uid as libc::uid_t) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The test process may have died between fork and prctl.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("the test process exited during spawn"));
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = parent;
            Ok(())
        });
    }
}

/// Spawns a server process that is tied to the lifetime of the test process.
///
/// Linux delivers the parent-death signal when the *thread* that forked the child
/// exits, not the process. Test threads come and go (libtest, tokio's blocking pool),
/// so all servers are forked by one thread that lives as long as the process.
/// `cmd` must have gone through [`prepare`].
pub(crate) fn spawn_server(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Option<mpsc::Sender<Request>>> = OnceLock::new();

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("beamline-test-support-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });

    let mut cmd = cmd;
    let Some(spawner) = spawner else {
        // No spawner thread: the child then dies with the calling thread at the latest.
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    if let Err(mpsc::SendError((mut cmd, _))) = spawner.send((cmd, reply_tx)) {
        return cmd.spawn();
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")))
}

/// Opens (creating or appending to) a log file and returns two handles for a child's
/// stdout and stderr.
pub(crate) fn log_handles(path: &Path) -> io::Result<(File, File)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let clone = file.try_clone()?;
    Ok((file, clone))
}

/// The last `max_lines` lines of a log file, for panic messages.
pub(crate) fn log_tail(path: &Path, max_lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            let tail = lines[start..].join("\n");
            if tail.trim().is_empty() {
                format!("(log {} is empty)", path.display())
            } else {
                format!("--- last lines of {} ---\n{tail}", path.display())
            }
        }
        Err(e) => format!("(cannot read log {}: {e})", path.display()),
    }
}

/// Whether the child is still running (without reaping it if it is not).
pub(crate) fn is_alive(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

/// Polls `child` until it exits or `timeout` passes.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // ECHILD: somebody else reaped it; it is gone either way.
            Err(_) => return Some(ExitStatus::default()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops `child`: sends each signal in turn and waits up to its timeout for the
/// process to exit, then kills it with SIGKILL and reaps it.
pub(crate) fn stop_child(child: &mut Child, steps: &[(libc::c_int, Duration)]) {
    if !is_alive(child) {
        return;
    }
    for &(signal, timeout) in steps {
        send_signal(child, signal);
        if wait_timeout(child, timeout).is_some() {
            return;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn send_signal(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet
    // (callers check), so the pid still names our child.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Runs a future to completion on a new thread with its own current-thread tokio
/// runtime, so that it works both inside and outside a tokio runtime (a runtime
/// cannot be blocked on from within another). Blocks the calling thread.
pub(crate) fn block_on_fresh_runtime<F>(future: F) -> io::Result<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name("beamline-test-support-runtime".into())
            .spawn_scoped(scope, || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(future))
            })?;
        handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the helper thread panicked")))
    })
}

/// Servers whose values are never dropped (kept in a `static`, or forgotten) are
/// stopped, and their directories removed, when the test process exits normally.
/// Each live server holds an [`ExitGuard`] that registers it until it is dropped.
struct ExitCleanup {
    id: u64,
    pid: Option<u32>,
    stop_signal: libc::c_int,
    dir: PathBuf,
}

static EXIT_CLEANUPS: std::sync::Mutex<Vec<ExitCleanup>> = std::sync::Mutex::new(Vec::new());

/// Registration of a live server for clean-up at process exit; see [`ExitCleanup`].
#[derive(Debug)]
pub(crate) struct ExitGuard {
    id: u64,
}

impl ExitGuard {
    /// Registers `dir` for removal at exit. `stop_signal` is sent to the server's
    /// process (see [`set_pid`](Self::set_pid)) first.
    pub(crate) fn new(dir: &Path, stop_signal: libc::c_int) -> ExitGuard {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        INSTALL.call_once(|| {
            // SAFETY: registering a plain function; it never unwinds.
            unsafe {
                libc::atexit(run_exit_cleanups);
            }
        });
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        exit_cleanups().push(ExitCleanup {
            id,
            pid: None,
            stop_signal,
            dir: dir.to_path_buf(),
        });
        ExitGuard { id }
    }

    /// Records the server's running process, or `None` before it is stopped (so that
    /// a reused pid is never signalled).
    pub(crate) fn set_pid(&self, pid: Option<u32>) {
        if let Some(entry) = exit_cleanups().iter_mut().find(|e| e.id == self.id) {
            entry.pid = pid;
        }
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        exit_cleanups().retain(|e| e.id != self.id);
    }
}

fn exit_cleanups() -> std::sync::MutexGuard<'static, Vec<ExitCleanup>> {
    EXIT_CLEANUPS.lock().unwrap_or_else(|p| p.into_inner())
}

extern "C" fn run_exit_cleanups() {
    // Never block or unwind here: another thread may hold the lock as we exit.
    let mut list = match EXIT_CLEANUPS.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for entry in list.drain(..) {
        if let Some(pid) = entry.pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: plain system calls on our own, not yet reaped, child.
            unsafe {
                libc::kill(pid, entry.stop_signal);
                let mut exited = false;
                for _ in 0..250 {
                    let mut status = 0;
                    if libc::waitpid(pid, &mut status, libc::WNOHANG) != 0 {
                        exited = true;
                        break;
                    }
                    libc::usleep(20_000);
                }
                if !exited {
                    libc::kill(pid, libc::SIGKILL);
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&entry.dir);
    }
}

/// `pid` and every process descended from it (children, grandchildren, ...), parents
/// before their children, read from `/proc`. Empty off Linux.
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // The fields after the command name, which is in parentheses and may
            // itself contain spaces or parentheses: state, ppid, ...
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parent_of.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// Sends `signal` to each of `pids`; a process that is gone meanwhile is skipped.
/// For SIGSTOP and SIGCONT, waits (up to 5 s) until the kernel shows every process
/// stopped or running, since delivery is asynchronous.
pub(crate) fn signal_pids(pids: &[u32], signal: libc::c_int) {
    for pid in pids {
        if let Ok(pid) = libc::pid_t::try_from(*pid) {
            // SAFETY: kill(2) on processes of a server this test started.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
    let want_stopped = match signal {
        libc::SIGSTOP => true,
        libc::SIGCONT => false,
        _ => return,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let settled = pids.iter().all(|pid| match process_state(*pid) {
            Some(state) => (state == 'T') == want_stopped,
            None => true,
        });
        if settled {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `T` stopped, `Z`, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
