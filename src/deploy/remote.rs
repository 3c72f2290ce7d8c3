//! The scripts a deploy runs on its target, each in one round trip.
//!
//! - [`probe`]: system, home, uid, rsync and systemctl presence.
//! - [`state`]: finish an interrupted commit (roll forward its journal),
//!   then report generations, the current one, missing store paths, the
//!   hash and mode of every file the deploy wants, unsafe parent symlinks
//!   and unwritable roots. Read-only apart from the roll-forward.
//! - [`commit`]: stage every file (temporary siblings, mode before
//!   content), write a journal, then run the journal detached from the
//!   session (`setsid`) and wait for it. The journal renames pushed store
//!   entries and staged files into place, writes the generation, flips
//!   `current` with one rename and trims old generations. It is idempotent
//!   and deletes itself last, so a journal that a crash interrupted is run
//!   again by the next `state`: the target ends on the old generation (no
//!   journal yet) or the new one (journal written), never on a mix that
//!   stays.
//! - [`activate`]: `systemctl daemon-reload`, stop/restart/start, detached,
//!   then `systemctl is-active` of every unit after a settle time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::transport::quote;
use crate::transport::script::{quote_path, words, write_staged};

fn q(p: &Path) -> String {
    quote_path(p)
}

/// The probe script.
pub fn probe() -> String {
    r#"set -- $(uname -sm)
printf 'kernel=%s\nmachine=%s\n' "$1" "$2"
printf 'home=%s\n' "$HOME"
u=
while read -r k v _; do if [ "$k" = Uid: ]; then u=$v; break; fi; done 2>/dev/null </proc/self/status
[ -n "$u" ] || u=$(id -u)
printf 'uid=%s\n' "$u"
printf 'user=%s\n' "${USER:-${LOGNAME:-$(id -un 2>/dev/null)}}"
if [ -d /run/systemd/system ]; then echo 'has=systemd-running'; fi
for t in rsync systemctl setsid base64 sha256sum; do
  if command -v "$t" >/dev/null 2>&1; then printf 'has=%s\n' "$t"; fi
done
"#
    .to_string()
}

/// What [`probe`] found.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub machine: String,
    pub kernel: String,
    pub home: String,
    pub uid: u32,
    /// The login user's name on the target.
    pub user: String,
    pub tools: Vec<String>,
}

impl Probe {
    pub fn parse(out: &str) -> Probe {
        let mut p = Probe::default();
        for line in out.lines() {
            match line.split_once('=') {
                Some(("machine", v)) => p.machine = v.to_string(),
                Some(("kernel", v)) => p.kernel = v.to_string(),
                Some(("home", v)) => p.home = v.to_string(),
                Some(("uid", v)) => p.uid = v.trim().parse().unwrap_or(u32::MAX),
                Some(("user", v)) => p.user = v.trim().to_string(),
                Some(("has", v)) => p.tools.push(v.to_string()),
                _ => {}
            }
        }
        p
    }

    pub fn has(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }
}

/// Paths of one stack on the target, already rebased for the transport.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The store root as the transport sees it.
    pub store: PathBuf,
    /// `<deployments-root>/<stack>` as the transport sees it.
    pub stack_dir: PathBuf,
    /// The deployments root as the transport sees it.
    pub deployments_root: PathBuf,
}

/// One file the state query looks at.
pub struct Watched {
    /// As the transport sees it.
    pub path: PathBuf,
    /// Parent directories to check for symlinks (as the transport sees
    /// them), outermost first.
    pub parents: Vec<PathBuf>,
}

