use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use super::*;

fn serve_echo(lab: &NetLab, i: usize, port: u16) -> std::thread::JoinHandle<()> {
    let addr = SocketAddr::from((lab.host_ip(i), port));
    let listener = lab.in_host(i, move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Round trip of one byte from host `from` (None: the root namespace) to `to`.
fn round_trip(lab: &NetLab, from: Option<usize>, to: SocketAddr) -> Option<Duration> {
    let attempt = move || -> Option<Duration> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(700)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let start = Instant::now();
        s.write_all(b"x").ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        Some(start.elapsed())
    };
    match from {
        None => attempt(),
        Some(i) => lab.in_host(i, attempt).unwrap(),
    }
}

#[test]
fn hosts_talk_partitions_cut_and_heal_and_impairment_delays() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = NetLab::create(3).unwrap();
    let ns: Vec<String> = lab.hosts().iter().map(|h| h.ns.clone()).collect();
    let port = 7700;
    let _servers: Vec<_> = (0..3).map(|i| serve_echo(&lab, i, port)).collect();
    let addr = |i: usize| SocketAddr::from((lab.host_ip(i), port));
    // Everyone reaches everyone.
    assert!(round_trip(&lab, None, addr(0)).is_some());
    assert!(round_trip(&lab, Some(1), addr(0)).is_some());
    assert!(round_trip(&lab, Some(0), addr(2)).is_some());
    // Isolated host 0: the other hosts cannot reach it nor it them; the root still can.
    lab.isolate(0).unwrap();
    assert!(round_trip(&lab, Some(1), addr(0)).is_none());
    assert!(round_trip(&lab, Some(0), addr(2)).is_none());
    assert!(round_trip(&lab, Some(1), addr(2)).is_some());
    assert!(round_trip(&lab, None, addr(0)).is_some());
    lab.heal(0).unwrap();
    assert!(round_trip(&lab, Some(1), addr(0)).is_some());
    // 150 ms on host 1's egress: every round trip with host 1 takes at least that.
    lab.impair(
        1,
        Impairment {
            delay: Duration::from_millis(150),
            ..Default::default()
        },
    )
    .unwrap();
    let rtt = round_trip(&lab, Some(0), addr(1)).expect("delayed, not lost");
    assert!(rtt >= Duration::from_millis(150), "{rtt:?}");
    lab.clear_impairment(1).unwrap();
    // Total loss: nothing gets through.
    lab.impair(
        1,
        Impairment {
            loss: 1.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(round_trip(&lab, Some(0), addr(1)).is_none());
    lab.clear_impairment(1).unwrap();
    assert!(round_trip(&lab, Some(0), addr(1)).is_some());
    // An unplugged host is unreachable from everywhere.
    lab.link_down(2).unwrap();
    assert!(round_trip(&lab, None, addr(2)).is_none());
    lab.link_up(2).unwrap();
    // A process started inside a host sees that host's address.
    let out = lab
        .command(0, "ip")
        .args(["-4", "-br", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&lab.host_ip(0).to_string()),
        "{out:?}"
    );
    let root_link = lab.root_link.clone();
    drop(lab);
    for n in ns {
        assert!(!Path::new("/run/netns").join(n).exists());
    }
    assert!(ip_quiet(&["link", "show", &root_link]).is_err());
}

#[test]
fn processes_run_inside_a_host_as_another_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let Some(user) = nix::unistd::User::from_name("postgres").ok().flatten() else {
        eprintln!("skipped: no postgres user");
        return;
    };
    let lab = NetLab::create(1).unwrap();
    let out = lab
        .command_as(0, "/bin/sh", user.uid, user.gid)
        .args(["-c", "id -u; ip -4 -br addr show eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("{}\n", user.uid)), "{text}");
    assert!(text.contains(&lab.host_ip(0).to_string()), "{text}");
    // kill_all reaches processes started inside the host.
    let mut child = crate::spawn_owned({
        let mut c = lab.command(0, "/bin/sleep");
        c.arg("300");
        c
    })
    .unwrap();
    assert_eq!(lab.pids(0), vec![child.id() as i32]);
    lab.kill_all(0).unwrap_or(());
    assert!(child.wait().is_ok());
    assert!(lab.pids(0).is_empty());
}
