//! Everything the testbed creates is registered here and undone when its guard drops, when the
//! process gets SIGINT/SIGTERM/SIGHUP, and (for a run that was killed outright) by
//! [`sweep_stale`] at the next start. All names carry [`PREFIX`] and the creating pid.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, Once,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

/// Prefix of every namespace, cgroup and directory the testbed makes: `lbt<pid>-<n>...`.
pub const PREFIX: &str = "lbt";

/// One thing to undo.
#[derive(Clone, Debug)]
pub enum Undo {
    Netns(String),
    /// A cgroup directory; processes still in it are killed first (they are our probes).
    Cgroup(PathBuf),
    Unmount(PathBuf),
    RemoveDir(PathBuf),
    Kill(u32),
}

impl Undo {
    pub fn run(&self) {
        match self {
            Undo::Netns(name) => {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
            Undo::Cgroup(path) => remove_cgroup(path),
            Undo::Unmount(path) => {
                if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
                    // SAFETY: c is a valid NUL-terminated path.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
            Undo::RemoveDir(path) => {
                let _ = std::fs::remove_dir_all(path);
            }
            Undo::Kill(pid) => {
                // SAFETY: plain syscall.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn remove_cgroup(path: &Path) {
    for _ in 0..40 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => {
                let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain syscall; only processes in our own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}

static REGISTRY: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Undoes its action when dropped.
#[derive(Debug)]
pub struct Guard(u64);

pub fn register(undo: Undo) -> Guard {
    install_signal_handler();
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    REGISTRY.lock().unwrap().push((id, undo));
    Guard(id)
}

impl Drop for Guard {
    fn drop(&mut self) {
        let undo = {
            let mut registry = REGISTRY.lock().unwrap();
            let index = registry.iter().position(|(id, _)| *id == self.0);
            index.map(|i| registry.remove(i).1)
        };
        if let Some(undo) = undo {
            undo.run();
        }
    }
}

/// On SIGINT/SIGTERM/SIGHUP: undo everything still registered, newest first, and exit.
fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(mut signals) = Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!("\ninterrupted: removing the testbed's namespaces, cgroups and mounts");
                let undos: Vec<Undo> = REGISTRY.lock().unwrap().drain(..).map(|(_, u)| u).collect();
                for undo in undos.iter().rev() {
                    undo.run();
                }
                std::process::exit(128 + signal);
            }
        });
    });
}

/// Removes what an earlier run left behind when it was killed without a chance to clean up:
/// namespaces, cgroups and mounts whose name carries the pid of a process that no longer exists.
pub fn sweep_stale(cgroup_root: &Path) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dead = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            match pid.parse::<i32>() {
                // SAFETY: signal 0 only checks for existence.
                Ok(pid) => unsafe {
                    libc::kill(pid, 0) != 0 && *libc::__errno_location() == libc::ESRCH
                },
                Err(_) => false,
            }
        };
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if dead(name) {
                    eprintln!("removing stale network namespace {name}");
                    Undo::Netns(name.to_owned()).run();
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for mount_point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            let path = Path::new(mount_point);
            let in_stale_dir = path
                .ancestors()
                .filter_map(|p| p.file_name()?.to_str())
                .any(dead);
            if in_stale_dir {
                eprintln!("removing stale mount {mount_point}");
                Undo::Unmount(path.to_owned()).run();
            }
        }
        for dir in [cgroup_root.to_owned(), std::env::temp_dir()] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dead(&name) {
                    eprintln!("removing stale {}", entry.path().display());
                    if dir == cgroup_root {
                        Undo::Cgroup(entry.path()).run();
                    } else {
                        Undo::RemoveDir(entry.path()).run();
                    }
                }
            }
        }
    });
}
