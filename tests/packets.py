"""Crafted frames for the tests and benchmarks: they live in ksbpf.verify.packets
(ksbpf verify crafts the same packets); this name is kept for the tests."""

from ksbpf.verify.packets import *  # noqa: F401,F403
from ksbpf.verify.packets import __all__  # noqa: F401
