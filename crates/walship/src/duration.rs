//! Durations on the command line and in config: `500ms`, `1s`, `5m`, `1h`, `2d`, or a
//! plain number of seconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A parsed duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurError(String);

impl fmt::Display for DurError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a duration (use e.g. 500ms, 1s, 5m, 1h, 7d)",
            self.0
        )
    }
}

impl std::error::Error for DurError {}

impl FromStr for Dur {
    type Err = DurError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| DurError(s.to_string()))?;
        let d = match unit {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(DurError(s.to_string())),
        };
        Ok(Dur(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_refuses_garbage() {
        assert_eq!("500ms".parse::<Dur>(), Ok(Dur(Duration::from_millis(500))));
        assert_eq!("5m".parse::<Dur>(), Ok(Dur(Duration::from_secs(300))));
        assert_eq!("2".parse::<Dur>(), Ok(Dur(Duration::from_secs(2))));
        for bad in ["", "m", "5 minutes", "-1s", "1.5s"] {
            assert!(bad.parse::<Dur>().is_err(), "{bad}");
        }
    }
}
