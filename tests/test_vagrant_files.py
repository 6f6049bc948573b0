"""vagrant/: the Vagrantfile names both providers and the one provisioning
script (which the VM test runs for real: tests/test_vm.py), the scripts parse,
and provisioning leaves the box's own kernel alone."""

import os
import re
import subprocess

VAGRANT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vagrant")


def test_vagrantfile_uses_both_providers_and_the_provisioning_script():
    text = open(os.path.join(VAGRANT, "Vagrantfile")).read()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert re.search(r"provider :libvirt", text) and re.search(r"provider :virtualbox", text)
    assert re.search(r'provision "shell", path: "provision.sh"', text)
    assert os.access(os.path.join(VAGRANT, "provision.sh"), os.X_OK)


def test_scripts_parse():
    for name, shell in (("provision.sh", "bash"), ("demo-peer.sh", "bash")):
        proc = subprocess.run([shell, "-n", os.path.join(VAGRANT, name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_provisioning_does_not_replace_the_kernel():
    """The box runs its own kernel; the VM test boots its kernels itself (tests/vm/kernels.py)."""
    text = open(os.path.join(VAGRANT, "provision.sh")).read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"linux-image|backports|min_kernel|run-parts", code), "provision.sh installs a kernel"
    assert "reboot: true" not in open(os.path.join(VAGRANT, "Vagrantfile")).read()
