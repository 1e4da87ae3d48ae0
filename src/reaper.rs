//! Reaping orphans: when baton is PID 1 (a container's main process) or a child subreaper
//! (`baton run --subreaper`, `PR_SET_CHILD_SUBREAPER`), the kernel makes it the parent of every process its
//! workers leave behind, and each of those stays a zombie until baton waits for it.
//!
//! Baton's own children (workers, checks of a new binary, the holder of a re-exec) are waited for by their
//! own tasks, by pid or pidfd, and the status of each belongs to that wait: the reaper must never take one.
//! So every child baton starts is recorded here as it starts ([`spawned`], which holds the record's lock
//! across the fork, so that a child cannot exit and be reaped before it is known), and the reaper waits only
//! for children not recorded: on every SIGCHLD, it lists this process's children and reaps each exited one
//! it does not know.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Mutex, PoisonError};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// The children baton started and waits for itself.
static OWN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Starts a child with `spawn` and records it (its pid from `pid`) before any orphan can be reaped.
pub fn spawned<T>(spawn: impl FnOnce() -> io::Result<T>, pid: impl Fn(&T) -> Option<u32>) -> io::Result<T> {
    let mut own = OWN.lock().unwrap_or_else(PoisonError::into_inner);
    let child = spawn()?;
    if let Some(pid) = pid(&child).and_then(|p| i32::try_from(p).ok()) {
        own.insert(pid);
    }
    Ok(child)
}

/// Records a child this process already has (a worker handed over by a re-exec), or just started.
pub fn adopt(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        OWN.lock().unwrap_or_else(PoisonError::into_inner).insert(pid);
    }
}

/// Forgets a child of baton's own once its wait has reaped it: its pid may name another process later.
pub fn forget(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        OWN.lock().unwrap_or_else(PoisonError::into_inner).remove(&pid);
    }
}

/// Makes this process a child subreaper when asked to; says whether it reaps orphans: as PID 1, or as a
/// subreaper.
pub fn enable(subreaper: bool) -> io::Result<bool> {
    if subreaper {
        nix::sys::prctl::set_child_subreaper(true)?;
    }
    Ok(subreaper || std::process::id() == 1)
}

/// Reaps every exited child that is not one of baton's own; returns their pids.
pub fn reap_orphans() -> Vec<u32> {
    let own = OWN.lock().unwrap_or_else(PoisonError::into_inner);
    reap_among(&children(), &own)
}

/// Reaps each exited one of `children` that is not in `own`.
fn reap_among(children: &[i32], own: &BTreeSet<i32>) -> Vec<u32> {
    let mut reaped = Vec::new();
    for &pid in children {
        if own.contains(&pid) {
            continue;
        }
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) | Err(_) => {}
            Ok(_) => reaped.push(pid.unsigned_abs()),
        }
    }
    reaped
}

/// This process's children: from `/proc/self/task/*/children` where the kernel has it, else from every
/// process's parent in `/proc`.
fn children() -> Vec<i32> {
    let mut found = Vec::new();
    let tasks = std::fs::read_dir("/proc/self/task");
    let mut listed = false;
    for task in tasks.into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            listed = true;
            found.extend(text.split_whitespace().filter_map(|pid| pid.parse::<i32>().ok()));
        }
    }
    if listed {
        return found;
    }
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the command may hold spaces and parentheses, so read after the last.
        let parent = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let rest = stat.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(1).map(str::to_owned)
            });
        if parent.as_deref() == Some(me.as_str()) {
            found.push(pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_orphan_is_reaped_and_a_child_of_our_own_is_left_to_its_wait() {
        let own = spawned(|| std::process::Command::new("true").spawn(), |c| Some(c.id())).expect("spawn");
        let other = std::process::Command::new("true").spawn().expect("spawn");
        let (own_pid, other_pid) = (own.id(), other.id());
        let pids: Vec<i32> = [own_pid, other_pid]
            .iter()
            .map(|p| i32::try_from(*p).expect("pid"))
            .collect();
        assert!(
            pids.iter().all(|pid| children().contains(pid)),
            "both are listed as children"
        );
        // Both exit; until they are waited for they are zombies, children of this process. Other tests'
        // children are not looked at: they have waits of their own.
        let own_set = OWN.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut reaped = Vec::new();
        while !reaped.contains(&other_pid) {
            assert!(std::time::Instant::now() < deadline, "the orphan was never reaped");
            reaped.extend(reap_among(&pids, &own_set));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!reaped.contains(&own_pid), "a child of our own was taken from its wait");
        let mut own = own;
        assert!(own.wait().expect("its own wait").success());
        forget(own_pid);
        std::mem::forget(other);
    }
}
