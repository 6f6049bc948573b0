"""The configuration is a security boundary: `ksbpf check-config`, `apply` and
`daemon` refuse a file, or a directory above it, that anyone but root can
write (like sshd's StrictModes), with one line; root-owned sticky
directories such as /tmp are fine."""

import os
import uuid

import pytest
from click.testing import CliRunner

from ksbpf import cli
from ksbpf.kernel import cgroup

pytestmark = pytest.mark.root   # chown needs root

GOOD = '[[scope]]\ncgroup = "/sys/fs/cgroup/vpn.slice"\ntunnels = ["wg0"]\n'


def ksbpf(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def write(path, text: str = GOOD, mode: int = 0o644):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def assert_refused(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "refusing the configuration" in lines[0], result.output
    for w in words:
        assert w in lines[0], result.output


def test_root_only_file_is_accepted(tmp_path):
    assert ksbpf("check-config", write(tmp_path / "ok.toml")).exit_code == 0


def test_world_writable_file_is_refused(tmp_path):
    assert_refused(ksbpf("check-config", write(tmp_path / "w.toml", mode=0o666)), "everyone", "mode 0666", "chmod go-w")


def test_group_writable_file_is_refused_unless_the_group_is_root(tmp_path):
    path = write(tmp_path / "g.toml", mode=0o664)
    os.chown(path, 0, 100)
    assert_refused(ksbpf("check-config", path), "group 100")
    os.chown(path, 0, 0)
    assert ksbpf("check-config", path).exit_code == 0


def test_file_owned_by_another_user_is_refused(tmp_path):
    path = write(tmp_path / "u.toml")
    os.chown(path, 65534, 65534)
    assert_refused(ksbpf("check-config", path), "uid 65534", f"chown root:root {path}")


def test_writable_directory_above_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    assert_refused(ksbpf("check-config", write(tmp_path / "open" / "c.toml")), f"the directory {tmp_path / 'open'}")
    os.chmod(tmp_path / "open", 0o755)
    os.chown(tmp_path / "open", 1000, 1000)
    assert_refused(ksbpf("check-config", str(tmp_path / "open" / "c.toml")), "uid 1000")


def test_root_owned_sticky_directory_like_tmp_is_fine(tmp_path):
    (tmp_path / "sticky").mkdir()
    os.chmod(tmp_path / "sticky", 0o1777)
    assert ksbpf("check-config", write(tmp_path / "sticky" / "c.toml")).exit_code == 0
    path = f"/tmp/ksbpf-trust-{uuid.uuid4().hex[:6]}.toml"   # /tmp itself
    try:
        with open(path, "w") as f:
            f.write(GOOD)
        assert ksbpf("check-config", path).exit_code == 0
        os.chown(path, 65534, 65534)   # but not someone else's file in it
        assert_refused(ksbpf("check-config", path), "uid 65534")
    finally:
        os.unlink(path)


def test_symbolic_links_are_followed_and_checked(tmp_path):
    (tmp_path / "user").mkdir()
    target = write(tmp_path / "user" / "c.toml")
    os.chown(tmp_path / "user", 1000, 1000)
    os.symlink(target, tmp_path / "link.toml")
    assert_refused(ksbpf("check-config", str(tmp_path / "link.toml")), f"the directory {tmp_path / 'user'}")
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    good = write(tmp_path / "good.toml")
    os.symlink(good, tmp_path / "open" / "link.toml")   # a link that anyone could re-point
    assert_refused(ksbpf("check-config", str(tmp_path / "open" / "link.toml")), f"the directory {tmp_path / 'open'}")


@pytest.mark.parametrize("command", ["apply", "daemon"])
def test_apply_and_daemon_refuse_and_change_nothing(command, tmp_path, tag):
    missing = os.path.join(cgroup.cgroup2_root(), f"ksbpf-test-{tag}-trust")
    path = write(tmp_path / "c.toml", f'[[scope]]\ncgroup = "{missing}"\ncreate_cgroup = true\ntunnels = ["wg0"]\n',
                 mode=0o666)
    assert_refused(ksbpf(command, "--config", path), "everyone")
    assert not os.path.exists(missing), "a refused configuration was applied"
