//! Systems: `<arch>-<os>` strings as Nix spells them (`x86_64-linux`,
//! `aarch64-linux`, `armv7l-linux`, ...).
//!
//! Architecture names go through a small table of our own first (for what
//! `uname -m` prints and target-lexicon cannot parse: `arm64`, `armv7l`,
//! `ppc64le`, `i686`), then through target-lexicon, whose canonical name we
//! keep. A `System` is therefore always in canonical form, and two spellings
//! of one machine compare equal.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An error in a system string or in `uname` output.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SystemError {
    #[error(
        "`{0}` is not a system: write `<arch>-<os>`, for example `x86_64-linux` or `aarch64-linux`"
    )]
    Shape(String),
    #[error(
        "unknown architecture `{0}` (known: x86_64, aarch64, armv7l, i686, riscv64, powerpc64le, ...)"
    )]
    Arch(String),
    #[error("unknown operating system `{0}` (known: linux, darwin)")]
    Os(String),
}

/// A canonical system string such as `x86_64-linux`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct System {
    arch: String,
    os: String,
}

/// Names `uname -m` prints (or people write) that target-lexicon does not
/// know, or knows under another name, mapped to the Nix spelling.
const ARCH_ALIASES: &[(&str, &str)] = &[
    ("arm64", "aarch64"),
    ("aarch64", "aarch64"),
    ("amd64", "x86_64"),
    ("x86_64", "x86_64"),
    ("x64", "x86_64"),
    ("armv7l", "armv7l"),
    ("armv7", "armv7l"),
    ("armv6l", "armv6l"),
    ("ppc64le", "powerpc64le"),
    ("ppc64", "powerpc64"),
    ("i386", "i686"),
    ("i486", "i686"),
    ("i586", "i686"),
    ("i686", "i686"),
    ("riscv64", "riscv64"),
];

const OSES: &[(&str, &str)] = &[("linux", "linux"), ("darwin", "darwin")];

fn canonical_arch(raw: &str) -> Result<String, SystemError> {
    let lower = raw.trim().to_ascii_lowercase();
    if let Some((_, canon)) = ARCH_ALIASES.iter().find(|(alias, _)| *alias == lower) {
        return Ok((*canon).to_string());
    }
    match target_lexicon::Architecture::from_str(&lower) {
        Ok(target_lexicon::Architecture::Unknown) | Err(()) => Err(SystemError::Arch(raw.into())),
        Ok(arch) => Ok(arch.to_string()),
    }
}

fn canonical_os(raw: &str) -> Result<String, SystemError> {
    let lower = raw.trim().to_ascii_lowercase();
    OSES.iter()
        .find(|(alias, _)| *alias == lower)
        .map(|(_, canon)| (*canon).to_string())
        .ok_or_else(|| SystemError::Os(raw.into()))
}

impl System {
    /// The system from `uname -m` and `uname -s` output (`arm64`, `Linux`).
    pub fn from_uname(machine: &str, kernel: &str) -> Result<Self, SystemError> {
        Ok(System {
            arch: canonical_arch(machine)?,
            os: canonical_os(kernel)?,
        })
    }

    /// The system this binary runs on.
    pub fn host() -> Self {
        let arch = canonical_arch(std::env::consts::ARCH)
            .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
        let os =
            canonical_os(std::env::consts::OS).unwrap_or_else(|_| std::env::consts::OS.to_string());
        System { arch, os }
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn os(&self) -> &str {
        &self.os
    }
}

impl FromStr for System {
    type Err = SystemError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (arch, os) = s
            .split_once('-')
            .filter(|(a, o)| !a.is_empty() && !o.is_empty() && !o.contains('-'))
            .ok_or_else(|| SystemError::Shape(s.to_string()))?;
        Ok(System {
            arch: canonical_arch(arch)?,
            os: canonical_os(os)?,
        })
    }
}

impl TryFrom<String> for System {
    type Error = SystemError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<System> for String {
    fn from(s: System) -> String {
        s.to_string()
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.arch, self.os)
    }
}

