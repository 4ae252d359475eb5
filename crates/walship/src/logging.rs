//! How the log is set up: which filter applies and whether it has colours. Plain
//! functions of the flags and the environment, so `main` only reads them and installs
//! the subscriber.

use std::ffi::OsStr;

/// Where the log filter came from, for a message when it is not a valid filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterSource {
    /// `--log-level`.
    Flag,
    /// `WALSHIP_LOG`.
    WalshipLog,
    /// `RUST_LOG` (read only when `WALSHIP_LOG` is unset or empty).
    RustLog,
    /// Nothing set: `info`.
    Default,
}

impl FilterSource {
    /// The flag or variable, as a user would write it.
    pub fn name(self) -> &'static str {
        match self {
            FilterSource::Flag => "--log-level",
            FilterSource::WalshipLog => "WALSHIP_LOG",
            FilterSource::RustLog => "RUST_LOG",
            FilterSource::Default => "the default",
        }
    }
}

/// The default filter.
pub const DEFAULT_FILTER: &str = "info";

/// The log filter: `--log-level`, else `WALSHIP_LOG`, else `RUST_LOG`, else `info`. An empty
/// value counts as unset.
pub fn filter<'a>(
    flag: Option<&'a str>,
    walship_log: Option<&'a str>,
    rust_log: Option<&'a str>,
) -> (FilterSource, &'a str) {
    let set = |v: Option<&'a str>| v.map(str::trim).filter(|v| !v.is_empty());
    if let Some(v) = set(flag) {
        (FilterSource::Flag, v)
    } else if let Some(v) = set(walship_log) {
        (FilterSource::WalshipLog, v)
    } else if let Some(v) = set(rust_log) {
        (FilterSource::RustLog, v)
    } else {
        (FilterSource::Default, DEFAULT_FILTER)
    }
}

/// Whether the log gets ANSI colours: only on a terminal, and never when `NO_COLOR` is set
/// to anything but the empty string (no-color.org).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_walship_log_then_rust_log() {
        use FilterSource::*;
        assert_eq!(
            filter(Some("warn"), Some("debug"), Some("trace")),
            (Flag, "warn")
        );
        assert_eq!(
            filter(None, Some("debug"), Some("trace")),
            (WalshipLog, "debug")
        );
        assert_eq!(filter(None, None, Some("trace")), (RustLog, "trace"));
        assert_eq!(filter(None, None, None), (Default, "info"));
    }

    #[test]
    fn an_empty_setting_counts_as_unset() {
        use FilterSource::*;
        assert_eq!(
            filter(Some(""), Some(" "), Some("debug")),
            (RustLog, "debug")
        );
        assert_eq!(filter(None, Some(""), Some("")), (Default, "info"));
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
