# shellcheck shell=bash
# `scripts/demo.sh up --tls`: TLS everywhere, as a hardened Patroni deployment writes it.
# Sourced by demo.sh; everything here is a no-op unless TLS=1.
#
# A CA is generated with openssl into .demo/pki (never committed, removed by `down`):
#   ca.crt/ca.key          the demo CA
#   etcd.crt/key           etcd's server certificate; etcd demands client certificates
#   node<n>.crt/key        PostgreSQL's and the REST API's server certificate of node<n>, also
#                          its client certificate for etcd and for the other members' APIs
#   superuser.crt/key      client certificate of the postgres role (CN=postgres)
#   replication.crt/key    client certificate of the replicator role (CN=replicator)
#   client.crt/key/pem     the operator's certificate (curl, etcdctl, HAProxy's health checks)
# PostgreSQL accepts TCP connections only as `hostssl ... clientcert=verify-ca`; the REST APIs
# want a client certificate (`verify_client: required`).

TLS=${TLS:-0}

tls_scheme() { if ((TLS)); then echo https; else echo http; fi; }

# tls_issue DIR NAME CN OWNER [SAN]: a key and a certificate signed by DIR/ca.
tls_issue() {
    local dir=$1 name=$2 cn=$3 owner=$4 san=${5:-} ext
    ext=$(mktemp)
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        [[ -n $san ]] && echo "subjectAltName=$san"
    } >"$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$cn" 2>/dev/null
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 30 -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
    rm -f "$ext" "$dir/$name.csr"
    chmod 0600 "$dir/$name.key"
    chown "$owner:$owner" "$dir/$name.key" "$dir/$name.crt"
}

tls_make_pki() {
    ((TLS)) || return 0
    local d=$1 p=$1/pki n
    install -d -m 0755 "$p"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -keyout "$p/ca.key" -out "$p/ca.crt" -subj "/CN=pgvigil demo CA" 2>/dev/null
    chmod 0600 "$p/ca.key"
    local local_names="IP:127.0.0.1,DNS:localhost"
    tls_issue "$p" etcd etcd root "$local_names"
    for n in "${NODES[@]}"; do tls_issue "$p" "node$n" "node$n" postgres "$local_names"; done
    tls_issue "$p" superuser postgres postgres
    tls_issue "$p" replication replicator postgres
    tls_issue "$p" client operator root
    cat "$p/client.crt" "$p/client.key" >"$p/client.pem"
    chmod 0600 "$p/client.pem"
    say "generated a CA and certificates in $p (openssl)"
}

# Extra etcd arguments.
tls_etcd_args() {
    ((TLS)) || return 0
    local p=$1/pki
    printf '%s\n' --cert-file "$p/etcd.crt" --key-file "$p/etcd.key" --trusted-ca-file "$p/ca.crt" --client-cert-auth
}

# Extra etcdctl / curl arguments (the operator's client certificate).
tls_etcdctl_args() {
    ((TLS)) || return 0
    local p=$1/pki
    printf '%s\n' --cacert="$p/ca.crt" --cert="$p/client.crt" --key="$p/client.key"
}
tls_curl_args() {
    ((TLS)) || return 0
    local p=$1/pki
    printf '%s\n' --cacert "$p/ca.crt" --cert "$p/client.crt" --key "$p/client.key"
}

# YAML fragments of node N's configuration, in the sections a Patroni user puts them.
tls_yaml_restapi() {
    ((TLS)) || return 0
    local n=$1 p=$2/pki
    cat <<EOF
  certfile: $p/node$n.crt
  keyfile: $p/node$n.key
  cafile: $p/ca.crt
  verify_client: required

# How this member (and patronictl/pgvigilctl given this file) calls the members' REST APIs.
ctl:
  certfile: $p/node$n.crt
  keyfile: $p/node$n.key
  cacert: $p/ca.crt
EOF
}
tls_yaml_etcd() {
    ((TLS)) || return 0
    local n=$1 p=$2/pki
    cat <<EOF
  protocol: https
  cacert: $p/ca.crt
  cert: $p/node$n.crt
  key: $p/node$n.key
EOF
}
# tls_yaml_role DIR superuser|replication MODE
tls_yaml_role() {
    ((TLS)) || return 0
    local p=$1/pki role=$2 mode=$3
    cat <<EOF
      sslmode: $mode
      sslrootcert: $p/ca.crt
      sslcert: $p/$role.crt
      sslkey: $p/$role.key
EOF
}
tls_yaml_parameters() {
    ((TLS)) || return 0
    local n=$1 p=$2/pki
    cat <<EOF
    ssl: 'on'
    ssl_cert_file: $p/node$n.crt
    ssl_key_file: $p/node$n.key
    ssl_ca_file: $p/ca.crt
EOF
}
# pg_hba lines for TCP connections.
tls_yaml_hba() {
    if ((TLS)); then
        cat <<EOF
  - hostssl all all 127.0.0.1/32 md5 clientcert=verify-ca
  - hostssl replication replicator 127.0.0.1/32 md5 clientcert=verify-ca
EOF
    else
        cat <<EOF
  - host all all 127.0.0.1/32 md5
  - host replication replicator 127.0.0.1/32 md5
EOF
    fi
}

# libpq keywords for connecting as the postgres role with its certificate.
tls_libpq() {
    ((TLS)) || return 0
    local p=$1/pki
    printf ' sslmode=verify-ca sslrootcert=%s sslcert=%s sslkey=%s' "$p/ca.crt" "$p/superuser.crt" "$p/superuser.key"
}

# HAProxy's health-check options for one server line.
tls_haproxy_check() {
    ((TLS)) || return 0
    local p=$1/pki
    printf ' check-ssl crt %s ca-file %s verify required' "$p/client.pem" "$p/ca.crt"
}
