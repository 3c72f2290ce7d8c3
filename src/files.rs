//! Files on disk: atomic writes, fsync, read-only trees, copying trees,
//! same-length byte rewriting of trees.
//!
//! Atomic means: a unique temporary name in the same directory, write,
//! fsync, rename over the final name, fsync the directory. A reader sees the
//! old content or the new, never a mix, even after a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem;
use rayon::prelude::*;

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

/// Replace every occurrence of `from` by `to`, which must be exactly as
/// long, in the bytes of every regular file and in the target of every
/// symlink under `root` (itself included). Because the length does not
/// change, offsets inside binaries stay valid. Files are patched in place
/// (largest trees in parallel), keeping their mode bits: a file or
/// directory without the owner's read or write permission gets it for the
/// moment of the change and loses it again. Other file types are left
/// alone. A missing `root` is fine. Returns how many files and links were
/// changed.
pub fn rewrite_tree(root: &Path, from: &[u8], to: &[u8]) -> Result<usize, FileError> {
    if from.len() != to.len() {
        return Err(FileError {
            action: "cannot rewrite paths in",
            path: root.to_path_buf(),
            source: io::Error::other("the replacement is not as long as the text it replaces"),
        });
    }
    if from.is_empty() || from == to {
        return Ok(0);
    }
    let mut files = Vec::new();
    let mut links = Vec::new();
    let mut seen = std::collections::HashSet::new();
    match collect_rewritable(root, &mut files, &mut links, &mut seen) {
        Err(e) if e.source.kind() == io::ErrorKind::NotFound && e.path == root => return Ok(0),
        other => other?,
    }
    let finder = memmem::Finder::new(from);
    let changed_files = files
        .par_iter()
        .with_max_len(1)
        .map(|(path, mode)| rewrite_file(path, *mode, &finder, to))
        .collect::<Result<Vec<bool>, FileError>>()?
        .into_iter()
        .filter(|c| *c)
        .count();
    let mut changed_links = 0;
    for link in &links {
        if rewrite_link(link, &finder, to)? {
            changed_links += 1;
        }
    }
    Ok(changed_files + changed_links)
}

/// The regular files (with their modes) and symlinks under `path`; a
/// file with several hard links once (`seen` holds device and inode).
fn collect_rewritable(
    path: &Path,
    files: &mut Vec<(PathBuf, u32)>,
    links: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<(u64, u64)>,
) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path).map_err(ctx("cannot stat", path))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        links.push(path.to_path_buf());
    } else if ft.is_file() {
        if meta.nlink() < 2 || seen.insert((meta.dev(), meta.ino())) {
            files.push((path.to_path_buf(), meta.permissions().mode() & 0o7777));
        }
    } else if ft.is_dir() {
        for entry in fs::read_dir(path).map_err(ctx("cannot list", path))? {
            let entry = entry.map_err(ctx("cannot list", path))?;
            collect_rewritable(&entry.path(), files, links, seen)?;
        }
    }
    Ok(())
}

/// Give `path` the owner permission bits `need` for as long as the guard
/// lives; the original mode comes back when it is dropped.
struct ModeGuard<'a> {
    path: &'a Path,
    mode: u32,
    changed: bool,
}

impl<'a> ModeGuard<'a> {
    fn grant(path: &'a Path, mode: u32, need: u32) -> Result<ModeGuard<'a>, FileError> {
        let changed = mode & need != need;
        if changed {
            fs::set_permissions(path, fs::Permissions::from_mode(mode | need))
                .map_err(ctx("cannot make writable", path))?;
        }
        Ok(ModeGuard {
            path,
            mode,
            changed,
        })
    }

    /// Put the original mode back (writing to a file may also have cleared
    /// its set-id bits).
    fn restore(mut self) -> Result<(), FileError> {
        let needed = self.changed || self.mode & 0o6000 != 0;
        self.changed = false;
        if !needed {
            return Ok(());
        }
        fs::set_permissions(self.path, fs::Permissions::from_mode(self.mode))
            .map_err(ctx("cannot set the mode of", self.path))
    }
}

impl Drop for ModeGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            let _ = fs::set_permissions(self.path, fs::Permissions::from_mode(self.mode));
        }
    }
}

/// Bytes scanned at once when looking for the text to replace.
const SCAN_CHUNK: usize = 1 << 20;

