# A test "host" for deploy/test/e2e.sh: what an operator's fresh Debian server looks like to
# Ansible (systemd as PID 1, sshd, python3), nothing of pgvigil's. With HOST_DOCKER=1 it also
# has Docker, for the `docker` runtime; its daemon uses the vfs driver (the only one that works
# on the overlay filesystem a container has) and leaves iptables alone (every pgvigil
# container uses the host's network).
ARG DEBIAN_RELEASE=bookworm
FROM debian:${DEBIAN_RELEASE}-slim
ARG HOST_DOCKER=0
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; \
    extra=""; if [ "$HOST_DOCKER" = 1 ]; then extra="docker.io python3-requests"; fi; \
    apt-get install -y -q --no-install-recommends systemd systemd-sysv dbus openssh-server python3 \
        iproute2 procps ca-certificates sudo less $extra; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /etc/docker /root/.ssh; chmod 700 /root/.ssh; \
    printf '{"storage-driver": "vfs", "iptables": false, "ip-masq": false, "bridge": "none"}\n' > /etc/docker/daemon.json; \
    printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' > /etc/ssh/sshd_config.d/e2e.conf; \
    systemctl enable ssh; \
    systemctl mask getty@tty1.service console-getty.service systemd-logind.service
# systemd's halt signal: `docker stop` then shuts the host down like a power button.
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
