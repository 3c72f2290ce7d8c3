//! Entry archives: a deterministic tar of a store entry, compressed with
//! zstd, written and read as streams.
//!
//! **Packing** walks the entry in the content hash's order (pre-order,
//! children sorted by the bytes of their names) and writes one tar member
//! per directory, regular file and symlink below the entry's top, in GNU
//! format (long names and link targets as GNU extensions), with every
//! header field that is not content fixed: mode `0755` for directories and
//! executable files, `0644` for other files, `0777` for links, owner 0:0,
//! no user or group names, mtime 0. The store's `derivation.json` is a
//! member like any other file; the `built` marker is not (the importer
//! writes its own, after it checked everything). While the bytes stream
//! through, the tree's content hash is computed again (the same
//! serialisation as [`crate::store::content_hash`]) and so is the sha256 of
//! the compressed bytes. zstd runs at level 3 with a frame checksum, in
//! worker threads (one per core, at most [`MAX_WORKERS`], jobs of 1 MiB),
//! so reading and hashing overlap with compression and memory stays at
//! about 10 MiB plus 8 MiB per worker. The same entry always gives the
//! same tar (and, with the same zstd and worker count, the same bytes).
//!
//! **Unpacking** runs in two threads joined by a small bounded queue: one
//! reads the raw bytes (sha256 and a size cap on the way) and decompresses
//! them; the other parses the tar and writes the files. Memory stays at a
//! few MiB whatever the size of the entry: chunks of 256 KiB, at most
//! [`QUEUE`] of them in flight, a decoder window of at most
//! 2^[`WINDOW_LOG_MAX`] bytes. Every member is checked before anything is
//! written for it: relative paths without `..`, nothing below a symlink
//! or a file, no name twice, only directories, regular files, symlinks and
//! hard links to earlier files of the same archive; a symlink must point
//! inside the entry or into one of the entry's references; no `built` at
//! the top; never more bytes than the metadata declares.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use sha2::{Digest, Sha256};

use super::{Event, Observer};
use crate::store::content_hash::STORE_METADATA;

/// The compression level: zstd's default, as `zstd` on the command line.
pub const LEVEL: i32 = 3;
/// The largest decoder window an importer accepts (32 MiB; level 3 uses
/// 2 MiB or less), so a hostile archive cannot make it allocate more.
pub const WINDOW_LOG_MAX: u32 = 25;
/// Bytes per chunk between the two unpacking threads, and per read while
/// packing.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the unpacking threads.
pub const QUEUE: usize = 8;
/// The most a `derivation.json` member may hold.
const DERIVATION_LIMIT: u64 = 1 << 20;

/// What packing an entry produced.
#[derive(Clone, Debug)]
pub struct Packed {
    pub archive_size: u64,
    pub archive_sha256: String,
    /// The content hash of the tree, computed from the bytes that went
    /// into the archive.
    pub content_hash: String,
    /// The bytes of the regular files in the archive.
    pub unpacked_size: u64,
}

/// Compression workers: zstd's own threads, beside the one that reads
/// and hashes; one per core, at most [`MAX_WORKERS`].
pub fn workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(MAX_WORKERS as usize) as u32)
        .unwrap_or(1)
}

/// At most this many compression workers: each costs about 8 MiB (its
/// jobs' input and output buffers and its context at level 3).
pub const MAX_WORKERS: u32 = 4;

/// The input of one compression job. zstd's default at level 3 is 8 MiB,
/// which with its buffering made 2 workers hold about 100 MiB; 1 MiB
/// jobs keep a worker at about 8 MiB and compress as well (the jobs
/// overlap by a part of the window).
const JOB_SIZE: u32 = 1 << 20;

/// A writer that counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Packer<'a, W: Write> {
    tar: tar::Builder<zstd::stream::write::Encoder<'static, Hashing<W>>>,
    content: Sha256,
    buf: Vec<u8>,
    unpacked: u64,
    progress: &'a mut dyn FnMut(u64),
}

