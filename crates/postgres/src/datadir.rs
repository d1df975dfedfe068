//! The data directory as a set of files: is it empty, initialized, what version; wiping it;
//! saving and restoring configuration copies (`docs/patroni-compat.md` §5.2); atomic file writes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{PgError, Postgres};

/// What the data directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDirState {
    /// Missing, or holds nothing but hidden files and `lost+found` (Patroni's rule).
    Empty,
    /// `PG_VERSION` is present.
    Initialized,
    /// Something else: files without `PG_VERSION`, not a directory, unreadable.
    Invalid(String),
}

/// Files copied to `<data_dir>/<file>.backup` after a successful start and restored after a clone
/// or rewind when missing (§5.2).
const SAVED_CONFIG_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.base.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

impl Postgres {
    pub fn data_dir_state(&self) -> DataDirState {
        data_dir_state(&self.settings.data_dir)
    }

    /// Major version from `PG_VERSION` (`15`), if the data directory is initialized.
    pub fn data_dir_major_version(&self) -> Option<u32> {
        fs::read_to_string(self.settings.data_dir.join("PG_VERSION"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Empties the data directory (keeping the directory itself, mode 0700), creating it when
    /// missing. Symbolic links are removed, not followed.
    pub fn remove_data_dir(&self) -> Result<(), PgError> {
        if let Some(pid) = self.postmaster_pid() {
            return Err(PgError::StillRunning {
                op: "removing the data directory",
                pid,
            });
        }
        empty_dir(&self.settings.data_dir)
    }

    /// Copies the configuration files to `<data_dir>/<file>.backup` (Patroni does this after a
    /// successful start, so that a clone whose source keeps them elsewhere can be repaired).
    pub fn backup_config_files(&self) -> Result<(), PgError> {
        for name in SAVED_CONFIG_FILES {
            let from = self.settings.config_dir.join(name);
            if from.is_file() {
                let data = fs::read(&from).map_err(|e| PgError::io("read", &from, e))?;
                let to = self.settings.data_dir.join(format!("{name}.backup"));
                write_atomic(&to, &data)?;
            }
        }
        Ok(())
    }

    /// Restores missing configuration files from their `.backup` copies (after `pg_basebackup`
    /// or `pg_rewind`); a missing `pg_ident.conf` without backup is created empty.
    pub fn restore_config_files(&self) -> Result<(), PgError> {
        for name in SAVED_CONFIG_FILES {
            let target = self.settings.config_dir.join(name);
            if target.is_file() {
                continue;
            }
            let backup = self.settings.data_dir.join(format!("{name}.backup"));
            if backup.is_file() {
                let data = fs::read(&backup).map_err(|e| PgError::io("read", &backup, e))?;
                write_atomic(&target, &data)?;
            } else if name == "pg_ident.conf" {
                write_atomic(&target, b"")?;
            }
        }
        Ok(())
    }
}

pub(crate) fn data_dir_state(dir: &Path) -> DataDirState {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DataDirState::Empty,
        Err(e) => return DataDirState::Invalid(format!("cannot stat {}: {e}", dir.display())),
    };
    if !meta.is_dir() {
        return DataDirState::Invalid(format!("{} is not a directory", dir.display()));
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return DataDirState::Invalid(format!("cannot list {}: {e}", dir.display())),
    };
    let mut visible = 0usize;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "lost+found" {
            continue;
        }
        visible += 1;
    }
    if visible == 0 {
        DataDirState::Empty
    } else if dir.join("PG_VERSION").is_file() {
        DataDirState::Initialized
    } else {
        DataDirState::Invalid(format!("{} is not empty but has no PG_VERSION", dir.display()))
    }
}

/// Removes everything inside `dir` (creating it when missing) and sets its mode to 0700.
pub(crate) fn empty_dir(dir: &Path) -> Result<(), PgError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| PgError::io("create", dir, e))?;
        }
        Err(e) => return Err(PgError::io("stat", dir, e)),
        Ok(_) => {
            let entries = fs::read_dir(dir).map_err(|e| PgError::io("list", dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| PgError::io("list", dir, e))?;
                let path = entry.path();
                let kind = entry.file_type().map_err(|e| PgError::io("stat", &path, e))?;
                let result = if kind.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match result {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(PgError::io("remove", &path, e)),
                }
            }
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| PgError::io("chmod", dir, e))
}

/// Writes `data` to `path` through a temporary file in the same directory (mode 0600, fsynced)
/// and a rename, so readers see the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), PgError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| PgError::Invalid(format!("{} is not a file path", path.display())))?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp: PathBuf = dir.join(format!(
        ".{}.pgvigil-tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An older temporary file may have had wider permissions.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PgError::io("write", path, e)
    })
}

/// Removes a file; a missing file is fine.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), PgError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PgError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_wiping() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        assert_eq!(data_dir_state(&dir), DataDirState::Empty);
        fs::create_dir(&dir).unwrap();
        fs::create_dir(dir.join("lost+found")).unwrap();
        fs::write(dir.join(".hidden"), "x").unwrap();
        assert_eq!(data_dir_state(&dir), DataDirState::Empty);
        fs::write(dir.join("base"), "x").unwrap();
        assert!(matches!(data_dir_state(&dir), DataDirState::Invalid(_)));
        fs::write(dir.join("PG_VERSION"), "15\n").unwrap();
        assert_eq!(data_dir_state(&dir), DataDirState::Initialized);
        fs::create_dir_all(dir.join("pg_wal/archive_status")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), dir.join("link")).unwrap();
        empty_dir(&dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert!(tmp.path().exists(), "symlink target untouched");
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = tmp.path().join("plain");
        fs::write(&file, "x").unwrap();
        assert!(matches!(data_dir_state(&file), DataDirState::Invalid(_)));
    }

    #[test]
    fn atomic_write_is_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f.conf");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
