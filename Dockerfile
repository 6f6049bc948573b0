# The ksbpf image: the node daemon (DaemonSet) and `ksbpf gate` (the pods' init container).
#   make image        (builds the Python wheels on the host, then this file with podman)
# Debian base; bcc from Debian (python3-bpfcc: the PyPI package "bcc" is unrelated);
# ksbpf and its Python dependencies from wheels built beforehand (build/wheels),
# so that the build itself fetches only Debian packages.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}

# Kernel headers for bcc, carried by the image: the node's /lib/modules and /usr/src
# are not mounted (COS, Bottlerocket, Talos, Flatcar have no headers there).  The
# program uses only UAPI structures, so the distribution's generic headers serve
# every kernel: the -common and the architecture's package, unpacked (not
# installed: they would pull in gcc) and merged into one tree for BCC_KERNEL_SOURCE.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv python3-bpfcc libbpf1 iproute2 ca-certificates \
 && arch=$(dpkg --print-architecture) \
 && hdr=$(apt-cache depends "linux-headers-$arch" | awk '$1 == "Depends:" && $2 ~ /^linux-headers-/ {print $2; exit}') \
 && common=$(apt-cache depends "$hdr" | awk '$1 == "Depends:" && $2 ~ /^linux-headers-.*-common$/ {print $2; exit}') \
 && mkdir /tmp/headers && cd /tmp/headers && apt-get download "$hdr" "$common" \
 && for deb in *.deb; do dpkg-deb -x "$deb" root; done \
 && mkdir -p /opt/ksbpf-headers \
 && cp -a "root/usr/src/$common/." /opt/ksbpf-headers/ \
 && cp -a "root/usr/src/$hdr/." /opt/ksbpf-headers/ \
 && rm -f /opt/ksbpf-headers/scripts /opt/ksbpf-headers/tools \
 && test -e /opt/ksbpf-headers/include/linux/kconfig.h \
 && echo "$hdr" > /opt/ksbpf-headers/PACKAGE \
 && cd / && rm -rf /tmp/headers /var/lib/apt/lists/*
ENV BCC_KERNEL_SOURCE=/opt/ksbpf-headers

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
