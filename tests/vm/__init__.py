"""A booted Debian 12 guest for the VM test (tests/test_vm.py, `make vm-test`).

- image.py (host): builds the guest image with debootstrap from the mirror in
  the machine's apt sources and runs vagrant/provision.sh in a chroot of it --
  the provisioning of the Vagrantfile -- then adds the test's units; cached
  under /var/cache/ksbpf-vm, keyed by its inputs.
- qemu.py (host): boots it (TCG, direct kernel boot, no network device at all)
  on a throw-away overlay and reads the results from the second serial port.
- guest.py (guest): the test's traffic senders, the far-side counters and the
  scenarios, run by the units in units/.
"""
