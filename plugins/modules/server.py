#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: server
short_description: Join a server to an RMS cluster or remove it
version_added: 0.1.0
description:
  - Registers an RMS server (node) in its cluster's configuration database and writes the node's configuration
    file and secret file, or removes both and deregisters the node.
  - Before joining, the module checks that O(key_password) (or, for a cluster whose keys are in a PKCS#11 token,
    O(pkcs11)) opens the cluster's active key; a wrong password or PIN fails and changes nothing.
  - With O(tls_certificate) and O(tls_key) the server serves HTTPS. Before joining, the module checks that both
    files can be read, that the key belongs to the certificate and that the certificate is valid now; otherwise
    it fails and changes nothing.
  - The module does not start or restart the service; it returns RV(config_changed) so the caller knows the running
    service must restart. The C(rmsops.rms.server) role does both.
  - The module is a thin layer over C(rmsd.admin.ensure_server); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
  - rmsops.rms.pkcs11
attributes:
  diff_mode:
    details: The diff shows the registration and the configuration file; of the secret file only whether it changes.
options:
  cluster:
    description:
      - Name of the cluster the server joins. It must have been provisioned (M(rmsops.rms.cluster)).
    type: str
    required: true
  name:
    description:
      - Name of the server, unique in its cluster; 1 to 64 letters, digits, C(.), C(_) or C(-).
    type: str
    required: true
  listen_address:
    description:
      - IP address the server's HTTP(S) service listens on.
    type: str
    default: 127.0.0.1
  port:
    description:
      - TCP port the server's HTTP service listens on. Address and port must be unique in the cluster.
    type: int
    default: 8080
  config_path:
    description:
      - Absolute path of the node configuration file (TOML, mode 0640, holds no secret).
    type: path
    required: true
  secret_path:
    description:
      - Absolute path of the node secret file holding the cluster key password and the database password
        (TOML, mode 0600).
    type: path
    required: true
  key_password:
    description:
      - The cluster key password. With O(state=present), either this or O(pkcs11) is required.
      - With O(pkcs11), the server's configuration names the module and token, and its secret file holds the PIN.
    type: str
  previous_key_password:
    description:
      - While the cluster key password changes, the password the keys may still be encrypted with. It goes into
        the secret file too, so the node opens the keys before and after M(rmsops.rms.cluster_key) re-encrypts
        them. Leave it out once the change is done; the secret file then holds the new password only.
    type: str
  identity_issuer:
    description:
      - Issuer (C(iss) claim) of the bearer tokens users authenticate with.
    type: str
  identity_audience:
    description:
      - Audience (C(aud) claim) the bearer tokens must name.
    type: str
    default: rmsd
  identity_jwks_uri:
    description:
      - Where the issuer's signing keys (JWKS) are read from, C(https://) (certificate verified) or C(file://);
        C(http://) only to a loopback address (refused otherwise, since anyone on the path could forge tokens).
    type: str
  tls_certificate:
    description:
      - Absolute path, on the server, of its TLS certificate (PEM; the server's certificate first, then any
        intermediate CA certificates). With O(tls_key), the server serves HTTPS and its RV(server.url) is
        C(https://); without both it serves plain HTTP.
      - The file must exist when the module runs, except in check mode, where a missing file only gives a warning
        because an earlier task of the same run would have written it.
      - The configuration file records the path only. A certificate renewed at the same path does not change the
        configuration file (RV(config_changed) stays false); restart the service to serve the new certificate.
      - C(rmsd tls-request --key PATH --address IP [--dns NAME ...]) run on the server makes its private key and
        prints a certificate request to be signed by your CA, so the key never leaves the server.
    type: path
  tls_key:
    description:
      - Absolute path, on the server, of the unencrypted PEM private key of O(tls_certificate). It must belong to
        that certificate. The configuration file records the path, never the key; keep the file readable by the
        service user only.
    type: path
  http_limits:
    description:
      - Limits the server applies to every request before it parses the body or authenticates anyone. A limit
        left out keeps its default.
    type: dict
    default: {}
    suboptions:
      max_body_bytes:
        description:
          - Largest request body (1024 to 16777216). A larger body is answered 413 before it is read. Default 65536.
        type: int
      max_header_bytes:
        description:
          - Largest request line plus headers (1024 to 1048576); more closes the connection with 400. Default 16384.
        type: int
      keep_alive_seconds:
        description:
          - Seconds an idle keep-alive connection stays open (1 to 600). Default 5.
        type: int
      read_timeout_seconds:
        description:
          - Seconds a client has to complete the TLS handshake, to send a request's line and headers, then again its
            body, and to take a response it is sent (1 to 600). A slower client is disconnected (answered 408 for a
            body). Default 10.
        type: int
      max_connections:
        description:
          - Connections each worker holds at once (16 to 100000). A new connection beyond it takes the place of the
            connection waiting longest for a request, or is answered 503 when every connection is busy with one.
            Default 1000. The node's file descriptor limit must exceed it (the C(rmsops.rms.server) role sizes
            C(LimitNOFILE) from it).
        type: int
      retry_after_seconds:
        description:
          - C(Retry-After) of a 503 answered while the configuration database is unavailable (1 to 3600). Default 5.
        type: int
  workers:
    description:
      - Worker processes serving the server's port (1 to 256); V(0) runs one per core of the server. Each worker
        opens its own database connections and PKCS#11 session.
    type: int
    default: 0
  trusted_proxies:
    description:
      - Addresses, networks (C(ADDRESS/PREFIX)) or host names of the load balancers in front of the server. A
        request from one of them is counted as coming from the client its C(X-Forwarded-For) names; any other
        request as coming from its peer, whatever it sends. The limits per client address (enrollment) count
        clients this way.
      - A host name is resolved on the server when the task runs; the configuration file records its addresses.
      - Empty (the default) believes no one's C(X-Forwarded-For).
    type: list
    elements: str
    default: []
  state:
    description:
      - V(present) registers the server and writes its files.
      - V(absent) deregisters the server and removes its configuration and secret files.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: rmsops.rms.cluster
  - module: rmsops.rms.cluster_info
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Join this host to the single-node root cluster corp
  rmsops.rms.server:
    cluster: corp
    name: "{{ inventory_hostname }}"
    database_url: sqlite:////var/lib/rmsd/corp/config.db
    key_password: "{{ vault_rms_corp_key_password }}"
    listen_address: 10.0.10.11
    port: 8080
    config_path: /var/lib/rmsd/{{ inventory_hostname }}/rmsd.toml
    secret_path: /var/lib/rmsd/{{ inventory_hostname }}/secret.toml
    tls_certificate: /var/lib/rmsd/{{ inventory_hostname }}/tls/node.crt
    tls_key: /var/lib/rmsd/{{ inventory_hostname }}/tls/node.key
    http_limits:
      max_body_bytes: 131072
    identity_issuer: https://login.corp.example.com/
    identity_jwks_uri: https://login.corp.example.com/.well-known/jwks.json
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  # The node's files (and the SQLite database) belong to the user the node runs as.
  become: true
  become_user: rmsd
  register: rms_server

- name: Remove the server from its cluster
  rmsops.rms.server:
    cluster: corp
    name: "{{ inventory_hostname }}"
    database_url: sqlite:////var/lib/rmsd/corp/config.db
    config_path: /var/lib/rmsd/{{ inventory_hostname }}/rmsd.toml
    secret_path: /var/lib/rmsd/{{ inventory_hostname }}/secret.toml
    state: absent
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  become: true
  become_user: rmsd
"""

RETURN = r"""
server:
  description:
    - The server as registered after the task (as it would be, in check mode). Empty when O(state=absent).
  returned: always
  type: dict
  contains:
    name:
      description: Name of the server.
      type: str
      sample: rms1
    cluster:
      description: Cluster the server belongs to.
      type: str
      sample: corp
    listen_address:
      description: Address the service listens on.
      type: str
      sample: 127.0.0.1
    port:
      description: Port the service listens on.
      type: int
      sample: 8080
    url:
      description: URL of the server's service; C(https://) when it has O(tls_certificate) and O(tls_key).
      type: str
      sample: https://127.0.0.1:8080
    tls:
      description: Whether the server serves HTTPS.
      type: bool
      sample: true
    tls_certificate:
      description: Path of the server's TLS certificate, or null.
      type: str
      sample: /etc/rmsd/tls/rms1.crt
    tls_key:
      description: Path of the server's TLS private key (the path only), or null.
      type: str
      sample: /etc/rmsd/tls/rms1.key
    config_path:
      description: Path of the node configuration file.
      type: str
    instance_id:
      description:
        - The node's identity, made when its configuration file is first written and kept by every later run. The
          node serves it in C(GET /health), so a check of the node can tell its answer from another process's on
          the same port. A configuration file written by an older version gets one (a change, so the node
          restarts once).
      type: str
      sample: 3f0c9a1e2b7d4c5f8a6e1d2c3b4a5f60
    secret_path:
      description: Path of the node secret file.
      type: str
config_changed:
  description:
    - Whether the configuration or secret file changed (or would change, in check mode), so that a running service
      must restart to use them.
  returned: always
  type: bool
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import (
    pkcs11_argument_spec,
    rmsd_module,
    run_ensure,
)


def main():
    module = rmsd_module(
        dict(
            cluster=dict(type="str", required=True),
            name=dict(type="str", required=True),
            listen_address=dict(type="str", default="127.0.0.1"),
            port=dict(type="int", default=8080),
            config_path=dict(type="path", required=True),
            secret_path=dict(type="path", required=True),
            key_password=dict(type="str", no_log=True),
            previous_key_password=dict(type="str", no_log=True),
            identity_issuer=dict(type="str"),
            identity_audience=dict(type="str", default="rmsd"),
            identity_jwks_uri=dict(type="str"),
            tls_certificate=dict(type="path"),
            # A path, not a secret (validate-modules asks because of the name).
            tls_key=dict(type="path", no_log=False),
            http_limits=dict(type="dict", default={}, options={
                name: dict(type="int") for name in (
                    "max_body_bytes", "max_header_bytes", "keep_alive_seconds", "read_timeout_seconds",
                    "retry_after_seconds", "max_connections",
                )
            }),
            workers=dict(type="int", default=0),
            trusted_proxies=dict(type="list", elements="str", default=[]),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            **pkcs11_argument_spec(),
        ),
        required_if=[("state", "present", ("key_password", "pkcs11"), True)],
        mutually_exclusive=[("key_password", "pkcs11")],
        required_together=[("tls_certificate", "tls_key")],
    )
    run_ensure(module, "ensure_server", "server", "config_changed", config_changed=False)


if __name__ == "__main__":
    main()