/// Write the store entry at `entry` as a compressed tar to `out`; returns
/// `out` and what was written. `progress` hears the file bytes read.
pub fn pack<W: Write>(
    entry: &Path,
    out: W,
    progress: &mut dyn FnMut(u64),
) -> io::Result<(W, Packed)> {
    let mut enc = zstd::stream::write::Encoder::new(
        Hashing {
            inner: out,
            sha: Sha256::new(),
            count: 0,
        },
        LEVEL,
    )?;
    enc.include_checksum(true)?;
    enc.multithread(workers())?;
    enc.set_parameter(zstd::zstd_safe::CParameter::JobSize(JOB_SIZE))?;
    let mut tar = tar::Builder::new(enc);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut p = Packer {
        tar,
        content: Sha256::new(),
        buf: vec![0u8; CHUNK],
        unpacked: 0,
        progress,
    };
    p.content.update(b"punix-content-v1\0");
    p.add(entry, b".", true, true)?;
    let enc = p.tar.into_inner()?;
    let hashing = enc.finish()?;
    let packed = Packed {
        archive_size: hashing.count,
        archive_sha256: hex::encode(hashing.sha.finalize()),
        content_hash: format!("sha256:{}", hex::encode(p.content.finalize())),
        unpacked_size: p.unpacked,
    };
    Ok((hashing.inner, packed))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

impl<W: Write> Packer<'_, W> {
    /// Add the node at `abs` (relative path `rel`, `.` for the top);
    /// `hashed` is false for the store's own files at the top.
    fn add(&mut self, abs: &Path, rel: &[u8], top: bool, hashed: bool) -> io::Result<()> {
        let meta = fs::symlink_metadata(abs)?;
        let ft = meta.file_type();
        let rel_path = Path::new(std::ffi::OsStr::from_bytes(rel));
        if ft.is_symlink() {
            let target = fs::read_link(abs)?;
            let t = target.as_os_str().as_bytes();
            self.record(&[b"l", t, rel]);
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            self.tar.append_link(&mut h, rel_path, &target)?;
        } else if ft.is_file() {
            let exec = meta.permissions().mode() & 0o111 != 0;
            let size = meta.len();
            let mut h = header(
                tar::EntryType::Regular,
                if exec { 0o755 } else { 0o644 },
                size,
            );
            // The header through tar (long names), the bytes by hand in
            // large chunks: tar's own copy goes 8 KiB at a time.
            self.tar.append_data(&mut h, rel_path, io::empty())?;
            let digest = self.copy_file(abs, size)?;
            self.unpacked += size;
            if hashed {
                let size_text = size.to_string();
                let hex_digest = hex::encode(digest);
                self.record(&[
                    b"f",
                    if exec { b"x" } else { b"-" },
                    size_text.as_bytes(),
                    hex_digest.as_bytes(),
                    rel,
                ]);
            }
        } else if ft.is_dir() {
            self.record(&[b"d", rel]);
            if !top {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                self.tar.append_data(&mut h, rel_path, io::empty())?;
            }
            let mut children: Vec<std::ffi::OsString> = fs::read_dir(abs)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in children {
                let n = name.as_bytes();
                if top && n == b"built" {
                    continue;
                }
                let child_rel = if top {
                    n.to_vec()
                } else {
                    [rel, b"/", n].concat()
                };
                let child_hashed = !(top && STORE_METADATA.iter().any(|m| m.as_bytes() == n));
                self.add(&abs.join(&name), &child_rel, false, child_hashed)?;
            }
        } else {
            return Err(io::Error::other(format!(
                "`{}` is not a file, directory or symlink",
                abs.display()
            )));
        }
        Ok(())
    }

    /// One record of the content hash: the fields, each NUL-terminated.
    fn record(&mut self, fields: &[&[u8]]) {
        for f in fields {
            self.content.update(f);
            self.content.update(b"\0");
        }
    }

    /// Stream `size` bytes of the file at `abs` into the archive, pad the
    /// member, and return the file's sha256.
    fn copy_file(&mut self, abs: &Path, size: u64) -> io::Result<[u8; 32]> {
        let mut f = File::open(abs)?;
        let mut sha = Sha256::new();
        let mut left = size;
        let out = self.tar.get_mut();
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = match f.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("`{}` shrank while it was archived", abs.display()),
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            sha.update(&self.buf[..n]);
            out.write_all(&self.buf[..n])?;
            left -= n as u64;
            (self.progress)(n as u64);
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&[0u8; 512][..pad as usize])?;
        Ok(sha.finalize().into())
    }
}

