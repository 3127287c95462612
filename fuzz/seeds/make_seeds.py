#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/: valid requests of every kind, in the wire
layouts pv-protocol pins (little-endian, #[repr(C)]), so that the fuzzers start from real
structure. Run from anywhere: python3 fuzz/seeds/make_seeds.py (it replaces the seed folders)."""
import json, os, shutil, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def out(target, items):
    d = os.path.join(HERE, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, b in enumerate(items):
        if isinstance(b, str):
            b = b.encode()
        with open(os.path.join(d, f"seed-{i:03}"), "wb") as f:
            f.write(b)

def hreq(nr, a0=0, a1=0, a2=0):
    return struct.pack("<Q6Qq8Q", nr, a0, a1, a2, 0, 0, 0, 0, *([0] * 8))

# Event-channel argument structs (pv-protocol evtchn).
def evtchn_arg(op):
    return {
        0: struct.pack("<HHII", 1, 0, 5, 0),            # bind_interdomain: remote_dom, pad, port, local
        1: struct.pack("<III", 3, 0, 0),                 # bind_virq
        3: struct.pack("<I", 7), 4: struct.pack("<I", 7), 9: struct.pack("<I", 4095),
        5: struct.pack("<HHIII8s", 0x7ff0, 0, 7, 0, 0, b"\0" * 8),  # status
        6: struct.pack("<HHI", 0x7ff0, 0, 0),            # alloc_unbound
        7: struct.pack("<II", 0, 0),                     # bind_ipi
        8: struct.pack("<II", 7, 1),                     # bind_vcpu
        10: struct.pack("<HH", 0x7ff0, 0),               # reset
    }[op]

EVTCHN_OPS = [0, 1, 3, 4, 5, 6, 7, 8, 9, 10]
out("hypercall", [
    hreq(17, 0), hreq(17, 6, 0x2000) + struct.pack("<II", 0, 0),
    hreq(18, 0, 12, 0x3000), hreq(18, 1, 4096, 0x3000),
    hreq(20, 2, 0x4000, 1) + struct.pack("<HHIh6sQ", 0x7ff0, 0, 1, 0, b"\0" * 6, 0x5000),
    hreq(20, 6, 0x4000, 1) + struct.pack("<HHIIhH", 0x7ff0, 0, 0, 0, 0, 0),
    hreq(29, 0), hreq(29, 1), hreq(29, 2, 0x6000) + struct.pack("<II", 0, 3),
    hreq(29, 3, 0x6000) + struct.pack("<QIIQ", 0x7000, 2, 0, 1000000) + struct.pack("<II", 3, 4),
] + [hreq(32, op, 0x8000) + evtchn_arg(op) for op in EVTCHN_OPS] + [
    # vcpu_op: set_singleshot_timer (timeout_ns, flags, pad), stop_singleshot_timer.
    hreq(24, 8, 0, 0x9000) + struct.pack("<QII", 200000000, 1, 0),
    hreq(24, 9, 0),
])
out("evtchn", [struct.pack("<Q", op) + evtchn_arg(op) for op in EVTCHN_OPS])

# Kernel images: an ELF64 header and program headers (type, paddr, memsz), no contents.
def elf(segs):
    h = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x200000, 64, 0, 0, 64, 56, len(segs), 0, 0, 0)
    for (ty, paddr, filesz, memsz) in segs:
        h += struct.pack("<IIQQQQQQ", ty, 6, 0, paddr, paddr, filesz, memsz, 0x1000)
    return h
out("kernel_image", [
    elf([(1, 0x200000, 0x34000, 0x34000), (1, 0x234000, 0x5000, 0x5000), (1, 0x23a000, 0x3920, 0x9178)]),
    elf([(1, 0x200000, 0x1000, 0xeb2004), (6, 0, 0, 0)]),
    elf([]),
])

# Grant entries: flags, domid, frame; requester; access; then op args.
out("grant", [
    struct.pack("<HHI", 1, 0, 0x123) + struct.pack("<HB", 0, 1) + struct.pack("<HHIIhH", 0x7ff0, 0, 0, 0, 0, 0),
    struct.pack("<HHI", 1 | 4, 0, 0x456) + struct.pack("<HB", 0, 0) + struct.pack("<HHIh6sQ", 0x7ff0, 0, 4, 0, b"\0" * 6, 0x9000),
    struct.pack("<HHI", 1 | 8 | 16, 3, 0x789) + struct.pack("<HB", 3, 1),
    struct.pack("<HHI", 2, 0, 1) + struct.pack("<HB", 0, 0),
    struct.pack("<HHI", 1 | 0x100, 0, 1) + struct.pack("<HB", 0, 0),
])

# Block requests (112-byte slots).
def seg(gref, first, last):
    return struct.pack("<IBBH", gref, first, last, 0)

def blk_direct(op, segs, sector=8, rid=1):
    body = struct.pack("<BBHIQQ", op, len(segs), 0, 0, rid, sector)
    s = b"".join(segs) + b"\0" * (8 * (11 - len(segs)))
    return body + s

def blk_discard(sector, n, secure=0):
    return struct.pack("<BBHIQQQ", 5, secure, 0, 0, 9, sector, n) + b"\0" * 72

def blk_indirect(op, n, grefs):
    g = grefs + [0] * (8 - len(grefs))
    return struct.pack("<BBHIQQHH8I52s", 6, op, n, 0, 11, 64, 0, 0, *g, b"\0" * 52)

def indirect_page(n):
    return b"".join(seg(100 + i, 0, 7) for i in range(n)).ljust(4096, b"\0")

out("blkif", [
    blk_direct(0, [seg(10, 0, 7)]), blk_direct(1, [seg(10, 0, 7), seg(11, 2, 5)]),
    blk_direct(1, [seg(i, 0, 7) for i in range(11)]), blk_direct(3, []),
    blk_direct(3, [seg(12, 0, 0)]), blk_discard(128, 256), blk_discard(0, 8, 1),
    blk_indirect(0, 3, [20]) + indirect_page(3),
    blk_indirect(1, 600, [20, 21]) + indirect_page(512) + indirect_page(88),
    struct.pack("<QBBhI", 1, 0, 0, 0, 0) + b"\0" * 96,
])

# Netif TX chains (12-byte slots: gref, offset, flags, id, size).
def tx(gref, off, flags, rid, size):
    return struct.pack("<IHHHH", gref, off, flags, rid, size)

CSUM, VALID, MORE, EXTRA = 1, 2, 4, 8
gso = struct.pack("<BBHBBH", 1, 0, 1448, 1, 0, 0) + b"\0" * 4
mcast = struct.pack("<BB6s", 2, 1, b"\x01\x00\x5e\x00\x00\x01") + b"\0" * 4
mcast_last = struct.pack("<BB6s", 3, 0, b"\x01\x00\x5e\x00\x00\x02") + b"\0" * 4
out("netif_tx", [
    tx(1, 0, CSUM, 1, 60), tx(1, 0, VALID, 1, 1514),
    tx(1, 0, MORE, 1, 3000) + tx(2, 0, MORE, 2, 1000) + tx(3, 100, 0, 3, 500),
    tx(1, 0, EXTRA | MORE | CSUM, 1, 9000) + gso + tx(2, 0, 0, 2, 4096),
    tx(1, 0, EXTRA, 1, 100) + mcast + mcast_last,
    b"".join([tx(1, 0, MORE, 1, 18 * 100)] + [tx(i, 0, MORE if i < 17 else 0, i, 100) for i in range(1, 18)]),
])

# Store messages: header (type, req_id, tx_id, len) + payload.
def msg(t, payload, rid=2, tx_id=0):
    if isinstance(payload, str):
        payload = payload.encode()
    return struct.pack("<IIII", t, rid, tx_id, len(payload)) + payload

STORE = [
    msg(2, "device/vbd/51712/state\0"), msg(2, "/local/domain/2/name\0"),
    msg(11, "device/vif/0/state\x004"), msg(11, "data/x\0hello world"),
    msg(1, "device\0"), msg(22, "device\x000\0"), msg(3, "device/vbd\0"),
    msg(12, "data/dir\0"), msg(13, "data\0"), msg(14, "data/x\0n2\0r0\0b3\0"),
    msg(4, "device\0tok1\0"), msg(4, "@releaseDomain\0tok2\0"), msg(5, "device\0tok1\0"),
    msg(6, "\0"), msg(7, "T\0", tx_id=1), msg(7, "F\0", tx_id=1), msg(10, "3\0"),
    msg(8, "5\x001234\x007\0"), msg(9, "5\0"), msg(17, "5\0"), msg(18, "5\0"),
    msg(19, "5\x006\0"), msg(21, b""), msg(0, "print\0x\0"),
]
out("store_msg", STORE)

# store_stream: raw mode (bit 7) with the messages back to back, and decoded mode
# ([type, req_id, tx_id, len_lo, len_hi, payload]) with a transaction in flight.
def dec(t, payload, rid=1, tx_id=0):
    if isinstance(payload, str):
        payload = payload.encode()
    return bytes([t, rid, tx_id]) + struct.pack("<H", len(payload)) + payload

out("store_stream", [
    bytes([0x80 | 15]) + b"".join(STORE),
    bytes([0x80 | 0x7f]) + b"".join(STORE[:8]),
    bytes([3]) + dec(11, "data/a\0v") + dec(6, "\0") + dec(11, "data/b\0w", tx_id=1)
        + dec(2, "data/b\0", tx_id=1) + dec(7, "T\0", tx_id=1) + dec(1, "data\0"),
    bytes([0x7f]) + dec(4, "data\0t\0") + dec(11, "data/c\0z") + dec(13, "data\0")
        + dec(14, "/local/domain/2/x\0b2\0") + dec(2, "/local/domain/3/secret\0"),
    bytes([0x40]) + dec(6, "") + dec(6, "") + dec(13, "data\0", tx_id=2) + dec(7, "F\0", tx_id=2)
        + dec(7, "T\0", tx_id=1) + dec(3, "name\0"),
])

out("xlcfg", [
    'name = "web"\nmemory = 256\nvcpus = 2\n',
    '# a domain\nname = "db-1"\nmemory = 512\nvcpus = 4\ncpus = "0-1,3"\n'
    'kernel = "guest.elf"\ncmdline = "selftest"\non_poweroff = "destroy"\n'
    'on_reboot = "restart"\non_crash = "preserve"\n'
    "disk = [ 'vdev=xvda,access=rw,size=64M,target=/tmp/a.img', 'b.img,raw,xvdb,ro' ]\n"
    "vif = [ 'mac=00:16:3e:00:00:01,bridge=xenbr0,ip=10.0.0.2', 'bridge=br1,uplink=tap,tap=tap7' ]\n",
    "name='x'; memory=64; extra=\"a \\\"quoted\\\" \\\\ line\\n\"\ntype = \"pv\"\nbuilder = 'generic'\n",
    'name = "multi"\ndisk = [\n  "format=raw,vdev=xvdc,target=c.img",\n  "devtype=disk,backendtype=qdisk,target=d.img",\n]\ncpus = "all"\n',
])

spec = {"name": "web", "memory": 128, "vcpus": 2, "cpus": [0, 1], "kernel": None,
        "cmdline": "demo", "on_poweroff": "destroy", "on_reboot": "restart",
        "on_crash": "preserve",
        "disks": [{"target": "/tmp/a.img", "vdev": "xvda", "readonly": False, "size": 67108864}],
        "vifs": [{"mac": "00:16:3e:00:00:01", "bridge": "xenbr0", "uplink_tap": None,
                  "ip": "10.0.0.2"}]}
reqs = [
    {"op": "hello"}, {"op": "info"}, {"op": "list"}, {"op": "top"},
    {"op": "create", "spec": spec, "paused": True}, {"op": "destroy", "dom": "web"},
    {"op": "shutdown", "dom": "3", "reboot": True, "wait": False}, {"op": "pause", "dom": "web"},
    {"op": "unpause", "dom": "web"}, {"op": "console", "dom": "web"}, {"op": "dmesg", "lines": 20},
    {"op": "block-attach", "dom": "web", "spec": "target=b.img,vdev=xvdb"},
    {"op": "block-detach", "dom": "web", "vdev": "xvdb"}, {"op": "block-list", "dom": "web"},
    {"op": "network-attach", "dom": "web", "spec": "bridge=xenbr0"},
    {"op": "network-detach", "dom": "web", "devid": 1}, {"op": "network-list", "dom": "web"},
    {"op": "status", "dom": "web"}, {"op": "vcpu-list"}, {"op": "vcpu-list", "dom": "web"},
    {"op": "vcpu-pin", "dom": "web", "vcpu": 0, "cpus": [1]}, {"op": "vcpu-pin", "dom": "web"},
]
out("control", [json.dumps({"v": 1, **r}) + "\n" for r in reqs])