/// The architecture (as in a [`System`]) an ELF file is built for, from
/// its header's `e_machine`; `None` for a file that is not ELF or names a
/// machine we do not know.
pub fn elf_arch(header: &[u8]) -> Option<&'static str> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        return None;
    }
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        _ => return None,
    };
    let class64 = header[4] == 2;
    Some(match (machine, class64) {
        (62, _) => "x86_64",
        (3, _) => "i686",
        (183, _) => "aarch64",
        (40, _) => "armv7l",
        (243, true) => "riscv64",
        (21, true) if header[5] == 1 => "powerpc64le",
        (21, true) => "powerpc64",
        _ => return None,
    })
}

/// Is the file at `path` an ELF binary for another architecture than
/// `system`'s? Returns the file's architecture when it is.
pub fn elf_mismatch(path: &std::path::Path, system: &System) -> Option<&'static str> {
    use std::io::Read;
    let mut header = [0u8; 20];
    let mut f = std::fs::File::open(path).ok()?;
    f.read_exact(&mut header).ok()?;
    let arch = elf_arch(&header)?;
    (arch != system.arch()).then_some(arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nix_systems() {
        for s in [
            "x86_64-linux",
            "aarch64-linux",
            "armv7l-linux",
            "riscv64-linux",
            "x86_64-darwin",
            "aarch64-darwin",
            "i686-linux",
            "powerpc64le-linux",
        ] {
            let sys: System = s.parse().expect(s);
            assert_eq!(sys.to_string(), s);
        }
    }

    #[test]
    fn uname_names_are_normalised() {
        assert_eq!(
            System::from_uname("arm64", "Linux").map(|s| s.to_string()),
            Ok("aarch64-linux".to_string())
        );
        assert_eq!(
            System::from_uname("aarch64\n", "Linux\n").map(|s| s.to_string()),
            Ok("aarch64-linux".to_string())
        );
        assert_eq!(
            System::from_uname("ppc64le", "Linux").map(|s| s.to_string()),
            Ok("powerpc64le-linux".to_string())
        );
        assert_eq!(
            System::from_uname("x86_64", "Darwin").map(|s| s.to_string()),
            Ok("x86_64-darwin".to_string())
        );
        assert_eq!("arm64-linux".parse::<System>(), "aarch64-linux".parse());
    }

    #[test]
    fn rejects_bad_systems() {
        assert!(matches!(
            "x86_64".parse::<System>(),
            Err(SystemError::Shape(_))
        ));
        assert!(matches!(
            "z80-linux".parse::<System>(),
            Err(SystemError::Arch(_))
        ));
        assert!(matches!(
            "x86_64-windows".parse::<System>(),
            Err(SystemError::Os(_))
        ));
        assert!(matches!(
            "x86_64-linux-gnu".parse::<System>(),
            Err(SystemError::Shape(_))
        ));
    }

    #[test]
    fn elf_headers_name_their_machine() {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 183;
        assert_eq!(elf_arch(&h), Some("aarch64"));
        h[18] = 62;
        assert_eq!(elf_arch(&h), Some("x86_64"));
        assert_eq!(elf_arch(b"#!/bin/sh\necho hello\n"), None);
        // This test binary itself is for the host.
        let exe = std::env::current_exe().expect("exe");
        assert_eq!(elf_mismatch(&exe, &System::host()), None);
        let other: System = if System::host().arch() == "aarch64" {
            "x86_64-linux".parse().expect("system")
        } else {
            "aarch64-linux".parse().expect("system")
        };
        assert_eq!(
            elf_mismatch(&exe, &other),
            Some(System::host().arch()).map(|a| match a {
                "x86_64" => "x86_64",
                "aarch64" => "aarch64",
                _ => "other",
            })
        );
    }

    #[test]
    fn host_is_canonical() {
        let host = System::host();
        assert_eq!(host.to_string().parse::<System>(), Ok(host));
    }
}
