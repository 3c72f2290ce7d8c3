//! Files on disk: atomic writes, fsync, read-only trees, copying trees.
//!
//! Atomic means: a unique temporary name in the same directory, write,
//! fsync, rename over the final name, fsync the directory. A reader sees the
//! old content or the new, never a mix, even after a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// An I/O error together with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{action} `{path}`: {source}")]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// Attach an action and a path to an `io::Error`.
pub fn ctx<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A name no other process or thread will pick: pid, time and a counter.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{:x}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// fsync a directory, so that a rename in it survives a crash.
pub fn fsync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ctx("cannot sync directory", dir))
}

/// Write `bytes` to `path` atomically with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", unique_suffix()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(ctx("cannot create", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(ctx("cannot set the mode of", &tmp))?;
        f.write_all(bytes).map_err(ctx("cannot write", &tmp))?;
        f.sync_all().map_err(ctx("cannot sync", &tmp))?;
        fs::rename(&tmp, path).map_err(ctx("cannot rename into place", path))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write a small file and fsync it (not atomic: for files inside a
/// temporary directory that is itself renamed into place).
pub fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(ctx("cannot create", path))?;
    f.write_all(bytes).map_err(ctx("cannot write", path))?;
    f.sync_all().map_err(ctx("cannot sync", path))
}

/// Take write permission away from every file and directory under `root`,
/// leaving `root` itself writable (renaming a directory needs that).
pub fn make_read_only(root: &Path) -> Result<(), FileError> {
    fn visit(path: &Path, top: bool) -> Result<(), FileError> {
        let meta = fs::symlink_metadata(path).map_err(ctx("cannot stat", path))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        if meta.is_dir() {
            for entry in fs::read_dir(path).map_err(ctx("cannot list", path))? {
                let entry = entry.map_err(ctx("cannot list", path))?;
                visit(&entry.path(), false)?;
            }
            if top {
                return Ok(());
            }
        }
        let mode = meta.permissions().mode() & 0o7777;
        let ro = if meta.is_dir() { 0o555 } else { mode & !0o222 };
        if ro != mode {
            fs::set_permissions(path, fs::Permissions::from_mode(ro))
                .map_err(ctx("cannot make read-only", path))?;
        }
        Ok(())
    }
    visit(root, true)
}

/// Remove a tree that may have been made read-only. A missing tree is fine.
pub fn remove_tree(root: &Path) -> Result<(), FileError> {
    fn unlock(path: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() && !meta.file_type().is_symlink() {
            if meta.permissions().mode() & 0o700 != 0o700 {
                fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
            }
            for entry in fs::read_dir(path)? {
                unlock(&entry?.path())?;
            }
        }
        Ok(())
    }
    match unlock(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx("cannot make writable", root)(e)),
        Ok(()) => {}
    }
    match fs::remove_dir_all(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(ctx("cannot remove", root)),
    }
}

/// Copy the tree at `from` to `to` (which must not exist): directories,
/// regular files with their permission bits, symlinks as symlinks.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), FileError> {
    let meta = fs::symlink_metadata(from).map_err(ctx("cannot stat", from))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from).map_err(ctx("cannot read link", from))?;
        symlink(target, to).map_err(ctx("cannot create link", to))?;
    } else if ft.is_dir() {
        fs::create_dir(to).map_err(ctx("cannot create directory", to))?;
        for entry in fs::read_dir(from).map_err(ctx("cannot list", from))? {
            let entry = entry.map_err(ctx("cannot list", from))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        let mode = (meta.permissions().mode() & 0o777) | 0o700;
        fs::set_permissions(to, fs::Permissions::from_mode(mode))
            .map_err(ctx("cannot set the mode of", to))?;
    } else if ft.is_file() {
        fs::copy(from, to).map_err(ctx("cannot copy to", to))?;
        let mode = (meta.permissions().mode() & 0o777) | 0o200;
        fs::set_permissions(to, fs::Permissions::from_mode(mode))
            .map_err(ctx("cannot set the mode of", to))?;
    } else {
        return Err(FileError {
            action: "cannot copy special file",
            path: from.to_path_buf(),
            source: io::Error::other("not a file, directory or symlink"),
        });
    }
    Ok(())
}

/// The last `lines` lines of a text file (lossy), for error reports.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_with_mode() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("f");
        write_atomic(&p, b"one", 0o600).expect("write");
        write_atomic(&p, b"two", 0o640).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let mode = fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            fs::read_dir(t.path()).expect("ls").count(),
            1,
            "no temporaries left"
        );
    }

    #[test]
    fn read_only_tree_can_be_removed() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("r");
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::write(root.join("a/b/f"), b"x").expect("write");
        make_read_only(&root).expect("ro");
        let mode = fs::metadata(root.join("a"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0);
        remove_tree(&root).expect("rm");
        assert!(!root.exists());
        remove_tree(&root).expect("rm of a missing tree");
    }
}
