"""vagrant/: the Vagrantfile names both providers and the one provisioning
script (which the VM test runs for real: tests/test_vm.py), the scripts parse,
and the run-parts shim for Debian 12 runs several hook directories as newer
run-parts does."""

import os
import re
import subprocess

VAGRANT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vagrant")


def test_vagrantfile_uses_both_providers_and_the_provisioning_script():
    text = open(os.path.join(VAGRANT, "Vagrantfile")).read()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert re.search(r"provider :libvirt", text) and re.search(r"provider :virtualbox", text)
    assert re.search(r'provision "shell", path: "provision.sh".*reboot: true', text)
    assert os.access(os.path.join(VAGRANT, "provision.sh"), os.X_OK)


def test_scripts_parse():
    for name, shell in (("provision.sh", "bash"), ("demo-peer.sh", "bash"), ("run-parts-dirs.sh", "sh")):
        proc = subprocess.run([shell, "-n", os.path.join(VAGRANT, name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_run_parts_shim_merges_directories_in_name_order(tmp_path):
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    for d, name, text in ((etc, "10-initramfs", "etc-10"), (usr, "00-legacy-boot", "usr-00"),
                          (usr, "10-initramfs", "hidden")):
        d.mkdir(exist_ok=True)
        (d / name).write_text(f'#!/bin/sh\necho {text} "$@"\n')
        (d / name).chmod(0o755)
    proc = subprocess.run(["sh", os.path.join(VAGRANT, "run-parts-dirs.sh"), "--exit-on-error",
                           "--arg=7.3.4", "--arg=/boot/vmlinuz-7.3.4", str(etc), str(usr)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["usr-00 7.3.4 /boot/vmlinuz-7.3.4", "etc-10 7.3.4 /boot/vmlinuz-7.3.4"]