/// The state query. With `roll_forward` (the caller holds the stack's
/// lock and may change the target) an interrupted commit is completed and
/// `dirs_to_create` are created; without it nothing changes, and each of
/// `dirs_to_create` is only checked: it, or the nearest existing ancestor
/// it would be created in, must be a writable directory.
pub fn state(
    layout: &Layout,
    names: &[String],
    files: &[Watched],
    dirs_to_create: &[PathBuf],
    roll_forward: bool,
    push_dir: Option<&Path>,
) -> String {
    let mut s = String::new();
    let d = q(&layout.stack_dir);
    let st = q(&layout.store);
    let _ = writeln!(s, "D={d}\nS={st}");
    if roll_forward {
        // Only under the stack's lock: roll an interrupted commit forward
        // first.
        s.push_str(
            r#"for j in "$D"/.journal-*.sh; do
  [ -e "$j" ] || continue
  printf 'rolled-forward %s\n' "${j##*/}"
  sh "$j" >>"$j.log" 2>&1 || { [ ! -e "$j" ] || mv -f "$j" "$j.failed"; printf 'journal-failed %s\n' "${j##*/}"; }
done
for j in "$D"/.journal-*.sh.new; do [ ! -e "$j" ] || rm -f "$j" "${j%.new}.pid"; done
"#,
        );
    } else {
        s.push_str(
            r#"for j in "$D"/.journal-*.sh; do [ -e "$j" ] && printf 'pending-journal %s\n' "${j##*/}"; done
"#,
        );
    }
    // Missing store paths: one line per path, all in this one script;
    // all of them, without looking, when there is no store yet.
    s.push_str("m=\n");
    if !names.is_empty() {
        let _ = writeln!(
            s,
            "if [ -d \"$S\" ]; then\n  cd \"$S\"\n  for n in {}; do [ -e \"$n/built\" ] || {{ m=1; printf 'missing %s\\n' \"$n\"; }}; done\n  cd /\nelse\n  m=1; echo store-absent\nfi",
            words(names.iter().map(String::as_str))
        );
    }
    if roll_forward && (!dirs_to_create.is_empty() || push_dir.is_some()) {
        // One `mkdir` for all that are missing, with the directory the
        // push goes to when there is something to push.
        let all: Vec<String> = dirs_to_create.iter().map(|d| q(d)).collect();
        let _ = writeln!(s, "set -- {}", all.join(" "));
        if let Some(p) = push_dir {
            let _ = writeln!(s, "[ -z \"$m\" ] || set -- \"$@\" {}", q(p));
        }
        s.push_str("for d; do [ -d \"$d\" ] || { mkdir -p -- \"$@\" 2>/dev/null; break; }; done\n");
    }
    for dir in dirs_to_create {
        if roll_forward {
            let _ = writeln!(
                s,
                "if [ -d {p} ] && [ -w {p} ]; then :; else printf 'unwritable %s\\n' {p}; fi",
                p = q(dir)
            );
        } else {
            // Changing nothing: the directory, or the nearest existing
            // ancestor it would be created in, must be writable.
            let _ = writeln!(
                s,
                "d={p}; while [ ! -e \"$d\" ] && [ \"$d\" != / ]; do d=${{d%/*}}; [ -n \"$d\" ] || d=/; done; if [ -d \"$d\" ] && [ -w \"$d\" ]; then :; else printf 'unwritable %s\\n' {p}; fi",
                p = q(dir)
            );
        }
    }
    s.push_str(
        r#"for g in "$D"/gen-*.json; do
  [ -e "$g" ] || continue
  printf 'gen %s\n' "${g##*/}"
  [ ! "$g" -ef "$D/current" ] || printf 'current %s\n' "${g##*/}"
done
if [ -L "$D/current" ]; then
  if [ -f "$D/current" ]; then echo 'current-json-begin'; base64 < "$D/current"; echo 'current-json-end'; fi
fi
"#,
    );
    let _ = writeln!(
        s,
        r#"if [ -f "$D/{ACTIVATE_PENDING}" ]; then
  echo activate-pending
  while IFS= read -r u; do [ -z "$u" ] || printf 'was-running %s\n' "$u"; done <"$D/{ACTIVATE_PENDING}"
fi"#
    );
    for (i, f) in files.iter().enumerate() {
        for p in &f.parents {
            let _ = writeln!(s, "[ ! -L {p} ] || printf 'unsafe {i} %s\\n' {p}", p = q(p));
        }
        if let Some(parent) = f.path.parent() {
            // The nearest existing ancestor must be writable for a write.
            let _ = writeln!(
                s,
                "d={p}; while [ ! -e \"$d\" ] && [ \"$d\" != / ]; do d=${{d%/*}}; [ -n \"$d\" ] || d=/; done; [ -w \"$d\" ] || printf 'unwritable-file {i} %s\\n' \"$d\"",
                p = q(parent)
            );
        }
        let p = q(&f.path);
        let _ = writeln!(
            s,
            "if [ -L {p} ]; then echo 'file {i} symlink -'; elif [ -f {p} ]; then printf 'file {i} %s %s\\n' \"$(sha256sum < {p} | cut -d' ' -f1)\" \"$(stat -c %a {p})\"; elif [ -e {p} ]; then echo 'file {i} notfile -'; else echo 'file {i} absent -'; fi"
        );
    }
    s
}

