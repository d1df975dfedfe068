//! The `vip:` section read by `pgvigil vip`: absent means no floating address; values, the
//! default prefix length, and refusals that name the key.

mod common;

use std::net::Ipv4Addr;

use common::*;
use pgvigil_config::VipConfig;
use serde_json::json;

#[test]
fn absent_section_means_no_floating_address() {
    assert_eq!(load_value(&minimal()).unwrap().config.vip, None);
}

#[test]
fn every_key_is_read() {
    let mut v = minimal();
    set(
        &mut v,
        "vip",
        json!({"ip": "10.0.0.200", "netmask": "24", "interface": "eth0"}),
    );
    let vip = load_value(&v).unwrap().config.vip;
    let expected = VipConfig {
        ip: Ipv4Addr::new(10, 0, 0, 200),
        netmask: 24,
        interface: "eth0".into(),
    };
    assert_eq!(vip, Some(expected));
    set(&mut v, "vip", json!({"ip": "10.0.0.200", "interface": "ens3"}));
    assert_eq!(
        load_value(&v).unwrap().config.vip.unwrap().netmask,
        32,
        "a host address by default"
    );
}

#[test]
fn bad_values_name_the_key() {
    for (section, key, says) in [
        (json!({"interface": "eth0"}), "vip.ip", "missing"),
        (
            json!({"ip": "10.0.0.200/24", "interface": "eth0"}),
            "vip.ip",
            "without a prefix",
        ),
        (
            json!({"ip": "127.0.0.5", "interface": "eth0"}),
            "vip.ip",
            "cannot be a floating address",
        ),
        (json!({"ip": "fe80::1", "interface": "eth0"}), "vip.ip", "IPv4"),
        (
            json!({"ip": "10.0.0.200", "netmask": 33, "interface": "eth0"}),
            "vip.netmask",
            "1 to 32",
        ),
        (json!({"ip": "10.0.0.200"}), "vip.interface", "missing"),
        (
            json!({"ip": "10.0.0.200", "interface": "lo"}),
            "vip.interface",
            "loopback",
        ),
        (
            json!({"ip": "10.0.0.200", "interface": "eth0/1"}),
            "vip.interface",
            "interface name",
        ),
    ] {
        let mut v = minimal();
        set(&mut v, "vip", section.clone());
        let e = load_value(&v).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(says), "{section}: {e}");
    }
}
