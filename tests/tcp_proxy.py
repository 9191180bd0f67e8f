"""A plain TCP proxy, run as its own process, in front of a loopback server: an endpoint that a test
can kill (SIGKILL) in the middle of a request, so that every connection through it is cut at once and
the port refuses new ones, as when a storage server dies. No pytest in here.

    python tests/tcp_proxy.py UPSTREAM_PORT [--stall-on TEXT]

prints `listening PORT` once it accepts connections. With --stall-on, a connection whose client
bytes contain TEXT (e.g. `partNumber=`, an S3 UploadPart request) gets the bytes up to there
forwarded, then stops being read (the client's upload stalls, held by TCP's own flow control), and
`stalled` is printed once: the moment to kill this process with the request half sent."""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket, stall_on: bytes | None, stalled: threading.Event) -> None:
    tail = b""  # the last bytes of the previous chunk: TEXT may span two reads
    try:
        while data := src.recv(65536):
            if stall_on is not None:
                seen = tail + data
                at = seen.find(stall_on)
                if at >= 0:
                    dst.sendall(data[:max(at + len(stall_on) - len(tail), 0)])  # up to TEXT's end
                    if not stalled.is_set():
                        stalled.set()
                        print("stalled", flush=True)
                    threading.Event().wait()  # never read this client again: its sender blocks
                tail = seen[-len(stall_on):]
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(upstream_port: int, stall_on: bytes | None) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"listening {listener.getsockname()[1]}", flush=True)
    stalled = threading.Event()
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", upstream_port))
        threading.Thread(target=pump, args=(client, server, stall_on, stalled), daemon=True).start()
        threading.Thread(target=pump, args=(server, client, None, stalled), daemon=True).start()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("upstream_port", type=int)
    p.add_argument("--stall-on", default=None, help="stop forwarding a connection once its client sends this text")
    a = p.parse_args()
    serve(a.upstream_port, a.stall_on.encode() if a.stall_on else None)
    sys.exit(0)
