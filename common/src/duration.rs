//! Durations as operators write them in flags and environment variables:
//! `500ms`, `30s` (or a bare `30`), `5m`, `24h`, fractions allowed (`1.5s`).

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration; use e.g. 500ms, 30s, 5m or 24h")]
pub struct InvalidDuration(pub String);

/// Parses a duration; a negative value, an unknown unit or a value too large
/// for a [`Duration`] is refused, never a panic.
pub fn parse(s: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration(s.to_string());
    let trimmed = s.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let n: f64 = number.parse().map_err(|_| invalid())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_fractions() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse(" 24h "), Ok(Duration::from_secs(24 * 3600)));
    }

    #[test]
    fn refusals_name_the_value() {
        for bad in [
            "x",
            "5d",
            "-1s",
            "",
            "1000000000000000000000000h",
            "99999999999999999999999",
        ] {
            let error = parse(bad).unwrap_err();
            assert_eq!(error, InvalidDuration(bad.into()));
            assert!(error.to_string().contains("e.g. 500ms"), "{error}");
        }
    }
}