/// Why unpacking failed.
#[derive(Debug)]
pub enum UnpackError {
    /// Reading the archive's bytes failed (network, disk): worth a retry.
    Transfer(String),
    /// The archive is not a valid compressed tar, or is truncated.
    Corrupt(String),
    /// A member is unsafe or not allowed.
    Unsafe { member: String, reason: String },
    /// The archive is larger, or unpacks to more, than the metadata says.
    TooLarge(String),
    /// Writing the unpacked tree failed.
    Local(crate::files::FileError),
}

/// What the unpacked archive told us.
#[derive(Debug)]
pub struct Unpacked {
    pub archive_size: u64,
    pub archive_sha256: String,
    /// The bytes of the `derivation.json` member, if there was one.
    pub derivation: Option<Vec<u8>>,
}

/// Limits and context for one unpacking.
pub struct Limits<'a> {
    /// The entry's final path in the store: symlinks may point inside it.
    pub entry_path: &'a Path,
    /// The final paths of the entry's references: symlinks may point
    /// inside them too.
    pub references: &'a [PathBuf],
    /// The archive's size and its unpacked size, from the metadata.
    pub archive_size: u64,
    pub unpacked_size: u64,
}

/// What the reading thread found.
struct Produced {
    size: u64,
    sha256: String,
    /// The source itself failed (not the decoding).
    source_failed: bool,
    /// Larger than the metadata says.
    too_large: bool,
    error: Option<String>,
}

/// Counts and hashes the raw bytes, and refuses more than the cap.
struct RawReader<'a> {
    inner: Box<dyn Read + Send>,
    sha: Sha256,
    count: u64,
    cap: u64,
    source_failed: bool,
    observer: &'a dyn Observer,
}

impl Read for RawReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.source_failed = true;
                }
                return Err(e);
            }
        };
        self.sha.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.cap {
            return Err(io::Error::other(TooLarge(format!(
                "the archive is larger than the {} bytes its metadata declares",
                self.cap
            ))));
        }
        if n > 0 {
            self.observer.event(Event::Progress { bytes: n as u64 });
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct TooLarge(String);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooLarge {}

/// Read `src`, decompress, and send the chunks; at the end, read the rest
/// of the raw bytes so the hash covers all of them.
fn produce(
    src: Box<dyn Read + Send>,
    cap: u64,
    tx: SyncSender<io::Result<Vec<u8>>>,
    spare: Receiver<Vec<u8>>,
    observer: &dyn Observer,
) -> Produced {
    let raw = RawReader {
        inner: src,
        sha: Sha256::new(),
        count: 0,
        cap,
        source_failed: false,
        observer,
    };
    let (raw, error) = decode(raw, &tx, &spare);
    if let Some(e) = &error {
        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
    }
    let too_large = error
        .as_ref()
        .and_then(|e| e.get_ref())
        .is_some_and(|i| i.is::<TooLarge>());
    let error = error.map(|e| e.to_string());
    match raw {
        Some(raw) => Produced {
            size: raw.count,
            sha256: hex::encode(raw.sha.finalize()),
            source_failed: raw.source_failed,
            too_large,
            error,
        },
        None => Produced {
            size: 0,
            sha256: String::new(),
            source_failed: false,
            too_large,
            error,
        },
    }
}

/// Decompress `raw` into chunks for `tx`; the raw reader back (for its
/// count and hash, `None` if the decoder never started) and the error, if
/// any.
fn decode<'a>(
    raw: RawReader<'a>,
    tx: &SyncSender<io::Result<Vec<u8>>>,
    spare: &Receiver<Vec<u8>>,
) -> (Option<RawReader<'a>>, Option<io::Error>) {
    let mut dec = match zstd::stream::read::Decoder::new(raw) {
        Ok(d) => d,
        Err(e) => return (None, Some(e)),
    };
    if let Err(e) = dec.window_log_max(WINDOW_LOG_MAX) {
        return (None, Some(e));
    }
    loop {
        let mut buf = spare.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        while filled < buf.len() {
            match dec.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Some(dec.finish().into_inner()), Some(e)),
            }
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        if tx.send(Ok(buf)).is_err() {
            // The other side stopped; it reports why.
            return (Some(dec.finish().into_inner()), None);
        }
    }
    // The frames ended: hash whatever follows (zstd reads to the end of
    // the input, so normally nothing).
    let mut rest = dec.finish();
    match io::copy(&mut rest, &mut io::sink()) {
        Ok(0) => (Some(rest.into_inner()), None),
        Ok(n) => (
            Some(rest.into_inner()),
            Some(io::Error::other(format!(
                "{n} bytes of garbage after the compressed data"
            ))),
        ),
        Err(e) => (Some(rest.into_inner()), Some(e)),
    }
}

