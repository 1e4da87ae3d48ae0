//! Watching a service's release: the paths whose change (a symlink flipped to a new release directory, a
//! binary replaced, a file rewritten in place) upgrades the service.
//!
//! A path's identity is its [`Fingerprint`]: where it leads once every symlink is followed, and that file's
//! device, inode, size and modification time (not its change time, which a rename alone moves). The kernel says when to look again (inotify, through
//! the `notify` crate, on the directories that hold the paths and their targets); a poll every
//! [`POLL_INTERVAL`] looks too, so that a change is seen even where inotify cannot watch (its limits, some
//! file systems). A path that disappears is not a change until it is back, and back different. The
//! service's lifecycle debounces the changes (`watch_settle`), so that a copy in progress is not taken
//! half-written.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::mpsc;

/// How often the paths are looked at whatever inotify says.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies the file a path leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The path with every symlink followed.
    pub target: PathBuf,
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
}

impl Fingerprint {
    /// The fingerprint of what `path` leads to now, or `None` if it leads nowhere.
    pub fn of(path: &Path) -> Option<Fingerprint> {
        let target = std::fs::canonicalize(path).ok()?;
        let meta = std::fs::metadata(&target).ok()?;
        Some(Fingerprint {
            target,
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// The paths of one service and what each led to when last seen there.
#[derive(Debug)]
pub struct Paths {
    seen: HashMap<PathBuf, Option<Fingerprint>>,
    /// The last fingerprint of each path while it existed: a path that comes back the same is no change.
    last: HashMap<PathBuf, Fingerprint>,
}

impl Paths {
    /// The paths as they are now.
    pub fn new(paths: &[PathBuf]) -> Paths {
        let mut seen = HashMap::new();
        let mut last = HashMap::new();
        for path in paths {
            let print = Fingerprint::of(path);
            if let Some(print) = &print {
                last.insert(path.clone(), print.clone());
            }
            seen.insert(path.clone(), print);
        }
        Paths { seen, last }
    }

    /// Looks at every path again: the ones that changed since they were last seen, and exist.
    pub fn look(&mut self) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        for (path, seen) in &mut self.seen {
            let now = Fingerprint::of(path);
            if let Some(print) = &now {
                if self.last.get(path) != Some(print) {
                    changed.push(path.clone());
                    self.last.insert(path.clone(), print.clone());
                }
            }
            *seen = now;
        }
        changed.sort();
        changed
    }

    /// The directories to watch: those holding each path and what it leads to.
    fn directories(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .seen
            .iter()
            .flat_map(|(path, seen)| [Some(path.as_path()), seen.as_ref().map(|s| s.target.as_path())])
            .flatten()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// Watches `paths` until dropped, sending each that changes on `changed`.
pub async fn watch(paths: Vec<PathBuf>, changed: mpsc::UnboundedSender<PathBuf>) {
    let mut state = Paths::new(&paths);
    let (events, mut woken) = mpsc::unbounded_channel::<()>();
    let mut watcher = match notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        let _ = events.send(());
    }) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(%error, "cannot watch with inotify: polling every second");
            None
        }
    };
    let mut watched: Vec<PathBuf> = Vec::new();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The directories may move with the targets (a flipped symlink): watch the ones that hold them now.
        if let Some(watcher) = watcher.as_mut() {
            let dirs = state.directories();
            for dir in watched.iter().filter(|d| !dirs.contains(d)) {
                let _ = watcher.unwatch(dir);
            }
            for dir in dirs.iter().filter(|d| !watched.contains(d)) {
                if let Err(error) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::debug!(%error, dir = %dir.display(), "cannot watch a directory: polling it");
                }
            }
            watched = dirs;
        }
        tokio::select! {
            Some(()) = woken.recv() => {
                // A burst of events is one look.
                while woken.try_recv().is_ok() {}
            }
            _ = poll.tick() => {}
        }
        for path in state.look() {
            tracing::info!(path = %path.display(), "a watched path changed");
            if changed.send(path).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_symlink_a_replaced_file_and_a_rewrite_are_changes_and_a_disappearance_is_not() {
        let dir = tempfile::tempdir().expect("dir");
        let releases = dir.path().join("releases");
        std::fs::create_dir_all(releases.join("41")).expect("41");
        std::fs::create_dir_all(releases.join("42")).expect("42");
        let current = dir.path().join("current");
        std::os::unix::fs::symlink(releases.join("41"), &current).expect("link");
        let binary = dir.path().join("server");
        std::fs::write(&binary, b"v1").expect("write");
        let mut paths = Paths::new(&[current.clone(), binary.clone()]);
        assert!(paths.look().is_empty(), "nothing changed");

        // The symlink flipped, as `ln -sfn` does it: a new link renamed over the old one.
        let next = dir.path().join("current.next");
        std::os::unix::fs::symlink(releases.join("42"), &next).expect("link");
        std::fs::rename(&next, &current).expect("flip");
        assert_eq!(paths.look(), vec![current.clone()]);
        // The binary replaced by a rename, then rewritten in place.
        let new = dir.path().join("server.new");
        std::fs::write(&new, b"v2").expect("write");
        std::fs::rename(&new, &binary).expect("replace");
        assert_eq!(paths.look(), vec![binary.clone()]);
        std::fs::write(&binary, b"v3!").expect("rewrite");
        assert_eq!(paths.look(), vec![binary.clone()]);
        // Gone is no change; back the same is none either; back different is one.
        let kept = dir.path().join("kept");
        std::fs::rename(&binary, &kept).expect("away");
        assert!(paths.look().is_empty(), "a path that disappears is no change");
        std::fs::rename(&kept, &binary).expect("back");
        assert!(paths.look().is_empty(), "back as it was");
        std::fs::remove_file(&binary).expect("remove");
        assert!(paths.look().is_empty());
        std::fs::write(&binary, b"v4").expect("write");
        assert_eq!(paths.look(), vec![binary.clone()]);
    }

    #[tokio::test]
    async fn the_watch_reports_a_change_as_it_happens() {
        let dir = tempfile::tempdir().expect("dir");
        let binary = dir.path().join("server");
        std::fs::write(&binary, b"v1").expect("write");
        let (changed, mut changes) = mpsc::unbounded_channel();
        let watching = tokio::spawn(watch(vec![binary.clone()], changed));
        // Give the watcher its first look before the change.
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let new = dir.path().join("server.new");
        loop {
            std::fs::write(&new, format!("v2 {:?}", started.elapsed())).expect("write");
            std::fs::rename(&new, &binary).expect("replace");
            match tokio::time::timeout(Duration::from_millis(200), changes.recv()).await {
                Ok(Some(path)) => {
                    assert_eq!(path, binary);
                    break;
                }
                Ok(None) => panic!("the watch ended"),
                Err(_) if started.elapsed() < Duration::from_secs(10) => {}
                Err(_) => panic!("no change reported"),
            }
        }
        watching.abort();
    }
}
