//! Writing to stdout and stderr without panicking when the reader has gone:
//! `kiln compile … | head -1` closes both pipes after one line, and Rust's
//! `println!` panics on the next write. With these macros the lost output
//! is dropped and the work goes on to finish (or fail) as it would have,
//! so a closed pipe never leaves a panic or half an output directory.

use std::fmt;
use std::io::Write;

#[doc(hidden)]
pub fn write_stdout(args: fmt::Arguments, newline: bool) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args);
    if newline {
        let _ = out.write_all(b"\n");
    }
}

#[doc(hidden)]
pub fn write_stderr(args: fmt::Arguments, newline: bool) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    if newline {
        let _ = err.write_all(b"\n");
    }
}

/// `println!` that drops its text if stdout is closed.
#[macro_export]
macro_rules! say {
    () => { $crate::console::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::console::write_stdout(format_args!($($arg)*), true) };
}

/// `print!` that drops its text if stdout is closed.
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => { $crate::console::write_stdout(format_args!($($arg)*), false) };
}

/// `eprintln!` that drops its text if stderr is closed.
#[macro_export]
macro_rules! note {
    () => { $crate::console::write_stderr(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::console::write_stderr(format_args!($($arg)*), true) };
}

/// `eprint!` that drops its text if stderr is closed.
#[macro_export]
macro_rules! note_raw {
    ($($arg:tt)*) => { $crate::console::write_stderr(format_args!($($arg)*), false) };
}