/// The unpacking side of the queue.
struct ChunkReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    spare: Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    failed: Option<(io::ErrorKind, String)>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, msg)) = &self.failed {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(next)) => {
                    let old = std::mem::replace(&mut self.cur, next);
                    let _ = self.spare.send(old);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Unpack the archive read from `src` into the new directory `temp` (which
/// must not exist). On error, `temp` may hold part of the tree; the caller
/// removes it.
pub fn unpack(
    src: Box<dyn Read + Send>,
    temp: &Path,
    limits: &Limits<'_>,
    observer: &dyn Observer,
) -> Result<Unpacked, UnpackError> {
    let local = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| {
            UnpackError::Local(crate::files::FileError {
                action,
                path: p,
                source,
            })
        }
    };
    fs::create_dir(temp).map_err(local("cannot create", temp))?;
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (spare_tx, spare_rx) = mpsc::channel();
        let cap = limits.archive_size;
        let producer = s.spawn(move || produce(src, cap, tx, spare_rx, observer));
        let reader = ChunkReader {
            rx,
            spare: spare_tx,
            cur: Vec::new(),
            pos: 0,
            failed: None,
        };
        let mut state = Extract {
            temp,
            limits,
            kinds: HashMap::new(),
            unpacked: 0,
            derivation: None,
            buf: vec![0u8; CHUNK],
        };
        let mut archive = tar::Archive::new(reader);
        let result = match state.members(&mut archive) {
            // Drain the end of the tar (zero blocks) and see the stream end.
            Ok(()) => io::copy(&mut archive.into_inner(), &mut io::sink())
                .map(drop)
                .map_err(|e| UnpackError::Corrupt(e.to_string())),
            Err(e) => {
                // Hang up first, so that the reading thread stops.
                drop(archive);
                Err(e)
            }
        };
        let produced = producer.join().unwrap_or_else(|_| Produced {
            size: 0,
            sha256: String::new(),
            source_failed: false,
            too_large: false,
            error: Some("the reading thread panicked".into()),
        });
        match (result, produced.error) {
            (Err(UnpackError::Corrupt(_)), Some(e)) | (Ok(()), Some(e)) => {
                Err(if produced.source_failed {
                    UnpackError::Transfer(e)
                } else if produced.too_large {
                    UnpackError::TooLarge(e)
                } else {
                    UnpackError::Corrupt(e)
                })
            }
            (Err(e), _) => Err(e),
            (Ok(()), None) => Ok(Unpacked {
                archive_size: produced.size,
                archive_sha256: produced.sha256,
                derivation: state.derivation,
            }),
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Link,
}

struct Extract<'a> {
    temp: &'a Path,
    limits: &'a Limits<'a>,
    kinds: HashMap<PathBuf, Kind>,
    unpacked: u64,
    derivation: Option<Vec<u8>>,
    buf: Vec<u8>,
}

/// The most a long name, long link or PAX record may hold (Linux paths
/// are at most 4096 bytes).
const EXTENSION_LIMIT: u64 = 64 * 1024;

/// The data of an extension member (long name, long link, PAX records).
fn read_extension<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<u8>, UnpackError> {
    let size = entry.size();
    if size > EXTENSION_LIMIT {
        return Err(UnpackError::Unsafe {
            member: format!("(a tar extension of {size} bytes)"),
            reason: format!("long names and PAX records may hold at most {EXTENSION_LIMIT} bytes"),
        });
    }
    let mut v = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut v)
        .map_err(|e| UnpackError::Corrupt(e.to_string()))?;
    Ok(v)
}