/// What [`state`] found.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub rolled_forward: Vec<String>,
    /// Interrupted commits seen but not rolled forward (no lock held).
    pub pending_journals: Vec<String>,
    /// (file index, the directory that cannot be written)
    pub unwritable_files: Vec<(usize, String)>,
    pub journal_failed: Vec<String>,
    pub unwritable: Vec<String>,
    pub generations: Vec<u64>,
    /// Generations whose activation failed (`gen-NNN.failed.json`).
    pub failed_generations: Vec<u64>,
    pub current: Option<String>,
    pub current_json: Option<Vec<u8>>,
    pub missing: Vec<String>,
    /// The store root does not exist: every path asked about is missing
    /// (see [`State::with_names`]).
    pub store_absent: bool,
    /// An `--activate` that has not ended: the units that ran before it
    /// (see [`ACTIVATE_PENDING`]).
    pub activate_pending: Option<Vec<String>>,
    /// Per watched file: (sha256 or state word, mode).
    pub files: Vec<(String, String)>,
    /// (file index, symlinked parent)
    pub unsafe_parents: Vec<(usize, String)>,
}

impl State {
    /// [`parse`](Self::parse) of a query about the store paths `names`.
    pub fn with_names(out: &str, nfiles: usize, names: &[String]) -> State {
        let mut st = Self::parse(out, nfiles);
        if st.store_absent {
            st.missing = names.to_vec();
        }
        st
    }

    pub fn parse(out: &str, nfiles: usize) -> State {
        use base64::Engine;
        let mut st = State {
            files: vec![("absent".into(), "-".into()); nfiles],
            ..State::default()
        };
        let mut in_json = false;
        let mut b64 = String::new();
        for line in out.lines() {
            if in_json {
                if line == "current-json-end" {
                    in_json = false;
                    st.current_json = base64::engine::general_purpose::STANDARD
                        .decode(b64.as_bytes())
                        .ok();
                } else {
                    b64.push_str(line.trim());
                }
                continue;
            }
            let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
            match word {
                "rolled-forward" => st.rolled_forward.push(rest.to_string()),
                "pending-journal" => st.pending_journals.push(rest.to_string()),
                "unwritable-file" => {
                    if let Some((i, d)) = rest.split_once(' ')
                        && let Ok(i) = i.parse()
                    {
                        st.unwritable_files.push((i, d.to_string()));
                    }
                }
                "journal-failed" => st.journal_failed.push(rest.to_string()),
                "unwritable" => st.unwritable.push(rest.to_string()),
                "gen" => {
                    if let Some(n) = super::generation::Generation::number_of(rest) {
                        st.generations.push(n);
                    } else if let Some(n) = super::generation::Generation::failed_number_of(rest) {
                        st.failed_generations.push(n);
                    }
                }
                "current" => st.current = Some(rest.to_string()),
                "current-json-begin" => in_json = true,
                "missing" => st.missing.push(rest.to_string()),
                "activate-pending" => st.activate_pending = Some(Vec::new()),
                "was-running" => {
                    let units = st.activate_pending.get_or_insert_with(Vec::new);
                    if !units.iter().any(|u| u == rest) {
                        units.push(rest.to_string());
                    }
                }
                "store-absent" => st.store_absent = true,
                "file" => {
                    let mut it = rest.split(' ');
                    if let (Some(i), Some(h), Some(m)) = (it.next(), it.next(), it.next())
                        && let Ok(i) = i.parse::<usize>()
                        && i < nfiles
                    {
                        st.files[i] = (h.to_string(), m.to_string());
                    }
                }
                "unsafe" => {
                    if let Some((i, p)) = rest.split_once(' ')
                        && let Ok(i) = i.parse()
                    {
                        st.unsafe_parents.push((i, p.to_string()));
                    }
                }
                _ => {}
            }
        }
        let failed = st.journal_failed.clone();
        st.rolled_forward.retain(|j| !failed.contains(j));
        st.generations.sort_unstable();
        st.generations.dedup();
        st.failed_generations.sort_unstable();
        st
    }

    /// The number the next generation gets: after every generation,
    /// failed ones included.
    pub fn next_number(&self) -> u64 {
        self.generations
            .iter()
            .chain(&self.failed_generations)
            .max()
            .copied()
            .unwrap_or(0)
            + 1
    }
}

