"""Reading what ``tcpdump -w`` captured: the TCP payloads, to tell TLS from plaintext on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Segment:
    """One TCP payload seen on the wire."""

    source: tuple[str, int]
    destination: tuple[str, int]
    payload: bytes


def read_pcap(path: Path) -> list[Segment]:
    """TCP payloads of an Ethernet pcap (what ``tcpdump -w`` writes): enough parsing for IPv4 and IPv6."""
    import ipaddress
    import struct

    data = path.read_bytes()
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    segments: list[Segment] = []
    offset = 24
    while offset + 16 <= len(data):
        captured = struct.unpack(endian + "IIII", data[offset: offset + 16])[2]
        frame = data[offset + 16: offset + 16 + captured]
        offset += 16 + captured
        ethertype = struct.unpack("!H", frame[12:14])[0]
        packet = frame[14:]
        if ethertype == 0x0800 and packet[9] == 6:
            header = (packet[0] & 0x0F) * 4
            total = struct.unpack("!H", packet[2:4])[0]
            src, dst = ipaddress.ip_address(packet[12:16]), ipaddress.ip_address(packet[16:20])
            tcp = packet[header:total]
        elif ethertype == 0x86DD and packet[6] == 6:
            length = struct.unpack("!H", packet[4:6])[0]
            src, dst = ipaddress.ip_address(packet[8:24]), ipaddress.ip_address(packet[24:40])
            tcp = packet[40: 40 + length]
        else:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            segments.append(Segment((str(src), sport), (str(dst), dport), payload))
    return segments
