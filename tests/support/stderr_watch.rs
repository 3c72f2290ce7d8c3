//! Standard error of a running child, read on a thread as it comes, so a
//! test can wait for a line and the child never writes into a closed
//! pipe (punix stops on a broken pipe).
#![allow(dead_code)]

use std::io::Read;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct StderrWatch {
    text: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl StderrWatch {
    /// Take `child`'s standard error (it must be piped).
    pub fn new(child: &mut Child) -> StderrWatch {
        let text = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let reader = {
            let text = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    text.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        StderrWatch {
            text,
            reader: Some(reader),
        }
    }

    /// What it said so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (at most a minute) until it said `needle`; panics when it
    /// ended without saying it.
    pub fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.text().contains(needle) {
            let ended = self.reader.as_ref().is_none_or(|r| r.is_finished());
            if ended && !self.text().contains(needle) {
                panic!("no `{needle}` before it ended:\n{}", self.text());
            }
            assert!(Instant::now() < deadline, "no `{needle}`:\n{}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything, once the child closed its standard error.
    pub fn finish(mut self) -> String {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.text()
    }
}