/// A file for the commit to write: where (as the transport sees it), what,
/// and with which mode.
pub struct Write<'a> {
    pub path: PathBuf,
    pub bytes: &'a [u8],
    pub mode: u32,
}

/// Everything a commit does.
pub struct Commit<'a> {
    pub layout: &'a Layout,
    /// The generation number this commit makes current.
    pub number: u64,
    /// The generation file to write (None: flip to an existing one, as a
    /// rollback does).
    pub generation_json: Option<&'a [u8]>,
    /// Directory holding pushed entries, and their names.
    pub pushed: Option<(PathBuf, Vec<String>)>,
    /// The entries the generation pins that were already on the target:
    /// marked as in use and checked before anything is renamed (see
    /// [`IN_USE_MINUTES`]).
    pub cached: Vec<String>,
    pub writes: Vec<Write<'a>>,
    /// Files to delete (no longer part of the stack).
    pub removes: Vec<PathBuf>,
    /// Generation numbers to delete after the flip.
    pub trim: Vec<u64>,
    /// Test hook: where the journal stops until `$J.paused` is removed.
    pub pause: Option<JournalPause>,
    /// `--activate`: the units of the generation being replaced, which
    /// may still run until the activation ends (see [`ACTIVATE_PENDING`]).
    pub activate_from: Option<Vec<String>>,
    /// How long to wait for the journal.
    pub wait_secs: u64,
}

/// A store entry whose `built` marker changed this recently may be in
/// use by a deploy that found it on the target and has not pinned it yet:
/// `store gc --target` keeps it. A commit touches the markers of the
/// entries it pins without pushing them, then checks they are all still
/// there, before it renames anything.
pub const IN_USE_MINUTES: u32 = 60;

/// Test hook: a point inside the commit journal where it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalPause {
    /// After the first config file took its place.
    Writes,
    /// With everything in place but `current` not yet flipped.
    Flip,
}

impl JournalPause {
    fn word(self) -> &'static str {
        match self {
            JournalPause::Writes => "writes",
            JournalPause::Flip => "flip",
        }
    }

    /// One-shot: the request file is consumed, so a roll-forward of the
    /// journal does not stop again.
    fn hook(self) -> String {
        format!(
            "if [ -e \"$J.pause-request\" ]; then rm -f \"$J.pause-request\"; echo {w} > \"$J.paused\"; while [ -e \"$J.paused\" ]; do sleep 0.05; done; fi\n",
            w = self.word()
        )
    }
}

/// The file, in the stack directory, that says an `--activate` has not
/// ended: it lists (a line each) the units that ran before it, so the
/// next activation restarts every unit of the current generation and
/// stops those that left it. The commit writes it before the flip; only
/// the end of an activation removes it.
pub const ACTIVATE_PENDING: &str = ".activate-pending";

fn staged_name(path: &Path, number: u64) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.punix-tmp-{number}"))
}

