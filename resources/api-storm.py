#!/usr/bin/env python3
"""An API storm: CLIENTS threads ask PATHS of a vmm API socket in turn for
SECONDS, one request per connection, and print each path's latency p50,
p99 and max in milliseconds.

    resources/api-storm.py SOCKET [--clients 16] [--seconds 60] [PATH ...]
"""
import argparse
import socket
import threading
import time


def ask(sock_path, path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.startswith(b"HTTP/1.1 200")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("paths", nargs="*", default=["/dedup/stats", "/metrics", "/guests"])
    a = p.parse_args()
    times = {path: [] for path in a.paths}
    failures = []
    end = time.monotonic() + a.seconds
    lock = threading.Lock()

    def client(k):
        i = k
        while time.monotonic() < end:
            path = a.paths[i % len(a.paths)]
            i += 1
            t = time.monotonic()
            ok = ask(a.socket, path)
            took = (time.monotonic() - t) * 1000
            with lock:
                (times[path] if ok else failures).append(took if ok else path)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for path, ts in times.items():
        ts.sort()
        if ts:
            q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]
            print(f"{path}: {len(ts)} answers, p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {ts[-1]:.1f} ms")
    print(f"failures: {len(failures)}")


if __name__ == "__main__":
    main()
