//! `restapi.ciphers`: an OpenSSL cipher list applied to the TLS 1.2 suites rustls offers.
//!
//! Patroni hands the string to Python's `SSLContext.set_ciphers`, which restricts TLS 1.2 and
//! older and leaves TLS 1.3 alone; pgvigil does the same. OpenSSL's list syntax is followed for
//! what can select among rustls' six TLS 1.2 suites: names (`ECDHE-RSA-AES256-GCM-SHA384`),
//! aliases (`HIGH`, `ECDHE`, `AESGCM`, `aRSA`, ...), `A+B` intersections, `!X` and `-X`
//! removals; `+X` (ordering) and `@...` directives do not change the set. Like OpenSSL, words
//! that match nothing are ignored, and a list that selects no suite at all is an error.

use rustls::CipherSuite;

/// rustls' TLS 1.2 suites (ring provider): OpenSSL name, suite, OpenSSL aliases that match it.
const TLS12_SUITES: &[(&str, CipherSuite, &[&str])] = &[
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        &["aECDSA", "ECDSA", "AESGCM", "AES", "AES128", "SHA256"],
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        &["aECDSA", "ECDSA", "AESGCM", "AES", "AES256", "SHA384"],
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        &["aECDSA", "ECDSA", "CHACHA20", "SHA256"],
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        &["aRSA", "AESGCM", "AES", "AES128", "SHA256"],
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        &["aRSA", "AESGCM", "AES", "AES256", "SHA384"],
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        &["aRSA", "CHACHA20", "SHA256"],
    ),
];

/// Aliases every one of the suites above matches.
const COMMON_ALIASES: &[&str] = &[
    "ALL", "DEFAULT", "HIGH", "ECDHE", "EECDH", "kEECDH", "kECDHE", "ECDH", "AEAD", "TLSv1.2", "SSLv3",
];

fn matches(name: &str, aliases: &[&str], word: &str) -> bool {
    word.split('+').all(|part| {
        part.eq_ignore_ascii_case(name) || aliases.contains(&part) || COMMON_ALIASES.contains(&part)
    })
}

/// The TLS 1.2 suites an OpenSSL cipher list selects, or why it selects none.
pub fn select_tls12_suites(list: &str) -> Result<Vec<CipherSuite>, String> {
    let mut chosen: Vec<CipherSuite> = Vec::new();
    let mut banned: Vec<CipherSuite> = Vec::new();
    for word in list
        .split([':', ',', ' '])
        .map(str::trim)
        .filter(|w| !w.is_empty())
    {
        if word.starts_with('@') || word.starts_with('+') {
            continue;
        }
        let (op, word) = match word.as_bytes()[0] {
            b'!' | b'-' => (word.as_bytes()[0], &word[1..]),
            _ => (b' ', word),
        };
        for (name, suite, aliases) in TLS12_SUITES {
            if !matches(name, aliases, word) {
                continue;
            }
            match op {
                b'!' => {
                    banned.push(*suite);
                    chosen.retain(|s| s != suite);
                }
                b'-' => chosen.retain(|s| s != suite),
                _ => {
                    if !banned.contains(suite) && !chosen.contains(suite) {
                        chosen.push(*suite);
                    }
                }
            }
        }
    }
    if chosen.is_empty() {
        let names: Vec<&str> = TLS12_SUITES.iter().map(|(n, _, _)| *n).collect();
        return Err(format!(
            "{list:?} selects none of the TLS 1.2 cipher suites pgvigil supports ({})",
            names.join(", ")
        ));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_removals() {
        let all = select_tls12_suites("HIGH:!aNULL:!MD5").unwrap();
        assert_eq!(all.len(), 6);
        let rsa_gcm = select_tls12_suites("ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256").unwrap();
        assert_eq!(
            rsa_gcm,
            [
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );
        let no_chacha = select_tls12_suites("ECDHE+AESGCM:!CHACHA20:@STRENGTH").unwrap();
        assert_eq!(no_chacha.len(), 4);
        let banned_stays_out = select_tls12_suites("!aECDSA:ALL").unwrap();
        assert_eq!(banned_stays_out.len(), 3);
        let minus_can_return = select_tls12_suites("ALL:-aECDSA:ECDSA").unwrap();
        assert_eq!(minus_can_return.len(), 6);
    }

    #[test]
    fn a_list_that_selects_nothing_is_an_error() {
        let e = select_tls12_suites("DES-CBC3-SHA:RC4-SHA").unwrap_err();
        assert!(
            e.contains("selects none") && e.contains("ECDHE-RSA-AES128-GCM-SHA256"),
            "{e}"
        );
        assert!(select_tls12_suites("").is_err());
    }
}
