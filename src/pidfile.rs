//! The pid file (`baton run --pid-file PATH`, `$BATON_PID_FILE`): baton's process id and a newline, for
//! process managers and scripts that find a daemon that way.
//!
//! Start-up refuses a file that names another live baton; a file that names a process that is gone, or one
//! that is not a baton (its number reused), is stale and replaced. The file is written whole or not at all
//! (a temporary file beside it, renamed over it) once the public sockets are bound, is left alone by a
//! re-exec (the process id does not change) and is removed when baton exits, if it still names baton.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Why the pid file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// Another baton runs.
    #[error("{path} names baton process {pid}, which is running: stop it first, or use another pid file")]
    Running {
        /// The file.
        path: PathBuf,
        /// The live process.
        pid: u32,
    },
    /// The file cannot be read or written.
    #[error("pid file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// The pid file this process wrote (or carried across a re-exec).
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Refuses `path` if it names a live baton other than this process.
    pub fn check(path: &Path) -> Result<(), PidFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(PidFileError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        match text.trim().parse::<u32>() {
            Ok(pid) if pid != std::process::id() && is_baton(pid) => Err(PidFileError::Running {
                path: path.to_owned(),
                pid,
            }),
            _ => Ok(()),
        }
    }

    /// Writes this process's id to `path`, replacing what was there in one step.
    pub fn write(path: &Path) -> Result<PidFile, PidFileError> {
        let failed = |source| PidFileError::Io {
            path: path.to_owned(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| failed(io::Error::new(io::ErrorKind::InvalidInput, "not a file name")))?;
        let mut temporary = path.to_owned();
        temporary.set_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
        let written = std::fs::File::create(&temporary)
            .and_then(|mut file| {
                writeln!(file, "{}", std::process::id())?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(failed(e));
        }
        Ok(PidFile { path: path.to_owned() })
    }

    /// The file an earlier image of this process wrote: a re-exec leaves it as it is.
    pub fn carried(path: &Path) -> PidFile {
        PidFile { path: path.to_owned() }
    }

    /// Removes the file, if it still names this process.
    pub fn remove(self) {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(%error, path = %self.path.display(), "cannot remove the pid file");
            }
        }
    }
}

/// Whether process `pid` is alive and runs a baton (its command's name says so).
fn is_baton(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end().starts_with("baton"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_is_written_whole_refused_while_its_baton_lives_and_replaced_when_stale() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("baton.pid");
        PidFile::check(&path).expect("no file yet");
        let file = PidFile::write(&path).expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{}\n", std::process::id())
        );
        // This process itself (a re-exec) is not refused.
        PidFile::check(&path).expect("our own");
        // A number no process has is stale; so is a live process that is no baton (pid 1 here is not).
        std::fs::write(&path, "4194304\n").expect("write");
        PidFile::check(&path).expect("stale");
        std::fs::write(&path, "garbage").expect("write");
        PidFile::check(&path).expect("unreadable is stale");
        // Removing leaves a file that names another process alone.
        std::fs::write(&path, "1\n").expect("write");
        file.remove();
        assert!(path.exists());
        let file = PidFile::write(&path).expect("write");
        file.remove();
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "no temporary file left"
        );
    }
}
