//! A bad configuration file is refused with a message naming the file, the key and the problem;
//! one whose etcd cannot be found says so, naming the key, instead of hanging silently.

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

/// `etcd3.srv` alone, for a domain no DNS answers for (`.invalid`, RFC 6761): the agent keeps
/// asking, like Patroni's "waiting on etcd", and says which records it asked, naming the key;
/// SIGTERM stops it.
#[test]
fn srv_discovery_that_finds_nothing_says_so_and_stops_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    let dir = tempfile::Builder::new()
        .prefix("pgvigil-srv-")
        .tempdir_in(pgvigil_testkit::test_tmp_root())
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = dir.path().join("srv.yml");
    let yaml = GOOD
        .replace("  hosts: 127.0.0.1:2379\n", "  srv: pgvigil-test.invalid\n")
        .replace(
            "listen: 127.0.0.1:8008",
            &format!("listen: 127.0.0.1:{}", pgvigil_testkit::free_port()),
        )
        .replace("/tmp/x", &dir.path().join("data").display().to_string());
    std::fs::write(&config, yaml).unwrap();
    let log = dir.path().join("agent.log");
    let out = std::fs::File::create(&log).unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut cmd = Command::new(AGENT);
    cmd.arg(&config)
        .current_dir(dir.path())
        .env_remove("PATRONI_NAME")
        .env("PGVIGIL_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user");
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let mut agent = pgvigil_testkit::process::spawn_owned(cmd).unwrap();
    let said = pgvigil_testkit::wait_until(
        "the agent to say SRV discovery found nothing",
        Duration::from_secs(120),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(Some(status)) = agent.try_wait() {
                panic!("the agent exited ({status}) instead of waiting on etcd:\n{text}");
            }
            text.contains("etcd3.srv: no etcd found").then_some(text)
        },
    );
    let text = said.unwrap_or_else(|e| {
        let _ = agent.kill();
        let _ = agent.wait();
        panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    });
    for record in [
        "_etcd-client-ssl._tcp.pgvigil-test.invalid",
        "_etcd-server._tcp.pgvigil-test.invalid",
    ] {
        assert!(text.contains(record), "{text}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exited = pgvigil_testkit::wait_until("the agent to stop on SIGTERM", Duration::from_secs(60), || {
        agent.try_wait().unwrap()
    });
    if exited.is_err() {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    exited.unwrap();
}
