//! A bad configuration file is refused with a message naming the file, the key and the problem.

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_pgvigil");

fn run_with(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(AGENT)
        .arg(&path)
        .env_remove("PATRONI_NAME")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (out.status.code().unwrap_or(-1), text)
}

const GOOD: &str = "scope: s\nname: pg1\nrestapi:\n  listen: 127.0.0.1:8008\netcd3:\n  hosts: 127.0.0.1:2379\npostgresql:\n  listen: 127.0.0.1:5432\n  connect_address: 127.0.0.1:5432\n  data_dir: /tmp/x\n  authentication:\n    superuser:\n      username: postgres\n    replication:\n      username: rep\n";

#[test]
fn wrong_type_names_file_and_key() {
    let (code, err) = run_with(&GOOD.replace("listen: 127.0.0.1:8008", "listen: [1, 2]"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("FILE") && err.contains("restapi.listen"), "{err}");
}

#[test]
fn missing_required_key_is_named() {
    let (code, err) = run_with(&GOOD.replace("  data_dir: /tmp/x\n", ""));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("postgresql.data_dir") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_error_has_a_position() {
    let (code, err) = run_with("scope: s\nname: [unclosed\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("FILE") && err.contains("line"), "{err}");
}

#[test]
fn unknown_keys_are_warned_about_by_validate_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yml");
    std::fs::write(&path, format!("{GOOD}postgresql_typo: 1\n")).unwrap();
    let out = Command::new(AGENT)
        .arg(&path)
        .arg("--validate-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgresql_typo"), "{err}");
}
