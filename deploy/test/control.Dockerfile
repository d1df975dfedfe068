# The control node of deploy/test/e2e.sh: Ansible from PyPI (ansible 12 brings community.docker
# and ansible.posix), ansible-lint, the real patronictl, psycopg2 for the write checker, and an
# SSH client. The operator's laptop, in a container.
ARG DEBIAN_RELEASE=bookworm
FROM debian:${DEBIAN_RELEASE}-slim
ARG ANSIBLE_VERSION=12.3.0
ARG ANSIBLE_LINT_VERSION=26.10.1
ARG PATRONI_VERSION=4.1.5
# Certificate authorities this machine trusts beyond Debian's (a TLS-intercepting proxy in front
# of PyPI, say): e2e.sh copies /usr/local/share/ca-certificates/ here; usually empty.
COPY extra-ca/ /usr/local/share/ca-certificates/
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; \
    apt-get install -y -q --no-install-recommends python3 python3-venv python3-psycopg2 openssh-client \
        postgresql-client curl ca-certificates git iproute2 iputils-ping; \
    rm -rf /var/lib/apt/lists/*; \
    update-ca-certificates >/dev/null; \
    python3 -m venv --system-site-packages /opt/ansible; \
    /opt/ansible/bin/pip install -q --no-cache-dir "ansible==${ANSIBLE_VERSION}" \
        "ansible-lint==${ANSIBLE_LINT_VERSION}" "patroni[etcd3]==${PATRONI_VERSION}"; \
    /opt/ansible/bin/ansible --version
ENV PATH=/opt/ansible/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ANSIBLE_FORCE_COLOR=0 PYTHONUNBUFFERED=1
CMD ["sleep", "infinity"]
