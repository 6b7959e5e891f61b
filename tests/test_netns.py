"""Kernel link shaping: cloud and edge in two network namespaces this test creates (root only)."""

from __future__ import annotations

import subprocess

import pytest

from celslm.bench import link
from celslm.testing import netns
from tests.conftest import CONTEXT

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=f"kernel link shaping {netns.available()}")


def test_decode_over_a_tc_shaped_veth_between_two_namespaces(tiny_qwen, tmp_path):
    (tmp_path / "ctx.txt").write_text(CONTEXT * 4)
    result = link.run(str(tiny_qwen), tmp_path / "ctx.txt", "What does greet return?", rate="20mbit", rtt_ms=10,
                       codec="lossless", new_tokens=4)
    runs = result["runs"]
    assert result["link"].startswith("emulated (kernel tc ") and "20mbit" in result["link"]
    assert runs["artifact+pipeline"]["text"] == runs["edge-only"]["text"]  # lossless codec: same tokens
    assert runs["artifact+pipeline"]["t_comm_s"] > 0.005 and runs["edge-only"]["path"] == "edge-only"
    assert sum(runs["artifact+pipeline"]["bytes_by_source"].values()) > 0
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "celslm-" not in listed  # both namespaces (and the veth pair) are gone
