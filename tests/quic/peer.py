#!/usr/bin/env python3
"""A real QUIC peer (aioquic) for sluicegate's UDP tests: a server that answers each stream with its
name, and a client that verifies the server's certificate, asks, and can move to a new source address
mid-connection (as NAT rebinding moves a client) and ask again on the same connection.

    peer.py server --listen 127.0.0.1:0 --cert C --key K --name NAME [--seconds 120]
        prints "ready PORT" once it listens; answers each stream's bytes with b"NAME:" + bytes;
        exits after --seconds or when its stdin closes.
    peer.py client --connect 127.0.0.1:PORT --sni NAME --ca CA [--move] [--seconds 20]
        prints one JSON line: {"answers": [...], "sources": [...]}; exits 1 with the reason if the
        handshake, the certificate or an answer fails within --seconds.

Every loop is bounded in time. Traffic goes only to the address given (loopback in the tests).
"""
import argparse
import asyncio
import contextlib
import json
import socket
import sys
import threading
import time

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StreamDataReceived,
)

ALPN = ["sluicegate-test"]


def hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


class Answering(QuicConnectionProtocol):
    name = b""

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived) and event.end_stream:
            self._quic.send_stream_data(event.stream_id, self.name + b":" + event.data, end_stream=True)
            self.transmit()


async def run_server(args):
    config = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    config.load_cert_chain(args.cert, args.key)
    Answering.name = args.name.encode()
    host, port = hostport(args.listen)
    server = await serve(host, port, configuration=config, create_protocol=Answering)
    port = server._transport.get_extra_info("sockname")[1]
    print(f"ready {port}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The test ends the server by closing its stdin (or killing it); --seconds bounds it anyway.
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True).start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=args.seconds)
    server.close()


class Client:
    """A sans-I/O aioquic client driven over a socket the test can swap."""

    def __init__(self, args):
        config = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=args.sni)
        config.load_verify_locations(args.ca)
        self.quic = QuicConnection(configuration=config)
        self.peer = hostport(args.connect)
        self.deadline = time.monotonic() + args.seconds
        self.sock = self.new_socket()
        self.answers = {}
        self.handshake = False
        self.closed = None
        self.quic.connect(self.peer, now=time.time())

    def new_socket(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.02)
        return s

    def move(self):
        """A new source port: to the server's side, the client's address changed."""
        old = self.sock
        self.sock = self.new_socket()
        old.close()

    def flush(self):
        for data, addr in self.quic.datagrams_to_send(now=time.time()):
            self.sock.sendto(data, addr)

    def step(self):
        self.flush()
        try:
            data, addr = self.sock.recvfrom(65536)
            self.quic.receive_datagram(data, addr, now=time.time())
        except TimeoutError:
            pass
        timer = self.quic.get_timer()
        if timer is not None and time.time() >= timer:
            self.quic.handle_timer(now=time.time())
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshake = True
            elif isinstance(event, StreamDataReceived):
                self.answers[event.stream_id] = self.answers.get(event.stream_id, b"") + event.data
            elif isinstance(event, ConnectionTerminated):
                self.closed = f"connection closed: {event.error_code} {event.reason_phrase}"

    def until(self, what, cond):
        while not cond():
            if self.closed:
                raise SystemExit(f"{what}: {self.closed}")
            if time.monotonic() > self.deadline:
                raise SystemExit(f"{what}: timed out")
            self.step()

    def ask(self, data):
        sid = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(sid, data, end_stream=True)
        self.until(f"the answer to {data!r}", lambda: sid in self.answers and self.answers[sid].endswith(data))
        return self.answers[sid].decode()


def run_client(args):
    c = Client(args)
    c.until("the handshake", lambda: c.handshake)
    sources = [c.sock.getsockname()[1]]
    answers = [c.ask(b"hello")]
    if args.move:
        c.move()
        sources.append(c.sock.getsockname()[1])
        answers.append(c.ask(b"again"))
    c.quic.close()
    c.flush()
    print(json.dumps({"answers": answers, "sources": sources}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--seconds", type=float, default=120)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--sni", required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--move", action="store_true")
    c.add_argument("--seconds", type=float, default=20)
    args = p.parse_args()
    if args.role == "server":
        asyncio.run(run_server(args))
    else:
        run_client(args)


if __name__ == "__main__":
    main()
