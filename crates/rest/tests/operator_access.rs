//! The operator endpoints in-process (`docs/patroni-compat.md` §2.1, §2.6): what every protected
//! endpoint checks before it acts: authentication, then the request body.

mod operator_support;
mod support;

use operator_support::*;

#[tokio::test]
async fn every_operation_requires_authentication() {
    let mut server = start("pg1").await;
    for (method, path) in [
        ("POST", "/reload"),
        ("PATCH", "/config"),
        ("PUT", "/config"),
        ("POST", "/switchover"),
        ("POST", "/failover"),
        ("DELETE", "/switchover"),
        ("POST", "/restart"),
        ("DELETE", "/restart"),
        ("POST", "/reinitialize"),
    ] {
        let (status, body) = send_raw(&server, method, path, Some(r#"{"leader":"pg1"}"#), false).await;
        assert_eq!(
            (status, body.as_str()),
            (401, "no auth header received"),
            "{method} {path}"
        );
    }
    assert!(drain(&mut server).is_empty());
    assert!(server.dcs.writes().is_empty());
    // Unknown operations are not implemented, whoever asks.
    assert_eq!(send_raw(&server, "POST", "/nonsense", None, false).await.0, 501);
    assert_eq!(send_raw(&server, "DELETE", "/config", None, true).await.0, 501);
}

#[tokio::test]
async fn bodies_are_checked() {
    let mut server = start("pg1").await;
    for (method, path) in [
        ("PATCH", "/config"),
        ("PUT", "/config"),
        ("POST", "/switchover"),
        ("POST", "/failover"),
    ] {
        // Body required: no Content-Length → 411; not JSON, not an object, empty → 400.
        assert_eq!(
            send_raw(&server, method, path, None, true).await.0,
            411,
            "{method} {path}"
        );
        for bad in ["{", "[1,2]", "\"text\"", "{}", "", "null"] {
            let (status, body) = send_raw(&server, method, path, Some(bad), true).await;
            assert_eq!(status, 400, "{method} {path} {bad:?}");
            assert!(body.contains("Bad Request"), "{body}");
        }
    }
    // Optional bodies: absent or empty is fine, malformed is not.
    for path in ["/restart", "/reinitialize"] {
        for bad in ["{", "[]", "7"] {
            assert_eq!(
                send_raw(&server, "POST", path, Some(bad), true).await.0,
                400,
                "{path} {bad:?}"
            );
        }
    }
    assert!(drain(&mut server).is_empty());
    assert!(server.dcs.writes().is_empty());
}
