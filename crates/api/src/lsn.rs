//! LSNs are stored as absolute byte positions (Patroni writes `pg_wal_lsn_diff(lsn, '0/0')`);
//! PostgreSQL and `patronictl` show them as `X/Y`.

/// Formats a byte position the way PostgreSQL prints a `pg_lsn`: `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses PostgreSQL's `X/Y` text form.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > 0xffff_ffff || lo > 0xffff_ffff {
        return None;
    }
    Some((hi << 32) | lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for lsn in [0, 1, 0x16_B374_D848, u64::MAX >> 1] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
        assert_eq!(format_lsn(0x3_0000_0060), "3/60");
        assert_eq!(parse_lsn("0/3000060"), Some(0x300_0060));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/FFFFFFFFF"), None);
    }
}
