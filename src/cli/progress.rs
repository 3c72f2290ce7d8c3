//! Rendering build events: progress bars on a terminal, plain lines
//! otherwise, nothing with `--json`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use punix::build::{Event, Observer};

enum Mode {
    Quiet,
    Plain,
    Bars {
        multi: MultiProgress,
        total: Mutex<Option<ProgressBar>>,
        running: Mutex<HashMap<String, ProgressBar>>,
    },
}

pub struct Renderer {
    mode: Mode,
    verbose: bool,
}

impl Renderer {
    pub fn new(json: bool, verbose: bool) -> Renderer {
        let mode = if json {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                total: Mutex::new(None),
                running: Mutex::new(HashMap::new()),
            }
        } else {
            Mode::Plain
        };
        Renderer { mode, verbose }
    }

    pub fn finish(&self) {
        if let Mode::Bars { total, running, .. } = &self.mode {
            if let Ok(mut r) = running.lock() {
                for (_, bar) in r.drain() {
                    bar.finish_and_clear();
                }
            }
            if let Ok(t) = total.lock()
                && let Some(bar) = t.as_ref()
            {
                bar.finish_and_clear();
            }
        }
    }
}

fn short(name: &str) -> &str {
    // `<32 hex>-pname-version` -> `pname-version`
    name.get(33..).unwrap_or(name)
}

impl Observer for Renderer {
    fn event(&self, event: Event<'_>) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Plain => match event {
                Event::Planned { to_build, present } => {
                    if !to_build.is_empty() {
                        eprintln!(
                            "{} package(s) to build, {present} already in the store",
                            to_build.len()
                        );
                    }
                }
                Event::Started { module, name } => {
                    eprintln!("building {module} ({})", short(name));
                }
                Event::Finished {
                    module,
                    seconds,
                    elsewhere,
                    ..
                } => {
                    if elsewhere {
                        eprintln!("{module} was built meanwhile by another punix");
                    } else {
                        eprintln!("built {module} in {seconds:.2}s");
                    }
                }
                Event::Failed { module, .. } => eprintln!("failed {module}"),
            },
            Mode::Bars {
                multi,
                total,
                running,
            } => match event {
                Event::Planned { to_build, present } => {
                    if to_build.is_empty() {
                        return;
                    }
                    let bar = multi.add(ProgressBar::new(to_build.len() as u64));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "[{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} built {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_message(format!("({present} already in the store)"));
                    bar.enable_steady_tick(Duration::from_millis(200));
                    if let Ok(mut t) = total.lock() {
                        *t = Some(bar);
                    }
                }
                Event::Started { module, name } => {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_message(format!("building {module} ({})", short(name)));
                    bar.enable_steady_tick(Duration::from_millis(100));
                    if let Ok(mut r) = running.lock() {
                        r.insert(name.to_string(), bar);
                    }
                }
                Event::Finished {
                    module,
                    name,
                    seconds,
                    ..
                } => {
                    if let Ok(mut r) = running.lock()
                        && let Some(bar) = r.remove(name)
                    {
                        bar.finish_and_clear();
                    }
                    if self.verbose {
                        let _ = multi.println(format!("built {module} in {seconds:.2}s"));
                    }
                    if let Ok(t) = total.lock()
                        && let Some(bar) = t.as_ref()
                    {
                        bar.inc(1);
                    }
                }
                Event::Failed { module, name, .. } => {
                    if let Ok(mut r) = running.lock()
                        && let Some(bar) = r.remove(name)
                    {
                        bar.finish_and_clear();
                    }
                    let _ = multi.println(format!("failed {module}"));
                }
            },
        }
    }
}
