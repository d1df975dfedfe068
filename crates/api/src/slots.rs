//! Replication slot names (`docs/patroni-compat.md` §5.8): how a member's name becomes its
//! physical slot's name, and which names PostgreSQL accepts. Shared by the engine (the slot set)
//! and the agent (creating the slots).

/// The slot name of a member (§5.8): lower-cased; `-` and `.` become `_`; any other character
/// outside `[a-z0-9_]` becomes `u` + its code point in (at least) 4 decimal digits; at most 63
/// characters.
pub fn slot_name_for(member: &str) -> String {
    let mut out = String::new();
    for c in member.to_lowercase().chars() {
        match c {
            'a'..='z' | '0'..='9' | '_' => out.push(c),
            '-' | '.' => out.push('_'),
            other => out.push_str(&format!("u{:04}", other as u32)),
        }
    }
    out.chars().take(63).collect()
}

/// A name PostgreSQL accepts for a replication slot: `[a-z0-9_]`, 1 to 63 characters.
pub fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert_eq!(slot_name_for("node-1"), "node_1");
        assert_eq!(slot_name_for("Pg.Node_2"), "pg_node_2");
        assert_eq!(slot_name_for("a b"), "au0032b");
        assert_eq!(slot_name_for("x@y"), "xu0064y");
        assert_eq!(slot_name_for("é"), "u0233");
        assert_eq!(slot_name_for("😀"), "u128512");
        assert_eq!(slot_name_for(&"a".repeat(70)).len(), 63);
        assert_eq!(slot_name_for(&"-".repeat(70)), "_".repeat(63));
        // Truncation happens after the replacement.
        let long = format!("{}#", "b".repeat(61));
        assert_eq!(slot_name_for(&long), format!("{}u0", "b".repeat(61)));
        for name in ["node-1", "Pg.Node_2", "a b", "😀"] {
            assert!(valid_slot_name(&slot_name_for(name)));
        }
        assert!(!valid_slot_name("Bad"));
        assert!(!valid_slot_name(""));
    }
}
