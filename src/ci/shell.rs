//! Quoting for the POSIX shell.

/// Quote `s` as one shell word: always single quotes, each `'` written as
/// `'\''`. Nothing inside is expanded.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_every_word() {
        assert_eq!(sh_quote("Demo"), "'Demo'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("it's $HOME"), r"'it'\''s $HOME'");
    }

    #[test]
    fn the_shell_reads_back_the_same_word() {
        let word = "a b'c\"$d`e\\f*";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s' {}", sh_quote(word)))
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), word);
    }
}
