"""tar_safety: every hostile member kind is refused with a message naming file, member, reason, fix."""
import io
import tarfile

import pytest

from dist_fair.data.tar_safety import UnsafeTarMemberError, check_tar_member, unsafe_member_reason
from dist_fair.errors import DataError


def _member(name="a/b.jpg", type_=tarfile.REGTYPE, size=10, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = type_, size, linkname
    return info


@pytest.mark.parametrize("name", ["a.jpg", "dir/sub/a.jpg", "emb-000001.emb.npy", "a..b.jpg", "./a.jpg"])
def test_plain_members_pass(name):
    assert unsafe_member_reason(_member(name), 100) is None
    check_tar_member("x.tar", _member(name), 100)


def test_directories_pass():
    assert unsafe_member_reason(_member("dir", tarfile.DIRTYPE, 0), 100) is None


@pytest.mark.parametrize("member, words", [
    (_member("/etc/passwd"), "absolute path"),
    (_member("\\share\\x.jpg"), "absolute path"),
    (_member("C:\\x.jpg"), "absolute path"),
    (_member("a/../../etc/x"), "'..'"),
    (_member(".."), "'..'"),
    (_member("a\\..\\x"), "'..'"),
    (_member("link.jpg", tarfile.SYMTYPE, 0, "/etc/passwd"), "symbolic link"),
    (_member("hard.jpg", tarfile.LNKTYPE, 0, "other.jpg"), "hard link"),
    (_member("dev", tarfile.CHRTYPE, 0), "device"),
    (_member("blk", tarfile.BLKTYPE, 0), "device"),
    (_member("pipe", tarfile.FIFOTYPE, 0), "FIFO"),
    (_member("big.jpg", size=101), "declares 101 bytes"),
])
def test_hostile_members_refused(member, words):
    with pytest.raises(UnsafeTarMemberError) as err:
        check_tar_member("data/in.tar", member, 100)
    message = str(err.value)
    assert isinstance(err.value, DataError)
    assert "data/in.tar" in message and repr(member.name) in message and words in message
    assert "Fix: rebuild data/in.tar" in message


def test_size_limit_is_inclusive():
    assert unsafe_member_reason(_member(size=100), 100) is None


def test_real_archive_headers():
    """Headers as tarfile parses them from bytes (not only hand-built TarInfo objects)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"x" * 5
        tar.addfile(_member("ok.jpg", size=5), io.BytesIO(data))
        tar.addfile(_member("evil", tarfile.SYMTYPE, 0, "../../x"))
        tar.addfile(_member("../up.jpg", size=5), io.BytesIO(data))
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r|") as tar:
        reasons = [unsafe_member_reason(m, 1 << 20) for m in tar]
    assert reasons[0] is None and "symbolic link" in reasons[1] and "'..'" in reasons[2]
