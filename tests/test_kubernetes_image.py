"""The container image (Dockerfile), built for real with Podman from a
Debian base made here (tests/kube_image.py: `debootstrap --variant=minbase`
from the machine's own Debian mirror, then `podman import`; no image
registry is reachable).  Then `ksbpf --version` and `ksbpf gate --help` run
in it, with no network, and the kernel headers it carries are what bcc is
told to use.  Slow (debootstrap and the package installs: a few minutes,
shared with test_kubernetes_deployed.py); the steps' times are printed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.root


def test_image_builds_from_a_local_debian_base_and_runs_ksbpf(podman, ksbpf_image):
    image = ksbpf_image
    version = podman("run", "--rm", "--network=none", image, "ksbpf", "--version").stdout
    assert "0.1.0" in version
    helptext = podman("run", "--rm", "--network=none", "--user", "65534:65534", "--cap-drop=all",
                      image, "ksbpf", "gate", "--help").stdout
    assert "--timeout SECONDS" in helptext
    bcc = podman("run", "--rm", "--network=none", image, "/opt/ksbpf/bin/python", "-c",
                 "import bcc, ksbpf.kubernetes.api, kubernetes; print('ok')").stdout
    assert bcc.strip() == "ok"
    # bcc's headers: in the image, not from the node (no /lib/modules, no /usr/src mounted)
    headers = podman("run", "--rm", "--network=none", image, "sh", "-c",
                     'echo "$BCC_KERNEL_SOURCE"; ls "$BCC_KERNEL_SOURCE/include/linux/kconfig.h" '
                     '"$BCC_KERNEL_SOURCE/include/uapi/linux/bpf.h"').stdout.split()
    assert headers[0] == "/opt/ksbpf-headers" and len(headers) == 3, headers
