//! Tables the way patronictl prints them (prettytable with the cluster title in the top rule,
//! or tab-separated), so scripts and eyes trained on patronictl read ours unchanged.

/// Column alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

pub struct Table {
    pub columns: Vec<String>,
    pub align: Vec<Align>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn widths(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows
                    .iter()
                    .flat_map(|r| {
                        r.get(i)
                            .map(|v| v.lines().map(|l| l.chars().count()).max().unwrap_or(0))
                    })
                    .chain([c.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// prettytable's frame: `+----+` rules, one space of padding, the title written over the
    /// start of the top rule.
    pub fn pretty(&self, title: &str) -> String {
        let widths = self.widths();
        let rule: String = {
            let mut s = String::from("+");
            for w in &widths {
                s.push_str(&"-".repeat(w + 2));
                s.push('+');
            }
            s
        };
        let top = if title.is_empty() {
            rule.clone()
        } else {
            let rule_chars: Vec<char> = rule.chars().collect();
            let title: String = title.chars().take(rule_chars.len().saturating_sub(2)).collect();
            let used = 1 + title.chars().count();
            let mut s = String::from("+");
            s.push_str(&title);
            s.extend(&rule_chars[used..]);
            s
        };
        let line = |cells: &[String], header: bool| -> String {
            let height = cells.iter().map(|c| c.lines().count().max(1)).max().unwrap_or(1);
            let mut out = Vec::new();
            for row in 0..height {
                let mut s = String::from("|");
                for (i, w) in widths.iter().enumerate() {
                    let text = cells.get(i).and_then(|c| c.lines().nth(row)).unwrap_or("");
                    let pad = w - text.chars().count();
                    let align = if header { Align::Left } else { self.align[i] };
                    match align {
                        Align::Left => s.push_str(&format!(" {text}{} |", " ".repeat(pad))),
                        Align::Right => s.push_str(&format!(" {}{text} |", " ".repeat(pad))),
                    }
                }
                out.push(s);
            }
            out.join("\n")
        };
        let mut out = vec![top, line(&self.columns, true), rule.clone()];
        let multiline = self.rows.iter().any(|r| r.iter().any(|c| c.contains('\n')));
        for (i, row) in self.rows.iter().enumerate() {
            if multiline && i > 0 {
                out.push(rule.clone());
            }
            out.push(line(row, false));
        }
        out.push(rule);
        out.join("\n")
    }

    pub fn tsv(&self) -> String {
        std::iter::once(&self.columns)
            .chain(&self.rows)
            .map(|r| r.join("\t"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_table_matches_patronictl_layout() {
        let t = Table {
            columns: vec!["Member".into(), "Host".into(), "TL".into()],
            align: vec![Align::Left, Align::Left, Align::Right],
            rows: vec![
                vec!["node1".into(), "127.0.0.1:5432".into(), "1".into()],
                vec!["n2".into(), "127.0.0.1:5433".into(), "12".into()],
            ],
        };
        let expected = "\
+ Cluster: x (1) ---------+----+
| Member | Host           | TL |
+--------+----------------+----+
| node1  | 127.0.0.1:5432 |  1 |
| n2     | 127.0.0.1:5433 | 12 |
+--------+----------------+----+";
        assert_eq!(t.pretty(" Cluster: x (1) "), expected);
        assert_eq!(
            t.tsv(),
            "Member\tHost\tTL\nnode1\t127.0.0.1:5432\t1\nn2\t127.0.0.1:5433\t12"
        );
    }

    #[test]
    fn long_titles_are_cut_like_prettytable() {
        let t = Table {
            columns: vec!["A".into()],
            align: vec![Align::Left],
            rows: vec![],
        };
        assert_eq!(t.pretty(" Cluster: long "), "+ Cl+\n| A |\n+---+\n+---+");
    }
}
