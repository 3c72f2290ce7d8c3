//! Timestamps of a run's main steps on standard error, for finding where
//! the time goes: set `PUNIX_TRACE_TIMES=1`. Each line is `punix-trace
//! MILLISECONDS STEP`, counted from the first mark.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Option<Instant>> = OnceLock::new();

/// Print `step` with the milliseconds since the first mark, when traced.
pub fn mark(step: &str) {
    let start = START.get_or_init(|| {
        std::env::var_os("PUNIX_TRACE_TIMES")
            .filter(|v| !v.is_empty() && v != "0")
            .map(|_| Instant::now())
    });
    if let Some(t0) = start {
        eprintln!(
            "punix-trace {:.2} {step}",
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
}
