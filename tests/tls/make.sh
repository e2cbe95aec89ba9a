#!/usr/bin/env bash
# Makes the TLS fixtures of tests/it/replicas.rs `replicas_reach_an_engine_over_tls` (committed; run again
# only to replace them): a CA, the test Engine's certificate (127.0.0.1, localhost) and a client
# certificate it signed, as DOCKER_CERT_PATH lays them out (ca.pem, cert.pem, key.pem) in engine/;
# and in untrusted/ the same client with the CA of someone else, who did not sign the Engine's.
# EC P-256 keys, X.509 v3, valid for 100 years. Test keys only: they protect nothing.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
days=36500
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
ca() { # ca NAME KEY CERT
  key "$2"
  openssl req -x509 -new -key "$2" -out "$3" -days $days -subj "/CN=$1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
leaf() { # leaf CN KEY CERT EXT
  key "$2"
  openssl req -new -key "$2" -out "$tmp/req.csr" -subj "/CN=$1"
  printf '%s\n' "$4" >"$tmp/ext"
  openssl x509 -req -in "$tmp/req.csr" -CA engine/ca.pem -CAkey "$tmp/ca.key" -CAcreateserial \
    -out "$3" -days $days -extfile "$tmp/ext"
}
mkdir -p engine untrusted
ca "sluicegate test CA" "$tmp/ca.key" engine/ca.pem
leaf "test Docker Engine" engine/server-key.pem engine/server-cert.pem \
  "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost"
leaf "sluicegate" engine/key.pem engine/cert.pem \
  "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
ca "someone else's CA" "$tmp/other.key" untrusted/ca.pem
cp engine/cert.pem engine/key.pem untrusted/
rm -f engine/ca.srl .srl
