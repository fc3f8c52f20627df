//! How the report prints numbers. The HTML and the PDF both call these, so a number reads the
//! same in both (tests compare them with `run.json` through these functions' documented forms).
//!
//! ```
//! use compactor_report::format::*;
//! assert_eq!(count(1234567), "1,234,567");
//! assert_eq!(perplexity(12.34567), "12.346");
//! assert_eq!(percent(Some(3.14159)), "+3.14%");
//! assert_eq!(percent(None), "–");
//! assert_eq!(ratio(Some(0.5)), "0.50×");
//! assert_eq!(error(Some(0.012345)), "0.01235");
//! ```

/// What a missing value prints as.
pub const NONE: &str = "–";

/// An integer with `,` between thousands: `1,234,567`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count for people: `11.5 MB` (powers of 1000).
pub fn bytes_human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Perplexity, three decimals.
pub fn perplexity(p: f64) -> String {
    format!("{p:.3}")
}

/// A signed percentage, two decimals: `+3.14%`.
pub fn percent(p: Option<f64>) -> String {
    match p {
        Some(p) if p.is_finite() => format!("{p:+.2}%"),
        _ => NONE.into(),
    }
}

/// A ratio to the original, two decimals: `0.50×`.
pub fn ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{r:.2}×"),
        _ => NONE.into(),
    }
}

/// A relative error, four significant digits (`0.01235`, `1.234e-5` below 1e-3).
pub fn error(e: Option<f64>) -> String {
    match e {
        Some(e) if e.is_finite() => {
            if e != 0.0 && e.abs() < 1e-3 {
                format!("{e:.3e}")
            } else {
                format!("{e:.5}")
            }
        }
        _ => NONE.into(),
    }
}

/// Tokens per second, one decimal.
pub fn speed(t: f64) -> String {
    format!("{t:.1}")
}

/// Seconds, three significant-ish decimals.
pub fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// A loss value, four decimals.
pub fn loss(l: f64) -> String {
    format!("{l:.4}")
}

/// Ranks as `8` or `1×8×8×1`.
pub fn ranks(r: &[usize]) -> String {
    if r.is_empty() {
        return NONE.into();
    }
    r.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("×")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_groups_thousands() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(12345678), "12,345,678");
    }

    #[test]
    fn small_errors_switch_to_exponent() {
        assert_eq!(error(Some(0.25)), "0.25000");
        assert_eq!(error(Some(0.000123456)), "1.235e-4");
        assert_eq!(error(Some(0.0)), "0.00000");
        assert_eq!(error(Some(f64::NAN)), NONE);
    }

    #[test]
    fn bytes_human_uses_decimal_units() {
        assert_eq!(bytes_human(512), "512 B");
        assert_eq!(bytes_human(11_547_040), "11.5 MB");
    }
}