/// The commit script (see the module doc).
pub fn commit(c: &Commit<'_>) -> String {
    let d = &c.layout.stack_dir;
    let gen_name = super::generation::Generation::file_name(c.number);
    let journal = d.join(format!(".journal-{:03}.sh", c.number));
    // Flush the filesystems written to (`sync -f`: syncfs of each), not
    // every filesystem of the host; a `sync` without `-f` flushes all.
    let mut synced: Vec<&Path> = vec![&c.layout.store, d];
    synced.extend(c.writes.iter().filter_map(|w| w.path.parent()));
    synced.sort();
    synced.dedup();
    let sync = format!(
        "sync -f {} 2>/dev/null || sync",
        synced.iter().map(|p| q(p)).collect::<Vec<_>>().join(" ")
    );
    let mut s = String::new();
    s.push_str("set -e\n");
    // A failure before the journal exists leaves nothing behind: no
    // pushed temporaries, no staged files.
    let mut cleanup = String::from("cleanup() {\n");
    if let Some((dir, _)) = &c.pushed {
        let _ = writeln!(cleanup, "  {}", remove_tree(dir));
    }
    for w in &c.writes {
        let _ = writeln!(cleanup, "  rm -f {}", q(&staged_name(&w.path, c.number)));
    }
    cleanup.push_str("  :\n}\ntrap 'cleanup' EXIT\n");
    s.push_str(&cleanup);
    let _ = writeln!(s, "[ -d {p} ] || mkdir -p {p}", p = q(d));
    // Stage.
    for w in &c.writes {
        if let Some(parent) = w.path.parent() {
            let _ = writeln!(s, "[ -d {p} ] || mkdir -p {p}", p = q(parent));
        }
        s.push_str(&write_staged(
            &staged_name(&w.path, c.number),
            w.bytes,
            w.mode,
        ));
    }
    let gen_tmp = d.join(format!(".{gen_name}.punix-tmp"));
    if let Some(json) = c.generation_json {
        s.push_str(&write_staged(&gen_tmp, json, 0o644));
    }
    // The journal: idempotent, deletes itself last.
    let mut j = String::new();
    let _ = writeln!(
        j,
        "# punix journal: commit generation {} of {}; safe to run again.\nset -e",
        c.number,
        d.display()
    );
    // It runs first under a temporary name (`$0`), and `$J` is its real
    // one. Its pid, for the waiting side to tell a journal that died from
    // one still running; a failure keeps it as `.failed` (with its log).
    let _ = writeln!(j, "J={}", q(&journal));
    j.push_str("echo $$ >\"$J.pid\"\ntrap '[ $? = 0 ] || { rm -f \"$J.pid\"; mv -f \"$J\" \"$J.failed\" 2>/dev/null || mv -f \"$0\" \"$J.failed\"; }' EXIT\n");
    // Pushed entries are made writable (a directory moved to another
    // parent must be) and the new `current` link is made while what was
    // pushed and staged, and the journal itself, are flushed. Only then
    // does the journal take its real name, the one a later deploy rolls
    // forward: a crash before leaves nothing renamed and nothing to roll
    // forward, one after finds every byte the journal needs on disk. Then
    // the entries move in the background while the generation is renamed
    // next to the old one; the flip waits for both. (No sync between: the
    // renames and the flip are ordered by the filesystem's journal; the
    // flip is synced below.)
    j.push_str("set --\npc=\npm=\n");
    if let Some((dir, _)) = &c.pushed {
        let _ = writeln!(j, "S={}\nP={}", q(&c.layout.store), q(dir));
        j.push_str(PREPARE_PUSHED);
    }
    let cur_tmp = q(&d.join(".current.punix-tmp"));
    let _ = writeln!(
        j,
        "if [ -e {cur_tmp} ] || [ -L {cur_tmp} ]; then rm -f {cur_tmp}; fi\nln -s {g} {cur_tmp}\n{sync}",
        g = quote(&gen_name),
    );
    // On its first run only (a roll-forward must finish what it began):
    // the entries found on the target are marked in use, and must still
    // be there (a concurrent `store gc` may have taken one before the
    // mark).
    j.push_str("if [ ! \"$0\" -ef \"$J\" ]; then\n");
    if !c.cached.is_empty() {
        j.push_str(&in_use_check(&c.layout.store, &c.cached));
    }
    j.push_str("  mv -f \"$0\" \"$J\"\nfi\n[ -z \"$pc\" ] || wait \"$pc\"\n");
    if c.pushed.is_some() {
        j.push_str(MOVE_PUSHED);
    }
    if c.generation_json.is_some() {
        let t = q(&gen_tmp);
        let _ = writeln!(j, "[ ! -e {t} ] || mv -f {t} {}", q(&d.join(&gen_name)));
    }
    j.push_str("[ -z \"$pm\" ] || wait \"$pm\"\n");
    for (i, w) in c.writes.iter().enumerate() {
        let t = q(&staged_name(&w.path, c.number));
        let _ = writeln!(j, "[ ! -e {t} ] || mv -f {t} {}", q(&w.path));
        if i == 0 && c.pause == Some(JournalPause::Writes) {
            j.push_str(&JournalPause::Writes.hook());
        }
    }
    for r in &c.removes {
        let _ = writeln!(j, "rm -f {}", q(r));
    }
    if let Some(units) = &c.activate_from {
        // Kept from an activation that never ended: its units may run too.
        let p = q(&d.join(ACTIVATE_PENDING));
        let _ = writeln!(
            j,
            "{{ [ ! -f {p} ] || cat {p}; printf '%s\\n' {}; }} >{p}.tmp\nmv -f {p}.tmp {p}",
            words(units.iter().map(String::as_str))
        );
    }
    if c.pause == Some(JournalPause::Flip) {
        j.push_str(&JournalPause::Flip.hook());
    }
    // The flip, then the moved entries made read-only while it is synced.
    let _ = writeln!(
        j,
        "mv -f {cur_tmp} {cur}\npw=\nif [ $# -gt 0 ]; then (cd \"$S\" && chmod a-w -- \"$@\" 2>/dev/null || :) & pw=$!; fi\n{sync}\n[ -z \"$pw\" ] || wait \"$pw\" || :",
        cur = q(&d.join("current")),
        sync = sync
    );
    if !c.trim.is_empty() {
        let trimmed: Vec<String> = c
            .trim
            .iter()
            .map(|n| q(&d.join(super::generation::Generation::file_name(*n))))
            .collect();
        let _ = writeln!(j, "rm -f {}", trimmed.join(" "));
    }
    // Last: the push directory (empty now), the journal itself and its
    // log, which a failure keeps.
    let _ = writeln!(
        j,
        "rm -rf -- {}\"$J.paused\" \"$J.log\" \"$J\" \"$J.pid\"",
        c.pushed
            .as_ref()
            .map(|(dir, _)| format!("{} ", q(dir)))
            .unwrap_or_default()
    );

    // Run as `sh JOURNAL`: it needs no execute bit.
    let journal_new = journal.with_extension("sh.new");
    s.push_str(&write_staged(&journal_new, j.as_bytes(), 0o600));
    // From here on the journal owns the temporaries.
    s.push_str("trap - EXIT\n");
    if c.pause.is_some() {
        let _ = writeln!(
            s,
            "echo > {}",
            q(&journal.with_extension("sh.pause-request"))
        );
    }
    // Run it detached: a dropped connection or a killed punix cannot stop
    // it half-way. Then wait for it: it is done when it deleted itself,
    // failed when it left `.failed`; one that died half-way (its pid gone,
    // itself still there) is run again by the next deploy.
    let jq = q(&journal);
    let jn = q(&journal_new);
    let _ = writeln!(
        s,
        r#"J={jq}
set +e
# A journal of this number that failed before is kept under another name.
if [ -e "$J.failed" ]; then mv -f "$J.failed" "$J.failed.$$"; [ ! -e "$J.log" ] || mv -f "$J.log" "$J.failed.$$.log"; fi
if command -v setsid >/dev/null 2>&1; then
  setsid sh {jn} </dev/null >"$J.log" 2>&1 &
else
  (trap '' HUP; exec sh {jn}) </dev/null >"$J.log" 2>&1 &
fi
wait $! 2>/dev/null
i=0
while {{ [ -e "$J" ] || [ -e {jn} ]; }} && [ ! -e "$J.failed" ]; do
  p=
  [ ! -s "$J.pid" ] || read -r p <"$J.pid"
  if [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null && [ ! -e "$J.failed" ]; then
    if [ -e "$J" ]; then echo "the commit journal $J stopped before it finished; the next deploy runs it again" >&2; exit 1; fi
    if [ -e {jn} ]; then echo "the commit journal $J stopped before it changed anything; the target stays on its generation" >&2; exit 1; fi
  fi
  i=$((i+1)); [ "$i" -le {} ] || {{ echo 'the commit journal is still running' >&2; exit 75; }}
  sleep 0.05
done
if [ -e "$J.failed" ]; then cat "$J.log" >&2; echo "(the journal is kept as $J.failed)" >&2; exit 1; fi
echo committed"#,
        c.wait_secs * 20
    );
    s
}

/// Mark the store entries `names` under `store` in use and fail, saying
/// which, when one is gone.
fn in_use_check(store: &Path, names: &[String]) -> String {
    let mut s = format!("  cd {} || exit 1\n", q(store));
    s.push_str(&crate::transport::script::mark_in_use(names));
    let _ = writeln!(
        s,
        "  for n in {}; do\n    [ -e \"$n/built\" ] || {{ echo \"the store path $PWD/$n is gone from the target (a \\`store gc\\` ran during this deploy?); nothing was changed: deploy again\" >&2; exit 1; }}\n  done\n  cd /",
        words(names.iter().map(String::as_str))
    );
    s
}

/// Remove a directory tree of the deploy's own (a push directory), read-only
/// parts included.
pub fn remove_tree(dir: &Path) -> String {
    format!("chmod -R u+w {p} 2>/dev/null; rm -rf {p}", p = q(dir))
}

/// The journal's first look at the pushed entries (`$P`): their names
/// into `$@`, made writable in the background (`$pc`).
const PREPARE_PUSHED: &str = r#"if [ -d "$P" ]; then
  cd "$P"
  set -- *
  if [ -e "$1" ]; then
    (chmod u+w -- "$@") &
    pc=$!
  else
    set --
  fi
  cd /
fi
"#;

/// The journal's move of the pushed entries `$@` from `$P` into the store
/// `$S`, in the background (`$pm`): all at once with one `mv` whatever
/// their number. Only if some could not move (a copy already in the
/// store, from a concurrent deploy of another stack, or a leftover under
/// the final name) does it look at them one by one: a complete copy in
/// the store wins, an incomplete one in the push is dropped, a leftover
/// is cleared.
const MOVE_PUSHED: &str = r#"if [ $# -gt 0 ]; then
  (
    cd "$P"
    if ! mv -- "$@" "$S"/ 2>/dev/null; then
      for n in *; do
        [ -e "$n" ] || continue
        if [ -e "$S/$n/built" ] || [ ! -e "$n/built" ]; then chmod -R u+w "$n"; rm -rf "$n"; continue; fi
        if [ -e "$S/$n" ] || [ -L "$S/$n" ]; then chmod -R u+w "$S/$n"; rm -rf "$S/$n"; fi
        mv -- "$n" "$S"/
      done
    fi
  ) &
  pm=$!
fi
"#;

/// The activation script: reload, stop removed units, restart changed and
/// new ones, detached; then report `is-active` of every unit.
pub fn activate(
    stack_dir: &Path,
    number: u64,
    stop: &[String],
    restart: &[String],
    check: &[String],
    settle_secs: u64,
) -> String {
    let mut s = String::new();
    let status = stack_dir.join(format!(".activate-{number:03}.status"));
    let mut inner = String::new();
    inner.push_str("systemctl daemon-reload\n");
    for u in stop {
        let _ = writeln!(
            inner,
            "systemctl disable --now {u} 2>/dev/null || systemctl stop {u} 2>/dev/null || true\nrm -f /etc/systemd/system/*.wants/{u}",
            u = quote(u)
        );
    }
    // systemd keeps counting automatic restarts across a manual restart,
    // and a unit still crash-looping (the generation rolled back from)
    // may be restarted by systemd once more while the manual restart is
    // queued: the count is read when the restart has happened, so only
    // restarts after it count. Units not restarted are counted up front.
    let before = |u: &str| {
        format!(
            "printf 'before %s %s\\n' {u} \"$(systemctl show -p NRestarts --value {u} 2>/dev/null)\"",
            u = quote(u)
        )
    };
    for u in restart {
        let _ = writeln!(
            inner,
            "systemctl enable {q} >/dev/null 2>&1 || true\nsystemctl restart {q} || echo \"restart-failed {q}\"",
            q = quote(u)
        );
        if check.contains(u) {
            let _ = writeln!(inner, "{}", before(u));
        }
    }
    let _ = writeln!(s, "ST={}\nrm -f \"$ST\"", q(&status));
    for u in check.iter().filter(|u| !restart.contains(u)) {
        let _ = writeln!(s, "{}", before(u));
    }
    s.push_str("set +e\n");
    let _ = writeln!(
        s,
        "setsid sh -c {} </dev/null >\"$ST.log\" 2>&1 &",
        quote(&format!("{inner}echo done > {}\n", q(&status)))
    );
    s.push_str("i=0\nwhile [ ! -e \"$ST\" ]; do i=$((i+1)); [ \"$i\" -le 2400 ] || { echo 'activation did not finish' >&2; exit 75; }; sleep 0.05; done\n");
    s.push_str("cat \"$ST.log\"\nrm -f \"$ST\" \"$ST.log\"\n");
    if !check.is_empty() {
        let _ = writeln!(s, "sleep {settle_secs}");
        s.push_str(&unit_states(check));
    }
    s
}

/// A fragment printing `unit <name> <key>=<value>...` for each unit: the
/// properties [`UnitState`] reads.
pub fn unit_states(units: &[String]) -> String {
    let mut s = String::new();
    for u in units {
        let _ = writeln!(
            s,
            "printf 'unit %s %s\\n' {u} \"$(systemctl show -p ActiveState -p SubState -p Result -p NRestarts -p Type {u} | tr '\\n' ' ')\"",
            u = quote(u)
        );
    }
    s
}

/// A unit's state after an activation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub unit: String,
    pub active: String,
    pub sub: String,
    pub result: String,
    pub restarts: u64,
    pub kind: String,
}

