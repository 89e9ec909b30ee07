"""autoglm_wire.mqtt_session without a broker: the client it makes writes the socket from one
thread at a time (paho lets every publishing thread write, and its packet queue has no lock)."""

from __future__ import annotations

import socket
import threading
import time

from paho.mqtt.enums import MQTTErrorCode

from autoglm_wire.mqtt_session import BrokerOptions, corked, make_client, serialize_socket_writes


class RecordingWriter:
    """Stands in for paho's `loop_write`: records how many threads are inside it at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.calls = 0
        self._count = threading.Lock()

    def loop_write(self) -> MQTTErrorCode:
        with self._count:
            self.inside += 1
            self.calls += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.002)  # long enough for another thread to arrive while this one writes
        with self._count:
            self.inside -= 1
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def hammer(write: object, threads: int = 4, calls: int = 10) -> None:
    def run() -> None:
        for _ in range(calls):
            write()  # type: ignore[operator]

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_without_the_lock_writers_overlap_so_the_check_can_fail() -> None:
    writer = RecordingWriter()
    hammer(writer.loop_write)
    assert writer.most_inside > 1


def test_serialized_writes_never_overlap_and_all_happen() -> None:
    writer = RecordingWriter()
    serialize_socket_writes(writer)  # type: ignore[arg-type]
    hammer(writer.loop_write)
    assert writer.most_inside == 1 and writer.calls == 40


def test_every_client_made_for_a_session_has_its_writes_serialized() -> None:
    client = make_client(BrokerOptions(host="127.0.0.1", port=1, client_id="unit", keepalive=30, session_expiry_s=60,
                                       backoff_initial_s=1.0, backoff_multiplier=2.0, backoff_max_s=5.0))
    original = type(client).loop_write
    assert "loop_write" in vars(client) and vars(client)["loop_write"] is not original


def test_corked_holds_small_writes_back_until_the_block_ends_then_sends_them() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as ours, server.accept()[0] as broker:
            ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with corked(ours):
                assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
                for mid in range(3):
                    ours.sendall(bytes([0x40, 2, 0, mid]))  # three PUBACKs
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
            broker.settimeout(5)
            received = b""
            while len(received) < 12:
                received += broker.recv(64)
            assert received == b"".join(bytes([0x40, 2, 0, mid]) for mid in range(3))


def test_corked_is_a_no_op_without_a_tcp_connection() -> None:
    with corked(None):
        pass
    ours, other = socket.socketpair()  # a Unix socket: not TCP
    with ours, other, corked(ours):
        ours.sendall(b"x")
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.close()
    with corked(closed):  # the connection went away under us: nothing held back, nothing raised
        pass
