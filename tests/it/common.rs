//! A small harness: run the real `punix` binary in a private temp
//! directory (its own HOME, store root and recipes).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Test {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub out: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }

    #[track_caller]
    pub fn success(self) -> Run {
        assert!(
            self.out.status.success(),
            "punix failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.out.status,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn failure(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Test {
    pub fn new() -> Test {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        fs::create_dir_all(dir.path().join("pkgs")).unwrap();
        Test { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn store(&self) -> PathBuf {
        self.path().join("store")
    }

    pub fn pkgs(&self) -> PathBuf {
        self.path().join("pkgs")
    }

    /// Write a file under the recipes directory.
    pub fn file(&self, rel: &str, text: &str) -> &Test {
        let p = self.pkgs().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        self
    }

    pub fn cmd(&self) -> Command {
        self.cmd_of(Path::new(env!("CARGO_BIN_EXE_punix")))
    }

    /// [`cmd`](Self::cmd) run as `nobody` when the tests run as root, so
    /// that file permissions bite as they do for a user. `nobody` runs a
    /// copy of punix in this test's directory: the build's own directory
    /// may be one only root can enter (a checkout under `mktemp -d`).
    pub fn cmd_unprivileged(&self) -> Command {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return self.cmd();
        }
        fs::set_permissions(self.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin = self.path().join("punix-as-nobody");
        fs::copy(env!("CARGO_BIN_EXE_punix"), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = self.cmd_of(&bin);
        c.uid(65534).gid(65534);
        c
    }

    fn cmd_of(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.path().join("home"))
            .env("PUNIX_STORE_DIR", self.store())
            .current_dir(self.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_cmd(self.cmd().args(args))
    }

    /// Run a prepared command and capture its output.
    pub fn run_cmd(&self, cmd: &mut Command) -> Run {
        let out = cmd.output().unwrap();
        Run {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            out,
        }
    }

    /// `punix build --file pkgs ARGS...`
    pub fn build(&self, args: &[&str]) -> Run {
        let pkgs = self.pkgs();
        let mut all = vec!["build", "--file", pkgs.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// The store path of one package.
    pub fn path_of(&self, module: &str) -> PathBuf {
        let pkgs = self.pkgs();
        let r = self
            .run(&["store", "path", "--file", pkgs.to_str().unwrap(), module])
            .success();
        PathBuf::from(r.stdout.trim())
    }

    /// Names of every directory directly in the store (valid or not).
    pub fn store_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.store())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The repository's own directory.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
