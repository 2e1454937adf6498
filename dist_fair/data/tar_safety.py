"""Refusing hostile tar members before anything reads them (every dist_fair tar reader calls this).

dist_fair never extracts a tar to disk: shards and UTKFace archives are read in place, member by
member. A member is still refused, before its bytes are read, when it

- has an absolute name (``/etc/passwd``, ``\\share\\x``, ``C:\\x``) or a ``..`` component
  (``a/../../x``): a name that would point outside the archive's folder if anyone extracted it;
- is a symbolic or hard link (its bytes would be another file's);
- is a character or block device, or a FIFO;
- declares (in its header) more bytes than the caller allows: reading such a member would hold
  gigabytes in memory, or it claims more bytes than the file has, which only a forged or truncated
  header does.

Directories are allowed (their names are checked like any other). Each refusal is an
``UnsafeTarMemberError`` (a ``DataError``) naming the tar file, the member, the reason and the fix.
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

from dist_fair.errors import DataError

_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeTarMemberError(DataError):
    """A tar member that dist_fair refuses to read (absolute or ``..`` name, link, device, oversize)."""


def _fix(tar_name: str) -> str:
    return (f"rebuild {tar_name} from a trusted source without this member "
            "(dist_fair shards hold only regular files with plain relative names)")


def unsafe_member_reason(member: tarfile.TarInfo, max_member_bytes: int) -> str | None:
    """Why ``member`` must not be read, or None when it is safe (see the module docstring)."""
    name = member.name
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' path component (it points outside the archive)"
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "is a device entry"
    if member.isfifo():
        return "is a FIFO (named pipe)"
    if not (member.isfile() or member.isdir()):
        return f"has an unsupported entry type {member.type!r}"
    if member.isfile() and member.size > max_member_bytes:
        return (f"declares {member.size:,} bytes in its header, more than the {max_member_bytes:,} "
                "allowed here (a forged header, a truncated file or a member too large to read into memory)")
    return None


def check_tar_member(tar_path: str | Path, member: tarfile.TarInfo, max_member_bytes: int) -> None:
    """Raise ``UnsafeTarMemberError`` if ``member`` of ``tar_path`` is unsafe to read.

    Args:
        tar_path: the archive (named in the message).
        member: the header just read by ``tarfile``.
        max_member_bytes: the most bytes a regular member may declare (e.g. the file's own size for
            a shard, a per-image cap for JPEG archives).
    """
    reason = unsafe_member_reason(member, max_member_bytes)
    if reason is not None:
        tar_name = str(tar_path)
        raise UnsafeTarMemberError(f"tar file {tar_name}: member {member.name!r} {reason}; refused. "
                                   f"Fix: {_fix(tar_name)}")
