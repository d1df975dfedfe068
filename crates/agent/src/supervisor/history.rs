//! The `history` key, built from PostgreSQL's `<timeline>.history` file (`docs/patroni-compat.md`
//! §1.3.7): one `[parent_timeline, switch_lsn, reason, timestamp, new_leader]` line per switch.

use pgvigil_api::HistoryEntry;
use pgvigil_api::lsn::parse_lsn;

/// Parses the text of a timeline history file: `parent<TAB>X/Y<TAB>reason` lines.
pub fn parse_history_file(text: &str) -> Vec<HistoryEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(3, char::is_whitespace);
            let parent_timeline = fields.next()?.parse().ok()?;
            let switch_lsn = parse_lsn(fields.next()?)?;
            let reason = fields.next().unwrap_or("").trim().to_string();
            Some(HistoryEntry {
                parent_timeline,
                switch_lsn,
                reason,
                timestamp: None,
                new_leader: None,
            })
        })
        .collect()
}

/// Combines the file's lines with what the DCS already had: earlier enrichments (timestamp,
/// leader name) are kept, and the newest line gets `timestamp` and `new_leader` when it has
/// none. `max_entries` > 0 keeps only that many of the newest lines.
pub fn enrich(
    mut from_file: Vec<HistoryEntry>,
    published: &[HistoryEntry],
    timestamp: &str,
    me: &str,
    max_entries: usize,
) -> Vec<HistoryEntry> {
    for entry in &mut from_file {
        if let Some(old) = published
            .iter()
            .find(|p| p.parent_timeline == entry.parent_timeline)
        {
            entry.timestamp = old.timestamp.clone();
            entry.new_leader = old.new_leader.clone();
        }
    }
    if let Some(last) = from_file.last_mut()
        && last.timestamp.is_none()
    {
        last.timestamp = Some(timestamp.to_string());
        last.new_leader = Some(me.to_string());
    }
    if max_entries > 0 && from_file.len() > max_entries {
        from_file.drain(..from_file.len() - max_entries);
    }
    from_file
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_history_files() {
        let text = "1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n";
        let h = parse_history_file(text);
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].parent_timeline, h[0].switch_lsn), (1, 0x300_0060));
        assert_eq!(h[1].reason, "at restore point \"x\"");
    }

    #[test]
    fn enrichment_keeps_old_and_marks_newest() {
        let file = parse_history_file("1\t0/10\ta\n2\t0/20\tb\n");
        let published = vec![HistoryEntry {
            parent_timeline: 1,
            switch_lsn: 16,
            reason: "a".into(),
            timestamp: Some("t1".into()),
            new_leader: Some("n1".into()),
        }];
        let h = enrich(file, &published, "t2", "n2", 0);
        assert_eq!(h[0].new_leader.as_deref(), Some("n1"));
        assert_eq!(
            (h[1].timestamp.as_deref(), h[1].new_leader.as_deref()),
            (Some("t2"), Some("n2"))
        );
        let trimmed = enrich(parse_history_file("1\t0/10\ta\n2\t0/20\tb\n"), &[], "t", "n", 1);
        assert_eq!(trimmed.len(), 1);
        assert_eq!(trimmed[0].parent_timeline, 2);
    }
}
