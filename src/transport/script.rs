//! Building blocks of remote scripts: quoting, and file writes that carry
//! their content inside the script (base64, so any bytes travel safely and
//! nothing but the script's own stdin carries them).

use std::path::Path;

use base64::Engine;

/// Quote `s` for POSIX `sh`: one single-quoted word, whatever it holds
/// (spaces, quotes, `$`, `;`, newlines). A NUL cannot be passed to a
/// program at all; callers reject such values before building a script.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Words for a `for n in WORDS; do` list: each name as one word, bare when
/// it holds nothing the shell would touch, else [`quote`]d. A list in the
/// script text itself is parsed at once; a `while read` over a heredoc
/// reads it one byte per system call (dash), which costs tens of
/// milliseconds per thousand names.
pub fn words<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for n in names {
        if !out.is_empty() {
            out.push(' ');
        }
        if !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-=:,@%".contains(&b))
        {
            out.push_str(n);
        } else {
            out.push_str(&quote(n));
        }
    }
    out
}

/// [`quote`] for a path.
pub fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

/// The heredoc delimiter for base64 payloads: `_` is not in the base64
/// alphabet, so no payload line can end the heredoc early.
const B64_EOF: &str = "PUNIX_B64_EOF";

/// A fragment that writes `bytes` to `tmp` with `mode` set before any
/// content is written (so a secret is never readable by others, not even
/// for an instant). It does not sync or rename.
pub fn write_staged(tmp: &Path, bytes: &[u8], mode: u32) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut s = String::new();
    let t = quote_path(tmp);
    s.push_str(&format!("rm -f {t}\n"));
    s.push_str(&format!("(umask 077 && : > {t})\n"));
    s.push_str(&format!("chmod {mode:o} {t}\n"));
    s.push_str(&format!("base64 -d > {t} <<'{B64_EOF}'\n"));
    for chunk in b64.as_bytes().chunks(76) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(B64_EOF);
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sh(script: &str) -> String {
        use std::io::Write;
        let mut child = Command::new("sh")
            .arg("-s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn quoting_survives_the_shell() {
        for s in [
            "plain",
            "with space",
            "it's",
            "$(touch /tmp/punix-pwned)",
            "a;b|c&d",
            "new\nline",
            "back\\slash",
            "`tick`",
            "",
            "'",
            "\"dq\"",
        ] {
            assert_eq!(sh(&format!("printf %s {}", quote(s))), s, "{s:?}");
        }
    }

    #[test]
    fn staged_writes_carry_any_bytes_with_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("it's a file");
        let bytes: Vec<u8> = (0..=255u8)
            .chain(b"\nPUNIX_B64_EOF\n".iter().copied())
            .collect();
        sh(&write_staged(&f, &bytes, 0o600));
        assert_eq!(std::fs::read(&f).expect("read"), bytes);
        let mode = std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
