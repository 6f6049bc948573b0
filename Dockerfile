# The ksbpf image: the node daemon (DaemonSet) and `ksbpf gate` (the pods' init container).
#   make image        (builds the Python wheels on the host, then this file with podman)
# Debian base; bcc from Debian (python3-bpfcc: the PyPI package "bcc" is unrelated);
# ksbpf and its Python dependencies from wheels built beforehand (build/wheels),
# so that the build itself fetches only Debian packages.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv python3-bpfcc libbpf1 iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY build/wheels /tmp/wheels
# --system-site-packages: the venv sees Debian's bcc
RUN python3 -m venv --system-site-packages /opt/ksbpf \
 && /opt/ksbpf/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir ksbpf \
 && rm -rf /tmp/wheels \
 && ln -s /opt/ksbpf/bin/ksbpf /usr/local/bin/ksbpf \
 && ksbpf --version

# The gate runs as nobody with no capabilities; the daemon as root with the
# capabilities the DaemonSet grants.
ENTRYPOINT []
CMD ["ksbpf", "--help"]
