//! Where a cache lives: a local directory (a path or a `file://` URL) or
//! an HTTP(S) server, and reading its files from there.
//!
//! HTTP goes through `ureq` with rustls: a connect time-out, a time-out
//! for the response head and one for every read of the body (a stalled
//! transfer fails instead of hanging), and retries with exponential
//! back-off for what may pass (connection failures, time-outs, 5xx, 429).
//! A 404 means "not in the cache"; other statuses fail at once.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::format::{INDEX, entry_of_meta_file, parse_index};
use super::{CacheError, Event, Observer};
use crate::files::ctx;

/// Attempts per HTTP request (the first and three retries).
pub const HTTP_ATTEMPTS: u32 = 4;
/// The wait before the first retry; it doubles for each next one.
pub const HTTP_FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Time-outs: to connect, for the response head, and for every read of a
/// body (so a stalled transfer fails, however large the archive).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a small file (metadata, index, `punix-cache.json`) may hold.
const SMALL_LIMIT: u64 = 64 << 20;

/// A parsed cache location.
pub(crate) enum Location {
    Dir(PathBuf),
    Http { base: String, agent: ureq::Agent },
}

impl Location {
    /// Parse a directory path, `file://` URL or `http(s)://` URL. No I/O.
    pub fn parse(url: &str) -> Result<Location, CacheError> {
        let bad = |reason: &str| CacheError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(bad(
                    "a `file://` URL names an absolute path: `file:///srv/cache`",
                ));
            }
            let decoded = percent_decode(path).ok_or_else(|| bad("bad %-escape"))?;
            return Ok(Location::Dir(PathBuf::from(decoded)));
        }
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let host = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
            if host.is_empty() || host.starts_with('/') {
                return Err(bad("the URL has no host"));
            }
            if url.contains(['?', '#']) {
                return Err(bad("a cache URL has no query or fragment"));
            }
            let config = ureq::Agent::config_builder()
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_recv_response(Some(RESPONSE_TIMEOUT))
                .timeout_per_read(Some(READ_TIMEOUT))
                .timeout_per_call(None)
                .http_status_as_error(false)
                .user_agent(concat!("punix/", env!("CARGO_PKG_VERSION")))
                .build();
            return Ok(Location::Http {
                base: url.trim_end_matches('/').to_string(),
                agent: config.into(),
            });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!(
                "punix reads caches from directories, `file://` and `http(s)://`, not `{scheme}://`"
            )));
        }
        Ok(Location::Dir(crate::config::absolute(Path::new(url))))
    }

    /// The directory of a local cache.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Location::Dir(d) => Some(d),
            Location::Http { .. } => None,
        }
    }

    /// How to name `file` of this cache in messages: a path or a URL.
    pub fn describe(&self, file: &str) -> String {
        match self {
            Location::Dir(d) => d.join(file).display().to_string(),
            Location::Http { base, .. } => format!("{base}/{file}"),
        }
    }

    /// The bytes of a small file, or `None` when the cache has no such file.
    pub fn read_small(
        &self,
        file: &str,
        observer: &dyn Observer,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Location::Dir(d) => {
                let path = d.join(file);
                match fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(ctx("cannot read", &path)(e).into()),
                }
            }
            Location::Http { .. } => {
                let Some(body) = self.get(file, observer)? else {
                    return Ok(None);
                };
                let url = self.describe(file);
                let mut bytes = Vec::new();
                body.into_with_config()
                    .limit(SMALL_LIMIT)
                    .reader()
                    .read_to_end(&mut bytes)
                    .map_err(|e| CacheError::Http {
                        url,
                        reason: e.to_string(),
                        attempts: 1,
                    })?;
                Ok(Some(bytes))
            }
        }
    }

    /// A reader of a (large) file, or `None` when the cache has no such
    /// file. Errors while reading it are I/O errors of the returned reader.
    pub fn open(
        &self,
        file: &str,
        observer: &dyn Observer,
    ) -> Result<Option<Box<dyn Read + Send>>, CacheError> {
        match self {
            Location::Dir(d) => {
                let path = d.join(file);
                match File::open(&path) {
                    Ok(f) => Ok(Some(Box::new(f))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(ctx("cannot open", &path)(e).into()),
                }
            }
            Location::Http { .. } => Ok(self
                .get(file, observer)?
                .map(|b| Box::new(b.into_reader()) as Box<dyn Read + Send>)),
        }
    }

    /// Which of `names` have metadata here, in one query: a `stat` of
    /// each metadata file for a directory, one GET of the index over HTTP.
    pub fn has_many(
        &self,
        names: &BTreeSet<String>,
        observer: &dyn Observer,
    ) -> Result<BTreeSet<String>, CacheError> {
        match self {
            Location::Dir(d) => Ok(names
                .iter()
                .filter(|n| d.join(super::format::meta_file(n)).is_file())
                .cloned()
                .collect()),
            Location::Http { .. } => {
                let all = self.list(observer)?;
                Ok(names.intersection(&all).cloned().collect())
            }
        }
    }

    /// Every entry of the cache: the metadata files of a directory, the
    /// index over HTTP.
    pub fn list(&self, observer: &dyn Observer) -> Result<BTreeSet<String>, CacheError> {
        match self {
            Location::Dir(d) => {
                let mut names = BTreeSet::new();
                for e in fs::read_dir(d).map_err(ctx("cannot list", d))? {
                    let e = e.map_err(ctx("cannot list", d))?;
                    if let Some(n) = e.file_name().to_str().and_then(entry_of_meta_file) {
                        names.insert(n.to_string());
                    }
                }
                Ok(names)
            }
            Location::Http { .. } => match self.read_small(INDEX, observer)? {
                Some(bytes) => Ok(parse_index(&String::from_utf8_lossy(&bytes))
                    .into_iter()
                    .collect()),
                None => Err(CacheError::NotACache {
                    url: self.describe(""),
                    reason: format!("it has no `{INDEX}`"),
                    hint: "serve the directory that `punix store export --to DIR` wrote; export writes the index".into(),
                }),
            },
        }
    }

    /// GET `file` with retries; `None` on 404.
    fn get(&self, file: &str, observer: &dyn Observer) -> Result<Option<ureq::Body>, CacheError> {
        let Location::Http { base, agent } = self else {
            return Ok(None);
        };
        let url = format!("{base}/{file}");
        let mut wait = HTTP_FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let (reason, retry) = match agent.get(&url).call() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200..=299 => return Ok(Some(resp.into_body())),
                        404 | 410 => return Ok(None),
                        429 | 500..=599 => (format!("the server answered HTTP {status}"), true),
                        _ => (format!("the server answered HTTP {status}"), false),
                    }
                }
                Err(e) => {
                    let retry = matches!(
                        e,
                        ureq::Error::Io(_)
                            | ureq::Error::Timeout(_)
                            | ureq::Error::ConnectionFailed
                            | ureq::Error::HostNotFound
                            | ureq::Error::Protocol(_)
                            | ureq::Error::BodyStalled
                    );
                    (e.to_string(), retry)
                }
            };
            if !retry || attempt >= HTTP_ATTEMPTS {
                return Err(CacheError::Http {
                    url,
                    reason,
                    attempts: attempt,
                });
            }
            observer.event(Event::Retrying {
                url: &url,
                attempt,
                wait,
                reason: &reason,
            });
            std::thread::sleep(wait);
            wait *= 2;
            attempt += 1;
        }
    }
}

/// Decode `%XX` escapes; `None` for a bad escape or bytes that are not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_directories_or_http() {
        let dir = |u: &str| match Location::parse(u) {
            Ok(Location::Dir(d)) => d,
            _ => panic!("{u} is not a directory"),
        };
        assert_eq!(dir("file:///srv/my%20cache"), Path::new("/srv/my cache"));
        assert_eq!(dir("file://localhost/srv/c"), Path::new("/srv/c"));
        assert_eq!(dir("/srv/c"), Path::new("/srv/c"));
        assert!(dir("rel/c").is_absolute());
        match Location::parse("http://127.0.0.1:8080/c/") {
            Ok(Location::Http { base, .. }) => assert_eq!(base, "http://127.0.0.1:8080/c"),
            _ => panic!("not http"),
        }
        for bad in ["", "file://rel", "s3://bucket", "http://", "http://h/c?x=1"] {
            assert!(
                matches!(Location::parse(bad), Err(CacheError::BadUrl { .. })),
                "{bad}"
            );
        }
    }
}
