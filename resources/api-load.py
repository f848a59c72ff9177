#!/usr/bin/env python3
"""Loopback load on a vmm API socket: C clients x R GET requests, one connection each.

Usage: resources/api-load.py SOCKET [CLIENTS=20] [REQUESTS=100]

Each request is timed from connect to the last byte of the answer. Prints the
request count, errors (anything but 200), throughput and p50/p99/max latency.
Uses only the standard library so it runs on a bare host.
"""
import socket
import sys
import threading
import time

PATHS = ["/guests", "/dedup/stats", "/host", "/guests/0", "/metrics"]


def get(sock_path, path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data.startswith(b"HTTP/1.1 200")


def main():
    sock_path = sys.argv[1]
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    requests = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    latencies, errors, lock = [], [0], threading.Lock()

    def client(c):
        mine, bad = [], 0
        for i in range(requests):
            t = time.perf_counter()
            ok = get(sock_path, PATHS[(c + i) % len(PATHS)])
            mine.append(time.perf_counter() - t)
            bad += not ok
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    ms = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000
    print(f"{len(latencies)} requests, {errors[0]} errors, {len(latencies) / wall:.0f} req/s; "
          f"p50 {ms(0.5):.2f} ms, p99 {ms(0.99):.2f} ms, max {latencies[-1] * 1000:.2f} ms")
    sys.exit(1 if errors[0] else 0)


if __name__ == "__main__":
    main()