/// How an activated unit is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Running (or, for a oneshot unit, ran) without a failure or restart.
    Up,
    /// Still starting: look again.
    Starting,
    Failed,
}

impl UnitState {
    /// The restart counts an activation noted before it restarted
    /// anything (`before <unit> <n>` lines).
    pub fn restarts_before(out: &str) -> std::collections::BTreeMap<String, u64> {
        out.lines()
            .filter_map(|l| l.strip_prefix("before "))
            .filter_map(|rest| {
                let (u, n) = rest.split_once(' ')?;
                Some((u.to_string(), n.trim().parse().unwrap_or(0)))
            })
            .collect()
    }

    /// Parse the `unit ...` lines of [`unit_states`].
    pub fn parse_all(out: &str) -> Vec<UnitState> {
        out.lines()
            .filter_map(|l| l.strip_prefix("unit "))
            .filter_map(|rest| {
                let (unit, props) = rest.split_once(' ')?;
                let mut st = UnitState {
                    unit: unit.to_string(),
                    ..UnitState::default()
                };
                for kv in props.split_whitespace() {
                    match kv.split_once('=') {
                        Some(("ActiveState", v)) => st.active = v.into(),
                        Some(("SubState", v)) => st.sub = v.into(),
                        Some(("Result", v)) => st.result = v.into(),
                        Some(("NRestarts", v)) => st.restarts = v.parse().unwrap_or(0),
                        Some(("Type", v)) => st.kind = v.into(),
                        _ => {}
                    }
                }
                Some(st)
            })
            .collect()
    }

