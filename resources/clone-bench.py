#!/usr/bin/env python3
"""N guests booted against N clones of one snapshot, side by side, through the API.

Usage (repository root, as root, after cargo build --release):
    resources/clone-bench.py [N=50] [MEMORY_MIB=256]

Starts `vmm serve`; boots N memtest guests with vmm bench's guest profile
(docs/benchmarks.md, the tiny-linux kernel as their "OS image") and times
until every one has filled its memory and verified a round; pauses the first
and snapshots it; deletes them all; then creates and starts N clones of the
snapshot, timing each restore (POST /guests {"restore"}), and times until
every clone has verified a round. Host memory is what the guests' memory
cgroups hold plus the stable store. Standard library only.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target/release/vmm")
IMAGES = os.path.join(ROOT, "guest-images/out")
PROFILE = "seed=1 share=0.35 zero=0.2 volatile=1024 idle=400 rounds=0"
N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
MEMORY = int(sys.argv[2]) if len(sys.argv) > 2 else 256
WORK = tempfile.mkdtemp(prefix="vmm-clone-bench-")
SOCK = os.path.join(WORK, "api.sock")


def call(method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    b = json.dumps(body) if body is not None else ""
    s.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(b)}\r\nConnection: close\r\n\r\n{b}".encode()
    )
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            n, _, rest = rest.partition(b"\r\n")
            if int(n, 16) == 0:
                break
            out, rest = out + rest[: int(n, 16)], rest[int(n, 16) + 2 :]
        body = out
    return int(head.split()[1]), (json.loads(body) if body.strip() else None)


def verified_a_round(ids):
    return all(call("GET", f"/guests/{i}/console")[1]["tail"].count(" ok\n") >= 1 for i in ids)


def host_mib(ids):
    guests = sum(call("GET", f"/guests/{i}")[1].get("memory_bytes") or 0 for i in ids)
    store = call("GET", "/dedup/audit")[1]["store_pages"] * 4096
    return guests / 2**20, store / 2**20


def os_image():
    """The tiny-linux kernel and initramfs, page-aligned, as vmm bench uses."""
    path = os.path.join(WORK, "os-image")
    kernel = open(os.path.join(IMAGES, "tiny-linux/vmlinux"), "rb").read()
    initramfs = open(os.path.join(IMAGES, "tiny-linux/initramfs.cpio.gz"), "rb").read()
    with open(path, "wb") as f:
        f.write(kernel + b"\0" * (-len(kernel) % 4096) + initramfs)
    return path


def main():
    server = subprocess.Popen(
        [VMM, "serve", "--api-socket", SOCK, "--console-dir", os.path.join(WORK, "consoles"), "--overcommit"],
        stderr=open(os.path.join(WORK, "serve.log"), "w"),
    )
    try:
        while not os.path.exists(SOCK):
            time.sleep(0.05)
        spec = {"kernel": os.path.join(IMAGES, "memtest"), "initrd": os_image(), "memory_mib": MEMORY, "cmdline": PROFILE}
        start, booted = time.time(), []
        for _ in range(N):
            status, g = call("POST", "/guests", spec)
            assert status == 201, g
            call("POST", f"/guests/{g['id']}/start")
            booted.append(g["id"])
        while not verified_a_round(booted):
            time.sleep(0.2)
        took = time.time() - start
        guests, store = host_mib(booted)
        print(f"booted: {N} x {MEMORY} MiB all verified a round at {took:.1f} s; host memory then {guests:.0f} + {store:.0f} (store) MiB")

        call("POST", f"/guests/{booted[0]}/pause")
        snapshot = os.path.join(WORK, "snapshot")
        status, written = call("PUT", f"/guests/{booted[0]}/snapshot", {"dir": snapshot})
        assert status == 200, written
        print(f"snapshot: {written['pages']} pages written, the guest held {written['held_ms']:.0f} ms")
        for i in booted:
            call("DELETE", f"/guests/{i}")
        while call("GET", "/dedup/audit")[1]["live_frames"] != 0:
            time.sleep(0.2)

        start, clones, restore = time.time(), [], []
        for _ in range(N):
            t = time.time()
            status, g = call("POST", "/guests", {"restore": snapshot})
            assert status == 201, g
            restore.append(time.time() - t)
            call("POST", f"/guests/{g['id']}/start")
            clones.append(g["id"])
        made = time.time() - start
        at_start = host_mib(clones)
        while not verified_a_round(clones):
            time.sleep(0.2)
        took = time.time() - start
        guests, store = host_mib(clones)
        ms = sorted(r * 1000 for r in restore)
        print(
            f"clones: {N} restored and started in {made:.1f} s (restore p50 {ms[len(ms) // 2]:.0f} ms, "
            f"p99 {ms[min(len(ms) - 1, len(ms) * 99 // 100)]:.0f} ms, the first {restore[0] * 1000:.0f} ms); "
            f"host memory right after: {at_start[0]:.0f} + {at_start[1]:.0f} (store) MiB; "
            f"all verified a round at {took:.1f} s, host memory then {guests:.0f} + {store:.0f} (store) MiB"
        )
    finally:
        server.send_signal(2)
        server.wait()


if __name__ == "__main__":
    main()
