//! A service's releases: what each generation was started with ([`Release`], kept so that an earlier one can
//! be started again), and the paths whose change (a symlink flipped to a new release directory, a binary
//! replaced, a file rewritten in place) upgrades the service.
//!
//! A path's identity is its [`Fingerprint`]: where it leads once every symlink is followed, and that file's
//! device, inode, size and modification time (not its change time, which a rename alone moves). The kernel says when to look again (inotify, through
//! the `notify` crate, on the directories that hold the paths and their targets); a poll every
//! [`POLL_INTERVAL`] looks too, so that a change is seen even where inotify cannot watch (its limits, some
//! file systems). A path that disappears is not a change until it is back, and back different. The
//! service's lifecycle debounces the changes (`watch_settle`), so that a copy in progress is not taken
//! half-written.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How many releases a service remembers.
pub const KEPT: usize = 10;

/// What a generation was started with: its release. The command, working directory and environment are the
/// configured ones with every path through a watched symlink resolved (and the executable's own path
/// resolved), so that a later flip of the symlink changes nothing under the running worker and the release
/// can be started again as it was; placeholders are kept (each generation gets its own address).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The generation started with it.
    pub generation: u64,
    /// The argv, paths resolved.
    pub command: Vec<String>,
    /// The `prepare` argv it was started after (run again when it is started again), paths resolved.
    #[serde(default)]
    pub prepare: Vec<String>,
    /// The working directory, resolved.
    pub cwd: Option<PathBuf>,
    /// The configured environment, paths resolved.
    pub env: BTreeMap<String, String>,
    /// The SHA-256 of the executable and of every file an argument or variable names, by resolved path.
    pub files: BTreeMap<PathBuf, String>,
    /// When it started, in Unix seconds.
    pub started: f64,
    /// When its worker ended, in Unix seconds.
    #[serde(default)]
    pub ended: Option<f64>,
    /// How its upgrade went.
    #[serde(default)]
    pub outcome: Option<crate::control::UpgradeResult>,
    /// The generation whose release this one started again (a rollback), if any.
    #[serde(default)]
    pub from: Option<u64>,
}

impl Release {
    /// The release `service`'s configuration makes for `generation` now: its paths resolved and its files
    /// hashed (which reads them: run it off the runtime's threads).
    pub fn resolve(service: &crate::config::ServiceConfig, generation: u64) -> Release {
        let through_watched = |value: &str| resolve_watched(value, &service.watch);
        let mut command: Vec<String> = service.command.iter().map(|a| through_watched(a)).collect();
        if let Some(program) = command.first_mut() {
            if program.contains('/') {
                if let Ok(real) = std::fs::canonicalize(&*program) {
                    *program = real.to_string_lossy().into_owned();
                }
            }
        }
        let prepare: Vec<String> = service.prepare.iter().map(|a| through_watched(a)).collect();
        let cwd = service
            .cwd
            .as_ref()
            .map(|cwd| std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.clone()));
        let env: BTreeMap<String, String> = service
            .env
            .iter()
            .map(|(k, v)| (k.clone(), through_watched(v)))
            .collect();
        let mut release = Release {
            generation,
            command,
            prepare,
            cwd,
            env,
            files: BTreeMap::new(),
            started: crate::control::unix_now(),
            ended: None,
            outcome: None,
            from: None,
        };
        release.files = release.hash_files();
        release
    }

    /// This release again, for `generation`: the same command and files.
    pub fn again(&self, generation: u64) -> Release {
        Release {
            generation,
            started: crate::control::unix_now(),
            ended: None,
            outcome: None,
            from: Some(self.generation),
            ..self.clone()
        }
    }

    /// The files it names, hashed as they are now.
    fn hash_files(&self) -> BTreeMap<PathBuf, String> {
        let mut files = BTreeMap::new();
        let program = self
            .command
            .first()
            .map(|p| executable(p, self.env.get("PATH").map(String::as_str)));
        let named = self
            .command
            .iter()
            .skip(1)
            .chain(self.env.values())
            .filter(|v| v.starts_with('/'))
            .map(PathBuf::from);
        for path in program.into_iter().flatten().chain(named) {
            if path.is_file() {
                if let Some(hash) = sha256(&path) {
                    files.insert(path, hash);
                }
            }
        }
        files
    }

    /// Whether its files are still there as they were: why not, if not.
    pub fn verify(&self) -> Result<(), String> {
        for (path, hash) in &self.files {
            match sha256(path) {
                None => return Err(format!("`{}` is gone", path.display())),
                Some(now) if &now != hash => {
                    return Err(format!(
                        "`{}` has changed since generation {} started",
                        path.display(),
                        self.generation
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.is_dir() {
                return Err(format!("the working directory `{}` is gone", cwd.display()));
            }
        }
        Ok(())
    }

    /// The service's configuration with this release's command, `prepare`, working directory and
    /// environment.
    pub fn apply(&self, service: &crate::config::ServiceConfig) -> crate::config::ServiceConfig {
        crate::config::ServiceConfig {
            command: self.command.clone(),
            prepare: self.prepare.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            ..service.clone()
        }
    }
}

/// `value` with a leading watched path (one of `watched`) replaced by where it leads now.
fn resolve_watched(value: &str, watched: &[PathBuf]) -> String {
    let path = Path::new(value);
    if !path.is_absolute() {
        return value.to_owned();
    }
    for watched in watched {
        if let Ok(rest) = path.strip_prefix(watched) {
            if let Ok(real) = std::fs::canonicalize(watched) {
                let resolved = if rest.as_os_str().is_empty() {
                    real
                } else {
                    real.join(rest)
                };
                return resolved.to_string_lossy().into_owned();
            }
        }
    }
    value.to_owned()
}

/// Where `program` runs from: itself if it has a slash, else the first match on `path` (or baton's PATH).
fn executable(program: &str, path: Option<&str>) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let search = path
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"))?;
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .map(|found| std::fs::canonicalize(&found).unwrap_or(found))
}

/// The SHA-256 of a file's content, in hex; `None` if it cannot be read.
fn sha256(path: &Path) -> Option<String> {
    use sha2::Digest as _;
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    Some(format!("{:x}", hasher.finalize()))
}

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
