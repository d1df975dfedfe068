//! The `history` key, built from PostgreSQL's `<timeline>.history` file (`docs/patroni-compat.md`
//! §1.3.7): one `[parent_timeline, switch_lsn, reason, timestamp, new_leader]` line per switch.

use pgvigil_api::HistoryEntry;
use pgvigil_api::lsn::{format_lsn, parse_lsn};
use pgvigil_api::values::cluster_timeline;

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

/// Adds a line for every timeline number `from_file` skips on its way to `timeline`: the ones a
/// promotion reserved (see [`reservations`]). PostgreSQL's file does not list them (its new
/// timeline's parent is the one it replayed), but the `history` key must lead to the leader's
/// timeline, or every member would wait for it forever (the cluster's timeline is the last
/// line's plus one). In this history a skipped timeline is empty: it ends where it began.
pub fn fill_skipped(from_file: Vec<HistoryEntry>, timeline: u64) -> Vec<HistoryEntry> {
    let mut out: Vec<HistoryEntry> = Vec::with_capacity(from_file.len());
    let next_parents: Vec<u64> = from_file
        .iter()
        .skip(1)
        .map(|e| e.parent_timeline)
        .chain(std::iter::once(timeline))
        .collect();
    for (entry, next) in from_file.into_iter().zip(next_parents) {
        let (from, at) = (entry.parent_timeline, entry.switch_lsn);
        out.push(entry);
        for skipped in from + 1..next {
            out.push(HistoryEntry {
                parent_timeline: skipped,
                switch_lsn: at,
                reason: "reserved: started by a promotion elsewhere".into(),
                timestamp: None,
                new_leader: None,
            });
        }
    }
    out
}

/// The timeline history files a promotion from `own_timeline` needs in `pg_wal` so that
/// PostgreSQL starts a timeline number nobody has used (`docs/patroni-compat.md` §5.6).
///
/// PostgreSQL numbers the new timeline one above the newest history file it can find. A node
/// that never received a promotion made elsewhere (that leader published the timeline, then
/// stopped before anyone streamed from it) would start the same number again: a second history
/// under one number, which neither pg_rewind nor a replica can tell from the first. One file
/// per timeline the published `history` knows above ours, each holding our own history
/// (`own_history`, the text of our timeline's file, empty on timeline 1) and the published
/// switches from our timeline on, so PostgreSQL can read it like one of its own.
pub fn reservations(own_timeline: u64, own_history: &str, published: &[HistoryEntry]) -> Vec<(u64, String)> {
    let mut text: String = own_history
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    let mut out = Vec::new();
    for timeline in own_timeline + 1..=cluster_timeline(published) {
        if let Some(e) = published.iter().find(|e| e.parent_timeline == timeline - 1)
            && e.parent_timeline >= own_timeline
        {
            let reason = e.reason.replace(['\n', '\r'], " ");
            text.push_str(&format!(
                "{}\t{}\t{reason}\n",
                e.parent_timeline,
                format_lsn(e.switch_lsn)
            ));
        }
        out.push((timeline, text.clone()));
    }
    out
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

    fn published(entries: &[(u64, u64)]) -> Vec<HistoryEntry> {
        entries
            .iter()
            .map(|&(parent_timeline, switch_lsn)| HistoryEntry {
                parent_timeline,
                switch_lsn,
                reason: "no recovery target specified".into(),
                timestamp: None,
                new_leader: None,
            })
            .collect()
    }

    #[test]
    fn reservations_cover_every_published_timeline_above_ours() {
        // We are on timeline 2; the cluster went 2 -> 3 at 0/5000028 and 3 -> 4 at 0/6000000.
        let history = published(&[(1, 0x300_0060), (2, 0x500_0028), (3, 0x600_0000)]);
        let files = reservations(2, "1\t0/3000060\tno recovery target specified\n", &history);
        assert_eq!(
            files,
            vec![
                (
                    3,
                    "1\t0/3000060\tno recovery target specified\n\
                     2\t0/5000028\tno recovery target specified\n"
                        .to_string()
                ),
                (
                    4,
                    "1\t0/3000060\tno recovery target specified\n\
                     2\t0/5000028\tno recovery target specified\n\
                     3\t0/6000000\tno recovery target specified\n"
                        .to_string()
                ),
            ]
        );
        // What we write reads back as a PostgreSQL history file.
        assert_eq!(parse_history_file(&files[1].1).len(), 3);
        // Nothing to reserve when we are on the cluster's newest timeline, or ahead of it.
        assert!(reservations(4, "", &history).is_empty());
        assert!(reservations(5, "", &history).is_empty());
        assert!(reservations(1, "", &[]).is_empty());
    }

    #[test]
    fn skipped_timelines_get_empty_lines() {
        // Timeline 4 promoted from 1 at 0/10, reserving 2 and 3; later 4 -> 6 at 0/40 (5 reserved).
        let filled = fill_skipped(parse_history_file("1\t0/10\ta\n4\t0/40\tb\n"), 6);
        let lines: Vec<(u64, u64)> = filled.iter().map(|e| (e.parent_timeline, e.switch_lsn)).collect();
        assert_eq!(lines, vec![(1, 0x10), (2, 0x10), (3, 0x10), (4, 0x40), (5, 0x40)]);
        assert_eq!(cluster_timeline(&filled), 6);
        // Nothing skipped, nothing added.
        let plain = parse_history_file("1\t0/10\ta\n2\t0/20\tb\n");
        assert_eq!(fill_skipped(plain.clone(), 3), plain);
    }
}
