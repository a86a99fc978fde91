//! Servers do not outlive the test process, even when their values are never dropped:
//! a test process that is killed (no Drop runs) or that exits with servers still alive
//! (kept in a `static`, or forgotten).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use beamline_test_support::{NatsServer, PgCluster};

/// Set for the helper process: `<mode>:<report file>`, mode `kill` or `exit`.
const HELPER_ENV: &str = "BEAMLINE_TEST_SUPPORT_ORPHAN_HELPER";

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// Run in a child process by the tests below: starts both servers, reports their
/// processes and directories, and then either SIGKILLs its own process (`kill`) or
/// forgets the servers and lets the process exit normally (`exit`).
#[test]
#[ignore = "helper process of the other tests in this file"]
fn orphan_helper() {
    let Some(setting) = std::env::var(HELPER_ENV).ok() else {
        return;
    };
    let (mode, report) = setting.split_once(':').expect("<mode>:<report file>");
    let nats = NatsServer::start();
    let pg = PgCluster::start();
    let postmaster = pg.pid().expect("postgres running");
    let mut pids = vec![nats.pid().expect("nats running"), postmaster];
    pids.extend(children_of(postmaster));
    let text = format!(
        "{}\n{}\n{}\n",
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        nats.store_dir().display(),
        pg.data_dir().parent().expect("parent").display()
    );
    std::fs::write(report, text).expect("write report");
    match mode {
        "kill" => {
            // SAFETY: plain system calls; we want to die here without running any Drop.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            unreachable!("SIGKILL should have ended the process");
        }
        "exit" => {
            std::mem::forget(nats);
            std::mem::forget(pg);
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Runs the helper in `mode`; returns whether it succeeded, the server processes that
/// are still alive after a grace period, and the directories that still exist. Cleans
/// up whatever is left.
fn run_helper(mode: &str) -> (bool, Vec<u32>, Vec<String>) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let report = scratch.path().join("report");
    let status = Command::new(std::env::current_exe().expect("current exe"))
        .args(["orphan_helper", "--exact", "--ignored", "--test-threads=1"])
        .env(HELPER_ENV, format!("{mode}:{}", report.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the helper");
    let text = std::fs::read_to_string(&report).expect("the helper wrote its report");
    let mut lines = text.lines();
    let pids: Vec<u32> = lines
        .next()
        .expect("pids")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    let dirs: Vec<String> = lines.map(str::to_owned).collect();
    assert!(
        pids.len() > 2,
        "nats-server, postmaster and its children: {pids:?}"
    );
    assert_eq!(dirs.len(), 2, "{dirs:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let alive = loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            break alive;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let remaining: Vec<String> = dirs
        .iter()
        .filter(|d| Path::new(d).exists())
        .cloned()
        .collect();

    // Clean up after a failure (or after `kill`, where no clean-up ran).
    for &pid in &alive {
        // SAFETY: plain system call; the pids are the helper's servers, still alive.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    (status.success(), alive, remaining)
}

#[test]
fn servers_die_with_a_killed_test_process() {
    let (success, alive, _) = run_helper("kill");
    assert!(!success, "the helper should have been killed");
    assert!(
        alive.is_empty(),
        "processes outlived the killed test process: {alive:?}"
    );
}

#[test]
fn servers_never_dropped_are_cleaned_up_at_exit() {
    let (success, alive, remaining) = run_helper("exit");
    assert!(success, "the helper should have exited normally");
    assert!(
        alive.is_empty(),
        "processes outlived the test process: {alive:?}"
    );
    assert!(
        remaining.is_empty(),
        "directories left behind: {remaining:?}"
    );
}
