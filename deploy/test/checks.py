#!/usr/bin/env python3
"""What deploy/test/e2e.sh checks, run on the control node (the control container).

    checks.py cluster    --hosts A,B,C --vip V     one leader, two streaming replicas, the ports,
                                                   pgvigilctl list == /cluster, patronictl list
    checks.py writer     --target V:5000 --out F --stop F2   writes unique ids until F2 exists
    checks.py verify     --target V:5000 --writes F          acknowledged ids all present?
    checks.py state      --target V:5000                     sysid, timeline and row count

Every wait is bounded; every failure exits non-zero with what was seen.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

import psycopg2

SECRETS = os.environ.get("E2E_SECRETS", "/work/ansible/secrets/pgvigil")


def password():
    with open(os.path.join(SECRETS, "superuser")) as f:
        # The password lookup stores "password salt=..." when it adds a salt; the first word is it.
        return f.read().split()[0]


def connect(hostport, timeout=3):
    host, port = hostport.rsplit(":", 1)
    return psycopg2.connect(host=host, port=int(port), user="postgres", password=password(),
                            dbname="postgres", connect_timeout=timeout,
                            application_name="pgvigil-e2e")


def get_json(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read().decode())


class Mismatch(Exception):
    """A check that may pass on a later try (the cluster is still settling)."""


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def wait(what, fn, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
            last = "condition not met"
        except Exception as e:  # noqa: BLE001 - reported if the wait runs out
            last = f"{type(e).__name__}: {e}"
        time.sleep(1)
    fail(f"{what}: not within {timeout} s (last: {last})")


def ssh(host, *cmd):
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                           f"root@{host}", *cmd], capture_output=True, text=True, timeout=60)


def cluster_view(hosts):
    views = {}
    for h in hosts:
        _, doc = get_json(f"http://{h}:8008/cluster")
        views[h] = doc
    return views


def healthy(doc, n):
    members = doc.get("members", [])
    leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
    others = [m for m in members if m.get("role") != "leader"]
    return (len(members) == n and len(leaders) == 1
            and all(m.get("state") == "streaming" for m in others))


def cmd_cluster(args):
    hosts = args.hosts.split(",")
    n = len(hosts)

    def settled():
        views = cluster_view(hosts)
        if not all(healthy(v, n) for v in views.values()):
            return None
        leaders = {next(m["name"] for m in v["members"] if m["role"] == "leader") for v in views.values()}
        return views if len(leaders) == 1 else None

    views = wait("every host's /cluster shows one running leader and streaming replicas", settled,
                 args.timeout)
    doc = views[hosts[0]]
    leader = next(m for m in doc["members"] if m["role"] == "leader")
    print(f"ok  /cluster on every host: leader {leader['name']} ({leader['host']}), replicas "
          + ", ".join(f"{m['name']} {m['state']}" for m in doc["members"] if m["role"] != "leader"))

    # Writes through 5000 on every host (and the floating address) land on the primary.
    targets = [f"{h}:5000" for h in hosts] + ([f"{args.vip}:5000"] if args.vip else [])
    for t in targets:
        def write_lands(t=t):
            with connect(t) as c, c.cursor() as cur:
                cur.execute("create table if not exists e2e_probe (via text, at timestamptz default now())")
                cur.execute("insert into e2e_probe (via) values (%s)", (t,))
                cur.execute("select pg_is_in_recovery(), host(inet_server_addr())")
                return cur.fetchone()
        in_recovery, server = wait(f"a write through {t}", write_lands, 60)
        if in_recovery or server != leader["host"]:
            fail(f"a write through {t} reached {server} (in recovery: {in_recovery}), not the primary {leader['host']}")
    print(f"ok  writes through port 5000 of {len(targets)} addresses reached the primary {leader['host']}")

    # 5001 never reaches the primary: several connections per host (round robin).
    for h in hosts:
        for _ in range(4):
            with connect(f"{h}:5001") as c, c.cursor() as cur:
                cur.execute("select pg_is_in_recovery(), host(inet_server_addr())")
                in_recovery, server = cur.fetchone()
                if not in_recovery or server == leader["host"]:
                    fail(f"port 5001 of {h} reached {server} (in recovery: {in_recovery}), the primary")
    print("ok  port 5001 of every host reached replicas only (4 connections each)")

    for h in hosts:
        with urllib.request.urlopen(f"http://{h}:7000/", timeout=5) as r:
            if r.status != 200:
                fail(f"stats page on {h}:7000 answered {r.status}")
    print("ok  the stats page answers on port 7000 of every host")

    # pgvigilctl list (on each host) and the real patronictl (from the control node, against the
    # same etcd) agree with /cluster.
    def agrees(what, run):
        def once():
            _, now = get_json(f"http://{hosts[0]}:8008/cluster")
            expected = sorted((m["name"], m["role"].replace("_", " ").title(), m["state"]) for m in now["members"])
            result = run()
            if result.returncode != 0:
                raise Mismatch(f"{what} failed: {result.stderr.strip()}")
            got = sorted((m["Member"], m["Role"], m["State"]) for m in json.loads(result.stdout))
            if got != expected:
                raise Mismatch(f"{what} shows {got}, /cluster shows {expected}")
            return True
        wait(f"{what} agreeing with /cluster", once, 60)

    for h in hosts:
        agrees(f"pgvigilctl list on {h}",
               lambda h=h: ssh(h, "pgvigilctl", "-c", "/etc/pgvigil/pgvigil.yml", "list", "-f", "json"))
    print("ok  pgvigilctl list on every host agrees with /cluster")
    conf = "/tmp/patronictl.yml"
    with open(conf, "w") as f:
        f.write(f"scope: {args.scope}\nnamespace: /service\netcd3:\n  hosts: {','.join(h + ':2379' for h in hosts)}\n")
    agrees("patronictl list", lambda: subprocess.run(["patronictl", "-c", conf, "list", "-f", "json"],
                                                     capture_output=True, text=True, timeout=60))
    print("ok  the real patronictl list agrees")
    print(json.dumps({"leader": leader["name"], "leader_host": leader["host"]}))


def cmd_writer(args):
    """Writes ids 1, 2, ... through one connection, reconnecting after any error. An id is
    acknowledged when its commit returned. A failure on an established connection is a failed
    transaction (it was in flight); a refused or failed connect is not (nothing was sent)."""
    acked, failed_tx, connect_errors = [], 0, 0
    gaps = []  # (start, end) of every pause between two acknowledged commits longer than 0.5 s
    last_ack = None
    next_id = 1
    conn = None
    started = time.time()
    while not os.path.exists(args.stop):
        if conn is None:
            try:
                conn = connect(args.target, timeout=2)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("create table if not exists e2e_writes (id bigint primary key, at timestamptz default now())")
            except Exception:  # noqa: BLE001 - counted, then retried
                connect_errors += 1
                conn = None
                time.sleep(0.05)
                continue
        try:
            with conn.cursor() as cur:
                cur.execute("insert into e2e_writes (id) values (%s) on conflict do nothing", (next_id,))
            now = time.time()
            acked.append(next_id)
            if last_ack is not None and now - last_ack > 0.5:
                gaps.append((last_ack, now))
            last_ack = now
            next_id += 1
        except Exception as e:  # noqa: BLE001 - counted, then reconnect
            failed_tx += 1
            print(f"writer: transaction {next_id} failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", flush=True)
            next_id += 1  # its fate is unknown: never reuse the id
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            conn = None
            continue
        time.sleep(args.interval)
    result = {"acked": acked, "failed_transactions": failed_tx, "connect_errors": connect_errors,
              "gaps": gaps, "started": started, "stopped": time.time()}
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f)
    os.rename(args.out + ".tmp", args.out)


def cmd_verify(args):
    with open(args.writes) as f:
        w = json.load(f)
    acked = set(w["acked"])

    def present():
        with connect(args.target) as c, c.cursor() as cur:
            cur.execute("select id from e2e_writes")
            return {r[0] for r in cur.fetchall()}

    rows = wait(f"reading the writes through {args.target}", present, 120)
    lost = sorted(acked - rows)
    gaps = sorted(((e - s) for s, e in w["gaps"]), reverse=True)
    print(f"writes: {len(acked)} acknowledged, {len(lost)} of them lost; {w['failed_transactions']} failed "
          f"transactions (in flight when a connection broke), {w['connect_errors']} refused/failed connects")
    print("write pauses over 0.5 s: " + (", ".join(f"{g:.2f} s" for g in gaps) if gaps else "none"))
    for s, e in sorted(w["gaps"], key=lambda g: g[0] - g[1])[:3]:
        print(f"  pause of {e - s:.2f} s from {time.strftime('%H:%M:%S', time.gmtime(s))}.{int(s * 1000) % 1000:03d}"
              f" to {time.strftime('%H:%M:%S', time.gmtime(e))}.{int(e * 1000) % 1000:03d} UTC")
    print(json.dumps({"acked": len(acked), "lost": len(lost), "failed_transactions": w["failed_transactions"],
                      "max_gap": round(gaps[0], 2) if gaps else 0.0,
                      "pauses_over_3s": sum(1 for g in gaps if g > 3.0)}))
    if lost:
        fail(f"acknowledged writes lost: {lost[:20]}{' ...' if len(lost) > 20 else ''}")


def cmd_state(args):
    def read():
        with connect(args.target) as c, c.cursor() as cur:
            cur.execute("select system_identifier from pg_control_system()")
            sysid = cur.fetchone()[0]
            cur.execute("select timeline_id from pg_control_checkpoint()")
            tl = cur.fetchone()[0]
            cur.execute("select count(*) from e2e_writes")
            rows = cur.fetchone()[0]
            if rows <= args.min_rows and args.min_rows:
                return None
            return {"sysid": str(sysid), "timeline": tl, "rows": rows}
    print(json.dumps(wait(f"reading the state through {args.target}", read, args.timeout)))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cluster")
    c.add_argument("--hosts", required=True)
    c.add_argument("--vip", default="")
    c.add_argument("--scope", default="pgvigil")
    c.add_argument("--timeout", type=int, default=300)
    w = sub.add_parser("writer")
    w.add_argument("--target", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--stop", required=True)
    w.add_argument("--interval", type=float, default=0.02)
    v = sub.add_parser("verify")
    v.add_argument("--target", required=True)
    v.add_argument("--writes", required=True)
    s = sub.add_parser("state")
    s.add_argument("--target", required=True)
    s.add_argument("--timeout", type=int, default=300)
    s.add_argument("--min-rows", type=int, default=0, help="wait until e2e_writes has more rows than this")
    args = p.parse_args()
    {"cluster": cmd_cluster, "writer": cmd_writer, "verify": cmd_verify, "state": cmd_state}[args.cmd](args)


if __name__ == "__main__":
    main()