/// The offsets of every (non-overlapping) match of `finder` in `reader`,
/// read in chunks that overlap by less than one match.
fn find_offsets(reader: &mut impl Read, finder: &memmem::Finder<'_>) -> io::Result<Vec<u64>> {
    let n = finder.needle().len();
    let mut buf = vec![0u8; SCAN_CHUNK + n];
    let mut offsets = Vec::new();
    let mut carried = 0;
    let mut base: u64 = 0;
    loop {
        let mut len = carried;
        while len < buf.len() {
            match reader.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(k) => len += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut last_end = 0;
        for m in finder.find_iter(&buf[..len]) {
            offsets.push(base + m as u64);
            last_end = m + n;
        }
        if len < buf.len() {
            return Ok(offsets);
        }
        // Keep the tail that may begin a match cut by the chunk's end.
        let keep_from = (len - (n - 1)).max(last_end);
        buf.copy_within(keep_from..len, 0);
        base += keep_from as u64;
        carried = len - keep_from;
    }
}

fn rewrite_file(
    path: &Path,
    mode: u32,
    finder: &memmem::Finder<'_>,
    to: &[u8],
) -> Result<bool, FileError> {
    let readable = ModeGuard::grant(path, mode, 0o400)?;
    let offsets = File::open(path)
        .and_then(|mut f| find_offsets(&mut f, finder))
        .map_err(ctx("cannot read", path))?;
    if offsets.is_empty() {
        readable.restore()?;
        return Ok(false);
    }
    drop(readable);
    let writable = ModeGuard::grant(path, mode, 0o600)?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(ctx("cannot open for writing", path))?;
    for off in offsets {
        f.write_all_at(to, off)
            .map_err(ctx("cannot rewrite paths in", path))?;
    }
    drop(f);
    writable.restore()?;
    Ok(true)
}

/// Replace the link at `link` by one whose target has `to` for every
/// match, through a temporary sibling and a rename.
fn rewrite_link(link: &Path, finder: &memmem::Finder<'_>, to: &[u8]) -> Result<bool, FileError> {
    let target = fs::read_link(link)
        .map_err(ctx("cannot read link", link))?
        .into_os_string()
        .into_vec();
    let mut new_target = target.clone();
    let n = finder.needle().len();
    let mut changed = false;
    for m in finder.find_iter(&target) {
        new_target[m..m + n].copy_from_slice(to);
        changed = true;
    }
    if !changed {
        return Ok(false);
    }
    let dir = link.parent().unwrap_or(Path::new("."));
    let dir_mode = fs::symlink_metadata(dir)
        .map_err(ctx("cannot stat", dir))?
        .permissions()
        .mode()
        & 0o7777;
    let guard = ModeGuard::grant(dir, dir_mode, 0o300)?;
    let file_name = link.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let mut tmp_name = b".".to_vec();
    tmp_name.extend_from_slice(file_name);
    tmp_name.extend_from_slice(format!(".tmp-{}", unique_suffix()).as_bytes());
    let tmp = dir.join(std::ffi::OsStr::from_bytes(&tmp_name));
    symlink(std::ffi::OsStr::from_bytes(&new_target), &tmp)
        .map_err(ctx("cannot create link", &tmp))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(ctx("cannot replace link", link)(e));
    }
    guard.restore()?;
    Ok(true)
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
    fn scanning_finds_matches_across_chunk_ends() {
        let needle = b"/store/.tmpghijklmn-x";
        let finder = memmem::Finder::new(needle);
        for at in [
            0,
            5,
            SCAN_CHUNK - 3,
            SCAN_CHUNK,
            SCAN_CHUNK + 7,
            2 * SCAN_CHUNK + 1,
        ] {
            let mut data = vec![b'a'; 3 * SCAN_CHUNK];
            data[at..at + needle.len()].copy_from_slice(needle);
            let end = data.len() - needle.len();
            data[end..].copy_from_slice(needle);
            let found = find_offsets(&mut &data[..], &finder).expect("scan");
            assert_eq!(found, vec![at as u64, end as u64], "match at {at}");
        }
        let twice = [needle.as_slice(), needle.as_slice()].concat();
        assert_eq!(
            find_offsets(&mut &twice[..], &finder).expect("scan"),
            vec![0, needle.len() as u64]
        );
    }

    #[test]
    fn rewrite_keeps_modes_and_patches_files_and_links() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("r");
        let (from, to) = (b"/s/.tmpAAAA-x".as_slice(), b"/s/0123abcd-x".as_slice());
        fs::create_dir_all(root.join("bin")).expect("mkdir");
        let bin = root.join("bin/tool");
        let mut bytes = vec![0u8, 1, 2];
        bytes.extend_from_slice(from);
        bytes.extend_from_slice(b"/lib\0");
        bytes.extend_from_slice(from);
        fs::write(&bin, &bytes).expect("write");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o4555)).expect("chmod");
        fs::write(root.join("plain"), b"nothing here").expect("write");
        fs::hard_link(&bin, root.join("hardlink")).expect("ln");
        symlink("/s/.tmpAAAA-x/bin/tool", root.join("bin/self")).expect("ln");
        symlink("tool", root.join("bin/rel")).expect("ln");
        fs::set_permissions(root.join("bin"), fs::Permissions::from_mode(0o555)).expect("chmod");

        // The file (once, though it has two names) and one link.
        assert_eq!(rewrite_tree(&root, from, to).expect("rewrite"), 2);
        assert_eq!(
            fs::read(root.join("hardlink")).expect("read"),
            fs::read(&bin).expect("read")
        );
        let patched = fs::read(&bin).expect("read");
        assert_eq!(patched.len(), bytes.len());
        assert!(memmem::find(&patched, from).is_none());
        assert_eq!(memmem::find_iter(&patched, to).count(), 2);
        let mode = |p: &Path| fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&bin), 0o4555);
        assert_eq!(mode(&root.join("bin")), 0o555);
        assert_eq!(
            fs::read_link(root.join("bin/self")).expect("readlink"),
            PathBuf::from("/s/0123abcd-x/bin/tool")
        );
        assert_eq!(
            fs::read_link(root.join("bin/rel")).expect("readlink"),
            PathBuf::from("tool")
        );
        assert_eq!(
            fs::read_dir(root.join("bin")).expect("ls").count(),
            3,
            "no temporaries"
        );
        assert_eq!(
            rewrite_tree(&root.join("missing"), from, to).expect("missing"),
            0
        );
        assert!(rewrite_tree(&root, from, b"short").is_err());
        remove_tree(&root).expect("rm");
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
