"""The proc connector's datagrams, decoded without a socket: the kernel's layouts
(include/uapi/linux/cn_proc.h) built by hand, and hostile bytes that must never raise."""

from __future__ import annotations

import os
import signal
import struct

from hypothesis import given
from hypothesis import strategies as st

from reapkit._kernel import _netlink as nl
from reapkit._sources.proc_connector import (
    ProcComm,
    ProcExec,
    ProcExit,
    ProcFork,
    decode_datagram,
)

NOW = 12.5
NS = 987_654_321


def message(what: int, body: bytes, *, idx: int = nl.CN_IDX_PROC, pad: bool = True) -> bytes:
    """One netlink message as the kernel sends it: nlmsghdr, cn_msg, proc_event."""
    event = nl.PROC_EVENT.pack(what, 1, NS) + body
    cn_msg = nl.CN_MSG.pack(idx, nl.CN_VAL_PROC, 7, 0, len(event), 0)
    size = nl.NLMSGHDR.size + len(cn_msg) + len(event)
    data = nl.NLMSGHDR.pack(size, nl.NLMSG_DONE, 0, 0, 0) + cn_msg + event
    return data + b"\0" * (-size % 4 if pad else 0)


def fork(parent: int, child_pid: int, child_tgid: int) -> bytes:
    return message(nl.PROC_EVENT_FORK, struct.pack("=iiii", parent, parent, child_pid, child_tgid))


def exit_(pid: int, tgid: int, code: int, sig: int) -> bytes:
    # Linux 4.18+ adds parent_pid and parent_tgid after exit_signal.
    return message(nl.PROC_EVENT_EXIT, struct.pack("=iiIiii", pid, tgid, code, sig, 1, 1))


def comm(pid: int, tgid: int, name: bytes) -> bytes:
    return message(nl.PROC_EVENT_COMM, struct.pack("=ii16s", pid, tgid, name))


def test_each_event_of_a_process() -> None:
    for data, expected in [
        (fork(100, 200, 200), ProcFork(NOW, 100, 200, NS)),
        (message(nl.PROC_EVENT_EXEC, struct.pack("=ii", 200, 200)), ProcExec(NOW, 200, NS)),
        (comm(200, 200, b"worker"), ProcComm(NOW, 200, "worker", NS)),
        (exit_(200, 200, 3 << 8, signal.SIGCHLD), ProcExit(NOW, 200, 3 << 8, signal.SIGCHLD, NS)),
    ]:
        assert decode_datagram(data, NOW) == ([expected], 0)


def test_threads_are_skipped_and_not_errors() -> None:
    for data in (fork(100, 201, 200), exit_(201, 200, 0, -1), comm(201, 200, b"thread")):
        assert decode_datagram(data, NOW) == ([], 0)


def test_exit_signal_minus_one_and_an_old_kernels_short_exit() -> None:
    # exit_signal is -1 for a thread ("no signal"): the __u32 field carries a C int.
    short = message(nl.PROC_EVENT_EXIT, struct.pack("=iiIi", 300, 300, 9, -1))  # no parent
    assert decode_datagram(short, NOW) == ([ProcExit(NOW, 300, 9, -1, NS)], 0)


def test_a_name_that_is_not_utf8_is_kept_losslessly() -> None:
    events, errors = decode_datagram(comm(5, 5, b"\xff\xfebad"), NOW)
    assert errors == 0
    [event] = events
    assert isinstance(event, ProcComm)
    assert event.comm.encode("utf-8", "surrogateescape") == b"\xff\xfebad"
    # 16 bytes, no NUL at all: the whole field is the name.
    assert decode_datagram(comm(5, 5, b"a" * 16), NOW)[0] == [ProcComm(NOW, 5, "a" * 16, NS)]


def test_events_without_a_process_change_are_ignored() -> None:
    ack = message(0, struct.pack("=I", 0))  # PROC_EVENT_NONE: the subscription's ack
    uid = message(0x4, struct.pack("=iiII", 5, 5, 0, 0))
    assert decode_datagram(ack + uid, NOW) == ([], 0)


def test_several_messages_in_one_datagram() -> None:
    data = fork(1, 2, 2) + comm(2, 2, b"x") + exit_(2, 2, 0, 17)
    events, errors = decode_datagram(data, NOW)
    assert errors == 0
    assert [type(e) for e in events] == [ProcFork, ProcComm, ProcExit]


def test_broken_messages_are_counted() -> None:
    good = fork(1, 2, 2)
    # A body shorter than its layout; the next message is still read.
    short = message(nl.PROC_EVENT_FORK, struct.pack("=ii", 1, 1))
    assert decode_datagram(short + good, NOW) == ([ProcFork(NOW, 1, 2, NS)], 1)
    # Another connector than the proc events'.
    assert decode_datagram(message(nl.PROC_EVENT_FORK, b"\0" * 16, idx=3), NOW) == ([], 1)
    # A length that runs past the datagram, or cannot hold a header: nothing after it is read.
    assert decode_datagram(good + good[:-4], NOW) == ([ProcFork(NOW, 1, 2, NS)], 1)
    zero = struct.pack("=IHHII", 0, 3, 0, 0, 0)
    assert decode_datagram(zero + good, NOW) == ([], 1)
    assert decode_datagram(b"\1\2\3", NOW) == ([], 1)
    assert decode_datagram(b"", NOW) == ([], 0)


@given(st.binary(max_size=512))
def test_any_bytes_decode_without_raising(data: bytes) -> None:
    events, errors = decode_datagram(data, NOW)
    assert errors >= 0
    assert all(e.timestamp == NOW for e in events)


@given(st.lists(st.sampled_from([fork(1, 2, 2), comm(2, 2, b"n"), exit_(2, 2, 0, 17)])), st.data())
def test_a_truncated_datagram_keeps_the_whole_messages(
    messages: list[bytes], data: st.DataObject
) -> None:
    whole = b"".join(messages)
    cut = data.draw(st.integers(0, len(whole)))
    events, errors = decode_datagram(whole[:cut], NOW)
    complete = sum(1 for end in _ends(messages) if end <= cut)
    assert len(events) == complete
    assert errors == (0 if cut in (0, *_ends(messages)) else 1)


def _ends(messages: list[bytes]) -> list[int]:
    ends, total = [], 0
    for m in messages:
        total += len(m)
        ends.append(total)
    return ends


def test_the_subscription_request() -> None:
    for listen, action in ((True, nl.PROC_CN_MCAST_LISTEN), (False, nl.PROC_CN_MCAST_IGNORE)):
        data = nl.control_message(listen=listen)
        assert len(data) == 40
        assert nl.NLMSGHDR.unpack_from(data) == (40, nl.NLMSG_DONE, 0, 0, os.getpid())
        assert nl.CN_MSG.unpack_from(data, 16) == (nl.CN_IDX_PROC, nl.CN_VAL_PROC, 0, 0, 4, 0)
        assert struct.unpack_from("=I", data, 36) == (action,)
