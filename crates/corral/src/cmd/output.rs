//! What the CLI shows people: sizes, durations, times and aligned tables. Pure
//! functions, unit-tested here; the commands only choose what goes in them.

use std::time::Duration;

/// Parses a size as people write it: `10GiB`, `512MiB`, `1G`, `4096`, `1.5GiB`.
///
/// `K`, `M`, `G`, `T`, `P` (with or without `i`/`iB`/`B` after an `i`) are powers
/// of 1024, as in qemu-img and Longhorn; `KB`, `MB`, `GB`, `TB`, `PB` are powers of
/// 1000. Case does not matter. A bare number is bytes. The result must be whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    if num.is_empty() {
        return Err(format!(
            "size {s:?}: expected a number with an optional unit (e.g. 10GiB, 512MiB, 1G, 4096)"
        ));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => {
            return Err(format!(
                "size {s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, or K, M, G, T)"
            ))
        }
    };
    let too_big = || format!("size {s:?} is too large");
    match num.split_once('.') {
        None => {
            let n: u64 = num.parse().map_err(|_| format!("size {s:?}: bad number"))?;
            n.checked_mul(mult).ok_or_else(too_big)
        }
        Some((int, frac)) => {
            if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
                return Err(format!("size {s:?}: bad number"));
            }
            // Exact decimal arithmetic: int * mult + frac * mult / 10^len.
            let i: u64 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| format!("size {s:?}: bad number"))?
            };
            let f: u128 = if frac.is_empty() {
                0
            } else {
                frac.parse()
                    .map_err(|_| format!("size {s:?}: bad number"))?
            };
            let scale = 10u128
                .checked_pow(frac.len() as u32)
                .ok_or_else(|| format!("size {s:?}: too many decimals"))?;
            let fb = f * mult as u128;
            if !fb.is_multiple_of(scale) {
                return Err(format!("size {s:?} is not a whole number of bytes"));
            }
            let whole = i.checked_mul(mult).ok_or_else(too_big)?;
            let part = u64::try_from(fb / scale).map_err(|_| too_big())?;
            whole.checked_add(part).ok_or_else(too_big)
        }
    }
}

/// Formats bytes with binary units: `1 GiB`, `512 MiB`, `1.5 GiB`, `4096 B`.
pub fn format_size(b: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, u) in UNITS {
        if b >= u {
            if b.is_multiple_of(u) {
                return format!("{} {name}", b / u);
            }
            let tenths = (b as u128 * 10 + u as u128 / 2) / u as u128;
            return format!("{}.{} {name}", tenths / 10, tenths % 10);
        }
    }
    format!("{b} B")
}

/// Parses a duration: `120s`, `2m`, `500ms`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected e.g. 120s, 2m, 500ms"))?;
    match unit.trim() {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" | "min" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        u => Err(format!(
            "duration {s:?}: unknown unit {u:?} (use ms, s, m, h)"
        )),
    }
}

/// How long ago `then` (Unix seconds) was, relative to `now`: `5s`, `3m`, `2h`, `4d`.
pub fn ago(then: u64, now: u64) -> String {
    if then == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(then);
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86_399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86_400),
    }
}

/// Unix seconds as an ISO 8601 UTC timestamp (`2026-11-25T08:11:36Z`).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A table of text with a header, columns aligned, two spaces apart, no
/// trailing blanks (so that `grep`, `awk` and `column` work on it).
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra ones are dropped. Cells are
    /// kept on one line (newlines become spaces) so rows stay rows.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut r: Vec<String> = cells
            .into_iter()
            .take(self.headers.len())
            .map(|c| c.replace(['\n', '\r', '\t'], " "))
            .collect();
        r.resize(self.headers.len(), String::new());
        self.rows.push(r);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prints the table on stdout, or when it has no rows, `hint` on stderr
    /// (a bare header says less than "no volumes (create one: …)").
    pub fn print_or(&self, hint: &str) {
        if self.is_empty() {
            eprintln!("{hint}");
        } else {
            print!("{}", self.render());
        }
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                line.push_str(c);
                if i + 1 < n {
                    let pad = w[i] - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `-` for an empty or absent value, so columns never look shifted.
pub fn or_dash(s: Option<&str>) -> String {
    match s {
        Some(x) if !x.is_empty() => x.to_string(),
        _ => "-".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_people_write() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size(" 64 MiB ").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
    }

    #[test]
    fn sizes_rejected_with_a_reason() {
        for bad in ["", "GiB", "ten", "1XB", "1.2.3G", "0.3B", "-1G", "."] {
            let e = parse_size(bad);
            assert!(e.is_err(), "{bad:?} parsed as {e:?}");
        }
        assert!(parse_size("99999999999PiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("1XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0.3B").unwrap_err().contains("whole number"));
    }

    #[test]
    fn sizes_shown() {
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1000), "1000 B");
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(10 << 40), "10 TiB");
        // Round trip of what is shown for whole units.
        for s in ["1 GiB", "512 MiB", "4 KiB"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_594_296), "2026-11-25T08:11:36Z");
        assert_eq!(ago(100, 105), "5s");
        assert_eq!(ago(100, 100 + 180), "3m");
        assert_eq!(ago(100, 100 + 7200), "2h");
        assert_eq!(ago(100, 100 + 4 * 86_400), "4d");
        assert_eq!(ago(0, 100), "never");
        assert_eq!(ago(200, 100), "0s", "clock skew shows as now");
    }

    #[test]
    fn tables_align_and_have_no_trailing_blanks() {
        let mut t = Table::new(&["NAME", "SIZE", "STATE"]);
        t.row(vec!["vol1".into(), "1 GiB".into(), "attached".into()]);
        t.row(vec![
            "a-much-longer-name".into(),
            "10 GiB".into(),
            "".into(),
        ]);
        t.row(vec!["short".into()]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "NAME                SIZE    STATE");
        assert_eq!(lines[1], "vol1                1 GiB   attached");
        assert_eq!(lines[2], "a-much-longer-name  10 GiB");
        assert_eq!(lines[3], "short");
        for l in &lines {
            assert_eq!(l.trim_end(), *l);
        }
        // Columns start at the same offset on every line.
        let col = lines[0].find("SIZE").unwrap();
        assert_eq!(lines[1].find("1 GiB").unwrap(), col);
        assert_eq!(lines[2].find("10 GiB").unwrap(), col);
    }

    #[test]
    fn table_cells_stay_on_one_line() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["x\ny".into(), "z".into(), "dropped".into()]);
        assert_eq!(t.render(), "A    B\nx y  z\n");
        assert!(!t.is_empty());
        assert!(Table::new(&["A"]).is_empty());
    }

    #[test]
    fn dashes() {
        assert_eq!(or_dash(None), "-");
        assert_eq!(or_dash(Some("")), "-");
        assert_eq!(or_dash(Some("x")), "x");
    }
}
