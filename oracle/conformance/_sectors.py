"""First sectors of QEMU's image formats, and near misses, for the probed-raw tests."""

from __future__ import annotations

__all__ = ["HAND_MADE", "HARMLESS"]


def _sector(head: bytes) -> bytes:
    return head.ljust(512, b"\0")


#: Hand-made first sectors QEMU probes as another format, by that format's name.
HAND_MADE: dict[str, bytes] = {
    "qcow": _sector(b"QFI\xfb\0\0\0\1"),
    "qed": _sector(b"QED\0"),
    "vdi": _sector(b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
                   + b"\x7f\x10\xda\xbe"),
    "vpc": _sector(b"conectix"),
    "vhdx": _sector(b"vhdxfile"),
    "vmdk": _sector(b"KDMV\1\0\0\0"),
    "vmdk-text": _sector(b"# Disk DescriptorFile\n  \nversion=1\nCID=fffffffe\n"),
    "bochs": _sector(b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0")
                     + b"Growing".ljust(16, b"\0") + b"\0\0\2\0"),
    "cloop": _sector(b"#!/bin/sh\n#V2.0 Format\n"
                     b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"),
    "parallels": _sector(b"WithoutFreeSpace\2\0\0\0"),
    "luks": _sector(b"LUKS\xba\xbe\0\1"),
}
#: Near misses that QEMU still probes as raw (a write of them must go through).
HARMLESS: dict[str, bytes] = {
    "qcow2 version 0": _sector(b"QFI\xfb\0\0\0\0"),
    "qed without NUL": _sector(b"QEDX"),
    "vmdk text, no version": _sector(b"# Disk DescriptorFile\nCID=fffffffe\n"),
    "vmdk text, empty line first": _sector(b"\nversion=1\n"),
    "bochs, wrong version": _sector(b"Bochs Virtual HD Image".ljust(32, b"\0")
                                    + b"Redolog".ljust(16, b"\0")
                                    + b"Growing".ljust(16, b"\0") + b"\0\0\3\0"),
    "parallels version 1": _sector(b"WithoutFreeSpace\1\0\0\0"),
    "text": _sector(b"hello, world\n" * 8),
}
