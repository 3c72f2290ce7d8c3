#!/usr/bin/env python3
"""A TCP relay that adds latency: listens on 127.0.0.1, forwards every
connection to HOST:PORT and holds each chunk DELAY_MS milliseconds in each
direction before passing it on, so a round trip through it takes
2 * DELAY_MS more. Only latency is added: chunks are pipelined (a chunk
read while another one waits is sent DELAY_MS after it was read, in
order), bandwidth is not limited.

Traffic control (`tc ... netem`) is not available on these machines'
kernels, hence this user-space stand-in (see /work/shared/PEERS.md).

Usage: rtt-proxy.py HOST PORT DELAY_MS PORT_FILE
  Listens on an ephemeral loopback port and writes its number (then a
  newline) to PORT_FILE once it accepts connections. Runs until killed.
  Prints one line per closed connection on stderr: the chunks and bytes
  relayed each way, and the "turns": how many times the direction of the
  traffic changed, a rough count of round trips.
"""

import asyncio
import os
import socket
import sys
import time


async def pump(reader, writer, delay, stats, key, turn):
    """Read chunks from reader; write each one delay seconds after it was read."""
    queue = asyncio.Queue()

    async def send():
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            stats[key][0] += 1
            stats[key][1] += len(data)
            if turn[0] != key:
                turn[0] = key
                turn[1] += 1
            queue.put_nowait((time.monotonic() + delay, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait(None)
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def handle(client_reader, client_writer, host, port, delay):
    try:
        server_reader, server_writer = await asyncio.open_connection(host, port)
    except OSError as e:
        print(f"rtt-proxy: cannot reach {host}:{port}: {e}", file=sys.stderr)
        client_writer.close()
        return
    for w in (client_writer, server_writer):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stats = {"up": [0, 0], "down": [0, 0]}
    turn = [None, 0]
    await asyncio.gather(
        pump(client_reader, server_writer, delay, stats, "up", turn),
        pump(server_reader, client_writer, delay, stats, "down", turn),
    )
    for w in (client_writer, server_writer):
        w.close()
    print(
        "rtt-proxy: connection closed: up %d chunks %d bytes, down %d chunks %d bytes, %d turns"
        % (stats["up"][0], stats["up"][1], stats["down"][0], stats["down"][1], turn[1]),
        file=sys.stderr,
        flush=True,
    )


async def main():
    if len(sys.argv) != 5:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        sys.exit(2)
    host, port, delay_ms, port_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    delay = delay_ms / 1000.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, host, port, delay), "127.0.0.1", 0
    )
    bound = server.sockets[0].getsockname()[1]
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{bound}\n")
    os.replace(tmp, port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
