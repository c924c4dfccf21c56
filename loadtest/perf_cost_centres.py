#!/usr/bin/env python3
"""Cost centres of a server profile: `perf script` output in, one markdown row per centre out.

Kernel samples are charged to the syscall in their call chain (writev split into send side,
loopback receive side and reader wake-up); user samples by symbol name. Used for the
"Profile" section of PERFORMANCE.md:  python3 loadtest/perf_cost_centres.py A.script [B.script...]
"""
import sys, re, collections
def frames(s):
    out = []
    for l in s.split("\n")[1:]:
        m = re.match(r"\s*[0-9a-f]+ (.+?)(?:\+0x[0-9a-f]+)? \((.*)\)$", l)
        if m: out.append((m.group(1), m.group(2)))
    return out
RX = {"net_rx_action", "process_backlog", "__netif_receive_skb_one_core", "tcp_v4_rcv", "handle_softirqs"}
WAKE = {"sock_def_readable", "ep_poll_callback", "__wake_up_common", "try_to_wake_up", "__wake_up_sync_key"}
def centre(fr):
    names = [n for n, _ in fr]; leaf, dso = fr[0]
    kernel = "kernel" in dso
    if kernel or leaf in ("__GI___writev", "writev"):
        if "do_writev" in names or leaf == "__GI___writev" or (not any("epoll" in n or "recv" in n for n in names) and any("writev" in n for n in names)):
            if WAKE & set(names): return "writev, kernel: receive side, waking the reader"
            if RX & set(names): return "writev, kernel: receive side, loopback TCP receive (softirq)"
            if {"__dev_queue_xmit", "ip_finish_output2", "loopback_xmit", "dev_hard_start_xmit"} & set(names):
                return "writev, kernel: send side, IP output + loopback device"
            if {"tcp_write_xmit", "__tcp_transmit_skb", "__tcp_push_pending_frames"} & set(names):
                return "writev, kernel: send side, TCP segment build + transmit"
            if {"tcp_sendmsg_locked", "tcp_sendmsg", "lock_sock_nested", "release_sock"} & set(names):
                return "writev, kernel: send side, tcp_sendmsg (skb alloc, copy, socket lock)"
            return "writev, kernel: syscall entry + VFS (fdget_pos, vfs_writev, sock_write_iter)"
        if any("epoll" in n for n in names): return "epoll_wait"
        if any("recv" in n for n in names): return "recvfrom"
        return "other kernel"
    rules = [(r"mi_|mimalloc|malloc|^free$|__rust_alloc|__rust_dealloc", "allocator (mimalloc)"),
             (r"simd_json|serde_json|serde::|roomcast::protocol", "JSON decode/encode"),
             (r"roomcast::hub", "hub fan-out"),
             (r"tokio::sync::|roomcast::outbox|bytes::bytes", "outbox: queue (tokio mpsc) + writer"),
             (r"tokio::runtime|tokio::task|tokio::net|mio::|core::task::wake|epoll_wait|pthread_(dis|en)able_asynccancel", "tokio: scheduling, wake-ups, I/O readiness"),
             (r"TrackedFuture", "connection task body (LTO-inlined)"),
             (r"fastwebsockets|roomcast::ws", "WebSocket framing/session")]
    for p, n in rules:
        if re.search(p, leaf): return n
    return "other user space"
res = []
for f in sys.argv[1:]:
    ss = [s for s in open(f).read().split("\n\n") if s.strip()]
    c = collections.Counter(centre(frames(s)) for s in ss if frames(s))
    res.append((len(ss), c))
keys = sorted(set().union(*[c for _, c in res]), key=lambda k: -res[0][1][k])
print("| cost centre | " + " | ".join(f"profile {i+1} ({n} samples)" for i, (n, _) in enumerate(res)) + " |")
for k in keys:
    print(f"| {k} | " + " | ".join(f"{100*c[k]/n:.1f}%" for n, c in res) + " |")
