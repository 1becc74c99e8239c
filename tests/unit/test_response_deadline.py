"""response_deadline: an exchange still open at its deadline has its socket shut down,
and only that one; over a socket pair, with a stand-in for urllib3's connection."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from qna.adapters import response_deadline
from qna.adapters.response_deadline import claim, deadline, release


class Connection:
    """What the watchdog uses of a urllib3 connection: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(10)  # a test that fails does so, not hangs
        yield ours, theirs


def test_a_read_still_waiting_at_the_deadline_is_cut_short(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    with deadline(0.2) as scope:
        claim(Connection(ours))
        assert ours.recv(1) == b""  # shut down under the read: end of stream
    assert scope.expired


def test_a_scope_closed_in_time_leaves_its_socket_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    with deadline(0.1) as scope:
        claim(Connection(ours))
    with deadline(0.5):  # outlives the first deadline
        theirs.sendall(b"x")
        assert ours.recv(1) == b"x"
    ours.settimeout(0.6)  # past the first deadline, and past this one
    theirs.sendall(b"y")
    assert ours.recv(1) == b"y"
    assert not scope.expired


def test_a_connection_back_in_the_pool_is_not_cut_by_the_exchange_it_carried(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    connection = Connection(ours)
    with deadline(0.1) as earlier:
        claim(connection)
        # Its answer read, the connection went back to the pool (the scope is still
        # open), and another exchange took it.
        release(connection)
        with deadline(None):
            claim(connection)
            ours.settimeout(0.4)
            with pytest.raises(TimeoutError):
                ours.recv(1)  # nothing shut it down
    assert earlier.expired
    theirs.sendall(b"z")
    assert ours.recv(1) == b"z"


def test_an_exchange_that_claims_its_scope_after_the_deadline_is_cut_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Its time ran out while it connected (a slow DNS lookup, a TLS handshake).
    ours, _ = pair
    with deadline(0.05) as scope:
        time.sleep(0.3)
        claim(Connection(ours))
        assert ours.recv(1) == b""
    assert scope.expired


def test_finished_exchanges_do_not_pile_up_until_their_deadlines() -> None:
    # One timeout for all: each new deadline is the latest, and the watchdog sleeps
    # until the earliest. Finished scopes were kept until then (a day's worth, with
    # QNA_LLM_TIMEOUT_S at its maximum).
    with deadline(3600):  # one still in flight all along
        for _ in range(10_000):
            with deadline(3600):
                pass
        assert len(response_deadline._watchdog._heap) < 200


def _expires_in_a_child() -> bool:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(10)
        with deadline(0.1) as scope:
            claim(Connection(ours))
            ours.recv(1)
    return scope.expired


def test_a_forked_child_has_a_watchdog_of_its_own(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    with deadline(0.1):  # the parent's watchdog thread runs, and is not forked
        claim(Connection(ours))
        ours.recv(1)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        assert pool.submit(_expires_in_a_child).result(timeout=20)
