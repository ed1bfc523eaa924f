#!/usr/bin/env python3
"""Writes the hand-made seed corpus (fuzz/corpus/<target>/seed-*).

Input layout (see src/entries.rs): config byte, n, n % 16 chunk sizes, stream.
Run from anywhere: python3 fuzz/make_seeds.py
"""
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def msg(body):
    return frame(b"\x00" + body)


def keepalive():
    return frame(b"\x01")


def request(i, body=b"q"):
    return frame(b"\x02" + struct.pack(">Q", i) + body)


def response(i, body=b"a"):
    return frame(b"\x03" + struct.pack(">Q", i) + body)


def seed(target, name, stream, config=0, sizes=b"", flags=0):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes([config, flags << 4 | len(sizes)]) + sizes + stream)


def frame_decoder():
    t = "frame_decoder"
    frames = frame(b"hello") + frame(b"") + frame(b"x" * 100)
    seed(t, "empty", b"")
    seed(t, "frames", frames)
    seed(t, "frames-bytewise", frames, sizes=b"\x01")
    seed(t, "frames-cuts", frames, sizes=b"\x03\x00\x07\x40")
    seed(t, "zero-chunks", frames, sizes=b"\x00\x00\x05")
    seed(t, "max-1024", frame(b"m" * 1024) + frame(b"n"), sizes=b"\xff")
    seed(t, "over-1024", frame(b"o" * 1025))
    seed(t, "header-too-large", b"\x00\x01\x00\x01" + b"garbage")
    seed(t, "header-ffffffff", b"\xff\xff\xff\xff")
    seed(t, "half-frame", b"\x00\x00\x00\x10abc", sizes=b"\x02")
    seed(t, "half-header", b"\x00\x00")
    seed(t, "frame-then-too-large", frame(b"ok") + b"\x00\x00\x04\x01", sizes=b"\x01\x04")


def connection():
    t = "connection"
    answers = response(1) + response(2, b"two") + response(3, b"")
    chat = msg(b"hello") + keepalive() + request(7, b"ping") + msg(b"")
    seed(t, "empty", b"")
    seed(t, "messages", chat, flags=1)
    seed(t, "messages-bytewise", chat, config=0x01, sizes=b"\x00")
    seed(t, "answers", answers)
    seed(t, "answers-sends-first", answers, flags=1)
    seed(t, "answers-sends-first-small-writes", answers + chat, config=0x79, sizes=b"\x03", flags=1)
    seed(t, "answers-interleaved", msg(b"a") + response(2) + msg(b"b") + response(1) + response(3) + msg(b"c"),
         config=0x0f, sizes=b"\x02\x09")
    seed(t, "answers-slow-reader", chat + answers + chat, config=0xc4, sizes=b"\x05")
    seed(t, "answers-small-writes", answers + chat, config=0x5a, sizes=b"\x10")
    seed(t, "answers-close-early", answers, config=0x29, flags=1)
    seed(t, "answer-twice", response(1) + response(1))
    seed(t, "answer-abandoned", msg(b"a") + response(4) + answers + msg(b"b"), flags=2)
    seed(t, "answer-abandoned-twice", response(4) + response(2) + response(4), flags=2, config=0x01)
    seed(t, "incoming-dropped", chat + answers + chat, flags=4, sizes=b"\x07")
    seed(t, "incoming-dropped-small", chat + answers + chat, flags=7, config=0x04)
    seed(t, "answer-unknown-id", msg(b"x") + response(9) + msg(b"lost"))
    seed(t, "answer-no-id", frame(b"\x03\x00\x00"))
    seed(t, "request-no-id", msg(b"x") + frame(b"\x02\x01"), config=0x80)
    seed(t, "unknown-types", frame(b"\x09hello") + frame(b"\xff") + msg(b"after"))
    seed(t, "empty-payload", msg(b"before") + frame(b""))
    seed(t, "header-too-large", msg(b"x") + b"\x00\x00\x04\x01", config=0x01)
    seed(t, "header-over-small-max", msg(b"y" * 70), config=0x00)
    seed(t, "max-1024", msg(b"z" * 1023) + answers, config=0x01, sizes=b"\xff\x80")
    seed(t, "half-frame", answers + b"\x00\x00\x00\x10\x00abc", config=0x33)
    seed(t, "half-header", msg(b"x") + b"\x00\x00", config=0x12)
    seed(t, "backpressure", b"".join(msg(bytes([i])) for i in range(40)) + answers, config=0xe4, sizes=b"\x03")


def chat_decoder_v06():
    """One payload of each v0.6 message (docs/PROTOCOL.md's examples)."""
    guid = bytes(range(0, 256, 17))

    def short(s):
        return bytes([len(s)]) + s

    def long(s):
        return struct.pack(">H", len(s)) + s

    def u32(n):
        return struct.pack(">I", n)

    payloads = {
        "hello": u32(16) + guid + b"\x02\x00\x05\x00\x06\x02" + short(b"ack")
        + short(b"presence") + long(b""),
        "welcome": u32(17) + guid + b"\x00\x06\x01" + short(b"ack")
        + u32(65813) + u32(10000) + u32(20) + u32(5000),
        "notice": u32(18) + long(b"bye"),
        "say": u32(19) + guid + long(b"Hi"),
        "direct": u32(20) + guid + short(b"bo") + long(b"psst"),
        "private": u32(21) + short(b"ana") + long(b"psst"),
        "who": u32(22) + guid,
        "members": u32(23) + guid + u32(2) + struct.pack(">H", 2) + short(b"ana") + short(b"bo"),
        "presence": u32(24) + b"\x02" + short(b"ana") + short(b"anna"),
        "history": u32(25) + struct.pack(">Q", 1700000000000) + short(b"ana") + long(b"Hi"),
        "members-lying-count": u32(23) + guid + u32(1) + b"\xff\xff",
        "login": u32(26) + guid + long(b"login\0ana\0pw"),
        "hello-register": u32(16) + guid + b"\x01\x00\x06\x01" + short(b"account")
        + long(b"register\0ana\0pw"),
    }
    d = os.path.join(ROOT, "corpus", "chat_decoder")
    os.makedirs(d, exist_ok=True)
    for name, payload in payloads.items():
        with open(os.path.join(d, "seed-v06-" + name), "wb") as f:
            f.write(payload)


frame_decoder()
connection()
chat_decoder_v06()