    pub fn health(&self) -> Health {
        let clean = self.result == "success" && self.restarts == 0;
        match (self.active.as_str(), self.sub.as_str()) {
            ("active", _) if clean => Health::Up,
            ("inactive", _) if clean && self.kind == "oneshot" => Health::Up,
            ("activating" | "reloading", sub) if clean && sub != "auto-restart" => Health::Starting,
            _ => Health::Failed,
        }
    }

    /// In words, for an error message.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({})", self.active, self.sub);
        if self.result != "success" && !self.result.is_empty() {
            s.push_str(&format!(", result {}", self.result));
        }
        if self.restarts > 0 {
            s.push_str(&format!(", restarted {} time(s) by systemd", self.restarts));
        }
        s
    }
}

/// The last journal lines of units that failed, for the error message.
pub fn unit_logs(units: &[String]) -> String {
    let mut s = String::new();
    for u in units {
        let _ = writeln!(
            s,
            "echo \"--- {u}\"; journalctl -u {q} -n 15 --no-pager 2>/dev/null || systemctl status {q} --no-pager 2>/dev/null | tail -n 15",
            u = u.replace(['"', '$', '`', '\\'], ""),
            q = quote(u)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_activation_that_never_ended_lists_each_unit_once() {
        let out = "gen gen-001.json\nactivate-pending\nwas-running a.service\nwas-running b c.service\nwas-running a.service\n";
        let st = State::parse(out, 0);
        assert_eq!(
            st.activate_pending,
            Some(vec!["a.service".to_string(), "b c.service".to_string()])
        );
        // Present but empty: still pending (the generation before had no units).
        assert_eq!(
            State::parse("activate-pending\n", 0).activate_pending,
            Some(vec![])
        );
        assert_eq!(State::parse("gen gen-001.json\n", 0).activate_pending, None);
    }

    #[test]
    fn unit_health_is_read_from_systemctl_show() {
        let out = "unit a.service ActiveState=active SubState=running Result=success NRestarts=0 Type=simple \n\
                   unit b.service ActiveState=activating SubState=auto-restart Result=exit-code NRestarts=2 Type=simple \n\
                   unit c.service ActiveState=inactive SubState=dead Result=success NRestarts=0 Type=oneshot \n\
                   unit d.service ActiveState=activating SubState=start Result=success NRestarts=0 Type=notify \n\
                   unit e.service ActiveState=active SubState=running Result=success NRestarts=1 Type=simple \n\
                   unit f.service ActiveState=inactive SubState=dead Result=success NRestarts=0 Type=simple \n";
        let h: Vec<Health> = UnitState::parse_all(out)
            .iter()
            .map(UnitState::health)
            .collect();
        assert_eq!(
            h,
            vec![
                Health::Up,
                Health::Failed,
                Health::Up,
                Health::Starting,
                Health::Failed,
                Health::Failed
            ]
        );
    }
}