/// The checked relative path of a member: `None` for the top itself.
fn member_path(raw: &[u8]) -> Result<Option<PathBuf>, String> {
    if raw.is_empty() {
        return Err("it has an empty name".into());
    }
    if raw[0] == b'/' {
        return Err("it has an absolute path".into());
    }
    let mut out = PathBuf::new();
    for c in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("its path goes up with `..`".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("it has an absolute path".into());
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// `path` with `.` and `..` resolved without looking at the disk.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    out
}

impl Extract<'_> {
    fn members<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), UnpackError> {
        let corrupt = |e: io::Error| UnpackError::Corrupt(e.to_string());
        // Raw entries: long names and PAX records are read here, with a
        // size cap, instead of by tar into memory of any size.
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        for entry in archive.entries().map_err(corrupt)?.raw(true) {
            let mut entry = entry.map_err(corrupt)?;
            let kind = entry.header().entry_type();
            match kind {
                tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                    let mut v = read_extension(&mut entry)?;
                    if v.last() == Some(&0) {
                        v.pop();
                    }
                    if kind == tar::EntryType::GNULongName {
                        long_name = Some(v);
                    } else {
                        long_link = Some(v);
                    }
                    continue;
                }
                tar::EntryType::XHeader => {
                    let v = read_extension(&mut entry)?;
                    for ext in tar::PaxExtensions::new(&v) {
                        let ext = ext.map_err(corrupt)?;
                        match ext.key_bytes() {
                            b"path" => long_name = Some(ext.value_bytes().to_vec()),
                            b"linkpath" => long_link = Some(ext.value_bytes().to_vec()),
                            _ => {}
                        }
                    }
                    continue;
                }
                tar::EntryType::XGlobalHeader => {
                    read_extension(&mut entry)?;
                    continue;
                }
                _ => {}
            }
            let raw_path = long_name
                .take()
                .unwrap_or_else(|| entry.header().path_bytes().into_owned());
            let link_name = long_link
                .take()
                .or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            let unsafe_member = |reason: String| UnpackError::Unsafe {
                member: shown.clone(),
                reason,
            };
            let rel = member_path(&raw_path).map_err(unsafe_member)?;
            let Some(rel) = rel else {
                if kind.is_dir() {
                    continue; // `./`, the top itself
                }
                return Err(unsafe_member("it names the entry's top".into()));
            };
            self.check_parents(&rel).map_err(unsafe_member)?;
            if self.kinds.contains_key(&rel) {
                return Err(unsafe_member("it appears twice in the archive".into()));
            }
            let at_top = rel.components().count() == 1;
            if at_top && rel.as_os_str() == "built" {
                return Err(unsafe_member(
                    "`built` is the store's own marker; an archive never holds it".into(),
                ));
            }
            let dest = self.temp.join(&rel);
            let local = |action: &'static str| {
                let p = dest.clone();
                move |source| {
                    UnpackError::Local(crate::files::FileError {
                        action,
                        path: p,
                        source,
                    })
                }
            };
            match kind {
                tar::EntryType::Directory => {
                    fs::create_dir(&dest).map_err(local("cannot create"))?;
                    self.kinds.insert(rel, Kind::Dir);
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.size();
                    self.unpacked += size;
                    if self.unpacked > self.limits.unpacked_size {
                        return Err(UnpackError::TooLarge(format!(
                            "the archive unpacks to more than the {} bytes its metadata declares",
                            self.limits.unpacked_size
                        )));
                    }
                    if at_top && rel.as_os_str() == "derivation.json" {
                        if size > DERIVATION_LIMIT {
                            return Err(unsafe_member("it is too large for a derivation".into()));
                        }
                        let mut bytes = Vec::with_capacity(size as usize);
                        entry.read_to_end(&mut bytes).map_err(corrupt)?;
                        self.derivation = Some(bytes);
                        self.kinds.insert(rel, Kind::File);
                        continue;
                    }
                    let exec = entry.header().mode().map_err(corrupt)? & 0o111 != 0;
                    // Read-only from the start (the descriptor can still
                    // write): the store's install then has nothing to chmod.
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(if exec { 0o555 } else { 0o444 })
                        .open(&dest)
                        .map_err(local("cannot create"))?;
                    let mut copied = 0u64;
                    loop {
                        let n = match entry.read(&mut self.buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(corrupt(e)),
                        };
                        f.write_all(&self.buf[..n]).map_err(local("cannot write"))?;
                        copied += n as u64;
                    }
                    if copied != size {
                        return Err(UnpackError::Corrupt(format!(
                            "`{shown}` ends after {copied} of its {size} bytes"
                        )));
                    }
                    // Umask must not take the execute bits away.
                    if exec
                        && f.metadata()
                            .is_ok_and(|m| m.permissions().mode() & 0o111 == 0)
                    {
                        fs::set_permissions(&dest, fs::Permissions::from_mode(0o555))
                            .map_err(local("cannot set the mode of"))?;
                    }
                    self.kinds.insert(rel, Kind::File);
                }
                tar::EntryType::Symlink => {
                    let target = link_name.unwrap_or_default();
                    if target.is_empty() {
                        return Err(unsafe_member("it is a symlink without a target".into()));
                    }
                    self.check_link_target(&rel, &target)
                        .map_err(unsafe_member)?;
                    std::os::unix::fs::symlink(std::ffi::OsString::from_vec(target), &dest)
                        .map_err(local("cannot create the link"))?;
                    self.kinds.insert(rel, Kind::Link);
                }
                tar::EntryType::Link => {
                    let target = link_name.unwrap_or_default();
                    let shown_target = String::from_utf8_lossy(&target).into_owned();
                    let t = match member_path(&target) {
                        Ok(Some(t)) => t,
                        _ => {
                            return Err(unsafe_member(format!(
                                "it is a hard link to `{shown_target}`, outside the entry"
                            )));
                        }
                    };
                    if self.kinds.get(&t) != Some(&Kind::File)
                        || (t.components().count() == 1 && t.as_os_str() == "derivation.json")
                    {
                        return Err(unsafe_member(format!(
                            "it is a hard link to `{shown_target}`, which is not a file unpacked before it"
                        )));
                    }
                    fs::hard_link(self.temp.join(&t), &dest).map_err(local("cannot link"))?;
                    self.kinds.insert(rel, Kind::File);
                }
                other => {
                    return Err(unsafe_member(format!(
                        "it is a {}; a store entry holds only files, directories and symlinks",
                        kind_name(other)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every parent of `rel` must be a directory of this archive (made now
    /// when the archive did not list it), never a symlink or a file.
    fn check_parents(&mut self, rel: &Path) -> Result<(), String> {
        let mut parents: Vec<&Path> = rel.ancestors().skip(1).collect();
        parents.reverse();
        for p in parents {
            if p.as_os_str().is_empty() {
                continue;
            }
            match self.kinds.get(p) {
                Some(Kind::Dir) => {}
                Some(Kind::Link) => {
                    return Err(format!("it lies below the symlink `{}`", p.display()));
                }
                Some(Kind::File) => {
                    return Err(format!("it lies below the file `{}`", p.display()));
                }
                None => {
                    fs::create_dir(self.temp.join(p)).map_err(|e| {
                        format!("cannot create its directory `{}`: {e}", p.display())
                    })?;
                    self.kinds.insert(p.to_path_buf(), Kind::Dir);
                }
            }
        }
        Ok(())
    }

    /// A symlink must point inside the entry or into one of its
    /// references, judged by its final place in the store.
    fn check_link_target(&self, rel: &Path, target: &[u8]) -> Result<(), String> {
        let t = Path::new(std::ffi::OsStr::from_bytes(target));
        let resolved = if t.is_absolute() {
            normalize(t)
        } else {
            let parent = rel.parent().unwrap_or(Path::new(""));
            normalize(&self.limits.entry_path.join(parent).join(t))
        };
        if resolved.starts_with(self.limits.entry_path)
            || self
                .limits
                .references
                .iter()
                .any(|r| resolved.starts_with(r))
        {
            Ok(())
        } else {
            Err(format!(
                "it is a symlink to `{}`, which escapes the entry (it resolves to `{}`, outside the entry and its references)",
                String::from_utf8_lossy(target),
                resolved.display()
            ))
        }
    }
}

fn kind_name(t: tar::EntryType) -> String {
    match t {
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Fifo => "fifo".into(),
        tar::EntryType::GNUSparse => "sparse file".into(),
        other => format!("tar member of type `{}`", other.as_byte() as char),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::content_hash::hash_entry;

    struct Quiet;
    impl Observer for Quiet {}

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path();
        fs::create_dir_all(p.join("bin")).expect("mkdir");
        fs::create_dir_all(p.join("share/deep/er")).expect("mkdir");
        fs::write(p.join("bin/app"), b"#!/bin/sh\necho hi\n").expect("write");
        fs::set_permissions(p.join("bin/app"), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(p.join("big"), vec![7u8; 3 * CHUNK + 5]).expect("write");
        fs::write(p.join("empty"), b"").expect("write");
        fs::write(p.join("derivation.json"), b"{}\n").expect("write");
        fs::write(p.join("built"), b"{}\n").expect("write");
        let long = "x".repeat(150);
        fs::write(p.join("share/deep/er").join(&long), b"long").expect("write");
        std::os::unix::fs::symlink("bin/app", p.join("link")).expect("ln");
        std::os::unix::fs::symlink(format!("deep/er/{long}"), p.join("share/l")).expect("ln");
        t
    }

    fn pack_to_vec(dir: &Path) -> (Vec<u8>, Packed) {
        pack(dir, Vec::new(), &mut |_| {}).expect("pack")
    }

    fn limits<'a>(entry: &'a Path, refs: &'a [PathBuf], p: &Packed) -> Limits<'a> {
        Limits {
            entry_path: entry,
            references: refs,
            archive_size: p.archive_size,
            unpacked_size: p.unpacked_size,
        }
    }

    #[test]
    fn pack_is_deterministic_and_hashes_like_the_store() {
        let (a, b) = (tree(), tree());
        let (bytes_a, pa) = pack_to_vec(a.path());
        let (bytes_b, pb) = pack_to_vec(b.path());
        assert_eq!(bytes_a, bytes_b);
        assert_eq!(pa.archive_sha256, pb.archive_sha256);
        assert_eq!(pa.archive_size, bytes_a.len() as u64);
        assert_eq!(pa.content_hash, hash_entry(a.path()).expect("hash"));
    }

    #[test]
    fn unpack_round_trips_and_leaves_out_built() {
        let src = tree();
        let (bytes, packed) = pack_to_vec(src.path());
        let out = tempfile::tempdir().expect("tempdir");
        let temp = out.path().join("t");
        let entry = Path::new("/store/0123456789abcdef0123456789abcdef-x-1");
        let got = unpack(
            Box::new(io::Cursor::new(bytes)),
            &temp,
            &limits(entry, &[], &packed),
            &Quiet,
        )
        .expect("unpack");
        assert_eq!(got.archive_sha256, packed.archive_sha256);
        assert_eq!(got.derivation.as_deref(), Some(&b"{}\n"[..]));
        assert!(!temp.join("built").exists() && !temp.join("derivation.json").exists());
        assert_eq!(
            hash_entry(&temp).expect("hash"),
            hash_entry(src.path()).expect("hash")
        );
    }

    #[test]
    fn truncated_and_corrupted_archives_fail() {
        let src = tree();
        let (bytes, packed) = pack_to_vec(src.path());
        let out = tempfile::tempdir().expect("tempdir");
        let entry = Path::new("/store/0123456789abcdef0123456789abcdef-x-1");
        let mut cut = bytes.clone();
        cut.truncate(bytes.len() / 2);
        let r = unpack(
            Box::new(io::Cursor::new(cut)),
            &out.path().join("a"),
            &limits(entry, &[], &packed),
            &Quiet,
        );
        assert!(matches!(r, Err(UnpackError::Corrupt(_))), "{r:?}");
        let mut flipped = bytes.clone();
        let i = flipped.len() / 3;
        flipped[i] ^= 0x55;
        match unpack(
            Box::new(io::Cursor::new(flipped)),
            &out.path().join("b"),
            &limits(entry, &[], &packed),
            &Quiet,
        ) {
            Err(UnpackError::Corrupt(_)) => {}
            // A flip that still decodes must change the archive's hash.
            Ok(u) => assert_ne!(u.archive_sha256, packed.archive_sha256),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn pax_paths_are_read() {
        let mut b = tar::Builder::new(Vec::new());
        let record = b"28 path=deep/name-from-pax.\n";
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(record.len() as u64);
        h.set_cksum();
        b.append(&h, &record[..]).expect("append");
        let mut h = tar::Header::new_ustar();
        h.set_path("ignored").expect("path");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(2);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).expect("append");
        let tar = b.into_inner().expect("tar");
        let z = zstd::stream::encode_all(tar.as_slice(), 3).expect("zstd");
        let out = tempfile::tempdir().expect("tempdir");
        let temp = out.path().join("t");
        let limits = Limits {
            entry_path: Path::new("/store/0123456789abcdef0123456789abcdef-x-1"),
            references: &[],
            archive_size: z.len() as u64,
            unpacked_size: 2,
        };
        unpack(Box::new(io::Cursor::new(z)), &temp, &limits, &Quiet).expect("unpack");
        assert_eq!(
            fs::read(temp.join("deep/name-from-pax.")).expect("read"),
            b"hi"
        );
        assert!(!temp.join("ignored").exists());
    }

    #[test]
    fn oversized_long_names_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(1 << 20);
        h.set_cksum();
        b.append(&h, io::repeat(b'a').take(1 << 20))
            .expect("append");
        let tar = b.into_inner().expect("tar");
        let z = zstd::stream::encode_all(tar.as_slice(), 3).expect("zstd");
        let out = tempfile::tempdir().expect("tempdir");
        let entry = Path::new("/store/0123456789abcdef0123456789abcdef-x-1");
        let limits = Limits {
            entry_path: entry,
            references: &[],
            archive_size: z.len() as u64,
            unpacked_size: 1 << 30,
        };
        let r = unpack(
            Box::new(io::Cursor::new(z)),
            &out.path().join("t"),
            &limits,
            &Quiet,
        );
        assert!(matches!(r, Err(UnpackError::Unsafe { .. })), "{r:?}");
    }

    #[test]
    fn member_paths_and_links_are_confined() {
        assert_eq!(
            member_path(b"./a/b").expect("ok"),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(member_path(b"./").expect("ok"), None);
        for bad in [&b"/etc/passwd"[..], b"a/../../x", b"..", b""] {
            assert!(
                member_path(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let entry = PathBuf::from("/s/0123456789abcdef0123456789abcdef-x-1");
        let refs = [PathBuf::from("/s/1123456789abcdef0123456789abcdef-y-1")];
        let limits = Limits {
            entry_path: &entry,
            references: &refs,
            archive_size: 0,
            unpacked_size: 0,
        };
        let x = Extract {
            temp: Path::new("/nonexistent"),
            limits: &limits,
            kinds: HashMap::new(),
            unpacked: 0,
            derivation: None,
            buf: Vec::new(),
        };
        let ok = |rel: &str, t: &str| x.check_link_target(Path::new(rel), t.as_bytes()).is_ok();
        assert!(ok("bin/a", "../lib/x"));
        assert!(ok("a", "."));
        assert!(ok("a", "/s/0123456789abcdef0123456789abcdef-x-1/bin"));
        assert!(ok("a", "/s/1123456789abcdef0123456789abcdef-y-1/lib/l.so"));
        assert!(ok("a", "../1123456789abcdef0123456789abcdef-y-1/lib"));
        assert!(!ok("a", "../.."));
        assert!(!ok("bin/a", "../../../etc/passwd"));
        assert!(!ok("a", "/etc/passwd"));
        assert!(!ok(
            "a",
            "/s/1123456789abcdef0123456789abcdef-y-1/../../etc"
        ));
        assert!(!ok("a", "/s/0123456789abcdef0123456789abcdef-x-10"));
    }
}
