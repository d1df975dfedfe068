//! The side-by-side table the pgvigil-vs-Patroni benchmarks print: one row per measurement,
//! one column per system, each cell the median and spread of that row's values.

use std::collections::BTreeMap;

use crate::summarize;

/// Values by row label and system name, in the order rows were first added.
#[derive(Default)]
pub struct Results {
    rows: Vec<String>,
    values: BTreeMap<(String, String), Vec<f64>>,
    units: BTreeMap<String, &'static str>,
}

impl Results {
    /// Adds one value of `row` for `system`. The unit `rows` (acknowledged rows lost) shows
    /// the total beside the median; `bytes`, `tps` and `writes` show no decimals.
    pub fn add(&mut self, row: &str, unit: &'static str, system: &str, v: f64) {
        if !self.rows.iter().any(|r| r == row) {
            self.rows.push(row.to_string());
        }
        self.units.insert(row.to_string(), unit);
        self.values
            .entry((row.to_string(), system.to_string()))
            .or_default()
            .push(v);
    }

    fn cell(&self, row: &str, system: &str) -> String {
        let Some(v) = self.values.get(&(row.to_string(), system.to_string())) else {
            return "-".into();
        };
        let unit = self.units.get(row).copied().unwrap_or("");
        let s = summarize(v).expect("a row has values once added");
        if unit == "rows" {
            let total: f64 = v.iter().sum();
            return format!(
                "{} ({}-{}); total {total:.0} in {} runs",
                s.median, s.min, s.max, s.n
            );
        }
        let digits = match (unit, s.max) {
            ("bytes" | "tps" | "writes", _) => 0,
            (_, m) if m >= 10.0 => 1,
            (_, m) if m >= 0.1 => 2,
            _ => 3,
        };
        format!(
            "{:.d$} {unit} ({:.d$}-{:.d$}, n={})",
            s.median,
            s.min,
            s.max,
            s.n,
            d = digits
        )
    }

    /// A markdown table with one column per system, in the order given.
    pub fn table(&self, systems: &[&str]) -> String {
        let mut out = format!("| Measurement | {} |\n|---|", systems.join(" | "));
        for _ in systems {
            out.push_str("---|");
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {row} |"));
            for s in systems {
                out.push_str(&format!(" {} |", self.cell(row, s)));
            }
            out.push('\n');
        }
        out
    }

    /// Every value, row by row, in the order measured.
    pub fn raw(&self) -> String {
        let mut out = String::new();
        for row in &self.rows {
            for ((r, system), v) in &self.values {
                if r != row {
                    continue;
                }
                let list: Vec<String> = v
                    .iter()
                    .map(|x| {
                        if x.fract() == 0.0 {
                            format!("{x:.0}")
                        } else {
                            format!("{x:.2}")
                        }
                    })
                    .collect();
                out.push_str(&format!("{row} / {system}: {}\n", list.join(" ")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_summarize_each_system() {
        let mut r = Results::default();
        for v in [3.0, 1.0, 2.0] {
            r.add("gap", "s", "a", v);
        }
        r.add("lost", "rows", "a", 0.0);
        r.add("lost", "rows", "a", 2.0);
        let t = r.table(&["a", "b"]);
        assert!(t.contains("| gap | 2.00 s (1.00-3.00, n=3) | - |"), "{t}");
        assert!(t.contains("| lost | 1 (0-2); total 2 in 2 runs | - |"), "{t}");
        assert_eq!(r.raw(), "gap / a: 3 1 2\nlost / a: 0 2\n");
    }
}
