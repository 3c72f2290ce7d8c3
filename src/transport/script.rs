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

/// Lines that mark the store entries `names` (relative to the current
/// directory, a store root) in use: their `built` markers touched, in
/// batches that fit a command line. A missing entry is skipped, a failure
/// ignored: whoever needs the entries checks they are there afterwards.
/// `store gc --target` keeps entries marked within the last hour (see
/// `deploy::remote::IN_USE_MINUTES`).
pub fn mark_in_use(names: &[String]) -> String {
    let mut s = String::new();
    for chunk in names.chunks(1000) {
        let markers: Vec<String> = chunk.iter().map(|n| format!("{n}/built")).collect();
        s.push_str("touch -c -- ");
        s.push_str(&words(markers.iter().map(String::as_str)));
        s.push_str(" 2>/dev/null || :\n");
    }
    s
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
/// for an instant): the file is created with `mode` (through the umask)
/// when `mode` has no execute or special bits, else created 0600 and
/// widened to `mode` once complete. It does not sync or rename. Text
/// travels as one quoted word written by the shell's own `printf`; other
/// bytes as base64 (`base64 -d`). A file or symlink already at `tmp` is
/// removed first, never written through.
pub fn write_staged(tmp: &Path, bytes: &[u8], mode: u32) -> String {
    let mut s = String::new();
    let t = quote_path(tmp);
    let (umask, widen) = if mode & !0o666 == 0 {
        (0o777 & !mode, false)
    } else {
        (0o077, mode != 0o600)
    };
    s.push_str(&format!(
        "if [ -e {t} ] || [ -L {t} ]; then rm -f {t}; fi
"
    ));
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => {
            s.push_str(&format!(
                "(umask {umask:03o} && printf '%s' {} > {t})\n",
                quote(text)
            ));
        }
        _ => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            s.push_str(&format!(
                "(umask {umask:03o} && base64 -d > {t}) <<'{B64_EOF}'\n"
            ));
            for chunk in b64.as_bytes().chunks(76) {
                s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
                s.push('\n');
            }
            s.push_str(B64_EOF);
            s.push('\n');
        }
    }
    if widen {
        s.push_str(&format!("chmod {mode:o} {t}\n"));
    }
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
    fn words_come_back_one_each() {
        let names = [
            "0a1b-plain-1.0",
            "with space",
            "it's",
            "$(touch /tmp/punix-pwned)",
            "new\nline",
            "*",
            "-n",
            "",
        ];
        let out = sh(&format!(
            "for n in {}; do printf '[%s]' \"$n\"; done",
            words(names.iter().copied())
        ));
        let want: String = names.iter().map(|n| format!("[{n}]")).collect();
        assert_eq!(out, want);
        assert_eq!(words(["a.b+c", "x=y"]), "a.b+c x=y");
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
        // Text (the shell's printf), over an existing file and through no
        // planted symlink, with a wider mode set once it is complete.
        let text = "it's \"text\" with $HOME, `x`, \\n, %s and a newline\n\n";
        let victim = t.path().join("victim");
        std::fs::write(&victim, "keep").expect("write");
        let g = t.path().join("g");
        std::os::unix::fs::symlink(&victim, &g).expect("symlink");
        sh(&write_staged(&g, text.as_bytes(), 0o644));
        assert_eq!(std::fs::read_to_string(&g).expect("read"), text);
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "keep");
        let mode = std::fs::metadata(&g).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        sh(&write_staged(&g, b"", 0o700));
        assert_eq!(std::fs::read(&g).expect("read"), b"");
        let mode = std::fs::metadata(&g).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
