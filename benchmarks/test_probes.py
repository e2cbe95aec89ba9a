"""The epoll probe relays what it is given, or its figures measure something else: bytes both ways,
a half-close passed on, a FIN that comes with the last bytes. Real sockets on loopback; the probe is
built with make (a C compiler, which the Rust toolchain already needs).

    python3 -m unittest discover -s benchmarks -p 'test_*.py'
"""

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import unittest

PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes")
EPOLL_PROBE = os.path.join(PROBES, "epoll-proxy")
DEADLINE = 10  # seconds any one wait may take


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """Serves each connection on its own thread with `handle(sock)`, until closed."""

    def __init__(self, handle):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            c.settimeout(DEADLINE)
            self.handle(c)

    def close(self):
        self.sock.close()


class Probe:
    def __init__(self, levers, backend_port):
        self.port = free_port()
        self.proc = subprocess.Popen([EPOLL_PROBE, "--levers", levers,
                                      f"127.0.0.1:{self.port}=127.0.0.1:{backend_port}"])
        end = time.monotonic() + DEADLINE
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError as e:
                if time.monotonic() > end or self.proc.poll() is not None:
                    self.close()
                    raise AssertionError("the probe did not listen") from e
                time.sleep(0.05)

    @contextlib.contextmanager
    def stopped(self):
        """The probe stopped (SIGSTOP, seen in /proc) until the block ends."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            end = time.monotonic() + DEADLINE
            while proc_state(self.proc.pid) != "T":
                if time.monotonic() > end:
                    raise AssertionError("the probe did not stop")
                time.sleep(0.01)
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        s.settimeout(DEADLINE)
        return s

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE)


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def read_to_end(s):
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
    return bytes(got)


def echo(c):
    while data := c.recv(65536):
        c.sendall(data)
    c.shutdown(socket.SHUT_WR)


class EpollProbe(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        subprocess.run(["make", "--quiet", "-C", PROBES, "epoll-proxy"], check=True, timeout=120)

    def probe(self, handle, levers="base"):
        backend = Backend(handle)
        self.addCleanup(backend.close)
        p = Probe(levers, backend.port)
        self.addCleanup(p.close)
        return p

    def test_a_fin_that_comes_with_the_last_bytes_is_passed_on(self):
        # The backend's bytes and its FIN arrive together: the read that returns the bytes is
        # short, and edge-triggered epoll says nothing more. The probe must read on to the FIN.
        # It is stopped while both arrive, so that it sees them in one event, every time.
        accepted, go = threading.Semaphore(0), threading.Semaphore(0)
        served = []

        def answer_and_close(c):
            served.append(c)
            if len(served) == 1:
                return  # the connection Probe made to see it listen
            accepted.release()
            if go.acquire(timeout=DEADLINE):
                c.sendall(b"hello and goodbye\n")

        p = self.probe(answer_and_close)
        for i in range(5):
            with p.connect() as s:
                self.assertTrue(accepted.acquire(timeout=DEADLINE), "the probe connected")
                with p.stopped():
                    go.release()
                    time.sleep(0.1)  # the bytes and the FIN reach the probe's socket
                self.assertEqual(read_to_end(s), b"hello and goodbye\n", f"connection {i}")

    def test_a_mebibyte_each_way_then_a_half_close(self):
        data = os.urandom(1 << 20)
        p = self.probe(echo, levers="base+thread+held")
        with p.connect() as s:
            sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = read_to_end(s)
            sender.join(DEADLINE)
        self.assertEqual(len(got), len(data))
        self.assertEqual(got, data)


if __name__ == "__main__":
    unittest.main()
