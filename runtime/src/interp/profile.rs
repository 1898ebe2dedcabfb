//! Optional time per op kind, for finding where the interpreter spends its
//! time. Off unless `KILN_PROFILE` is set; then `report()` lists the totals.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KILN_PROFILE").is_some())
}

fn totals() -> &'static Mutex<BTreeMap<&'static str, (usize, Duration)>> {
    static TOTALS: OnceLock<Mutex<BTreeMap<&'static str, (usize, Duration)>>> = OnceLock::new();
    TOTALS.get_or_init(Default::default)
}

pub(crate) fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

pub(crate) fn record(op: &'static str, started: Option<Instant>) {
    if let Some(t) = started {
        let mut totals = totals().lock().unwrap_or_else(|e| e.into_inner());
        let entry = totals.entry(op).or_default();
        entry.0 += 1;
        entry.1 += t.elapsed();
    }
}

/// One line per op kind: calls and total milliseconds, slowest first.
/// Empty when profiling is off.
pub fn report() -> String {
    if !enabled() {
        return String::new();
    }
    let totals = totals().lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = totals.iter().collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1 .1));
    rows.iter()
        .map(|(op, (calls, time))| {
            format!(
                "{op:<10} {calls:>7} calls {:>10.1} ms\n",
                time.as_secs_f64() * 1e3
            )
        })
        .collect()
}
