"""Hostile files (issue 16): tar members with absolute or '..' names, links and devices, a member
whose header claims gigabytes, JPEG decompression bombs, a YAML config with Python tags. Each is
refused with a named error, and nothing is written outside the output folder."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dist_fair.data.images import (
    MAX_IMAGE_PIXELS, check_image_pixels, jpeg_problem, write_images_shards, write_utkface_shards,
)
from dist_fair.data.tar_safety import UnsafeTarMemberError
from dist_fair.errors import ConfigError, DataError


def small_jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid small JPEG whose SOF0 header is edited to declare ``width`` x ``height`` pixels."""
    data = bytearray(small_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def files_outside(root: Path, out: Path) -> set[Path]:
    return {p for p in root.rglob("*") if out not in p.parents and p != out}


def utk_tar(path: Path, extra: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]], close: bool = True) -> Path:
    """A UTKFace-style tar with two good images and the ``extra`` members (``close=False``: the file
    ends right after the last member, without the end-of-archive blocks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, name in enumerate(["20_0_1_2017.jpg.chip.jpg", "31_1_2_2017.jpg.chip.jpg"]):
            data = small_jpeg(i)
            info = tarfile.TarInfo(f"UTKFace/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for item in extra:
            if isinstance(item, tuple):
                tar.addfile(item[0], io.BytesIO(item[1]))
            else:
                tar.addfile(item)
        members_end = tar.offset
    path.write_bytes(buf.getvalue() if close else buf.getvalue()[:members_end])
    return path


def _member(name, kind=tarfile.REGTYPE, data=b"", linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), linkname
    return (info, data) if data else info


@pytest.mark.parametrize("member, reason", [
    (_member("/tmp/abs_0_1_2017.jpg.chip.jpg", data=small_jpeg()), "absolute path"),
    (_member("UTKFace/../../up_0_1_2017.jpg.chip.jpg", data=small_jpeg()), "'..'"),
    (_member("UTKFace/40_0_1_2017.jpg.chip.jpg", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    (_member("UTKFace/41_0_1_2017.jpg.chip.jpg", tarfile.LNKTYPE, linkname="UTKFace/x.jpg"), "hard link"),
    (_member("UTKFace/dev.jpg", tarfile.CHRTYPE), "device"),
    (_member("UTKFace/fifo.jpg", tarfile.FIFOTYPE), "FIFO"),
])
def test_utkface_tar_with_a_hostile_member_is_refused(tmp_path, member, reason):
    source = utk_tar(tmp_path / "in" / "UTKFace-00.tar", [member])
    out = tmp_path / "out"
    before = files_outside(tmp_path, out)
    with pytest.raises(UnsafeTarMemberError, match=reason) as err:
        write_utkface_shards(out, source, progress=False)
    assert "UTKFace-00.tar" in str(err.value) and "Fix: rebuild" in str(err.value)
    assert files_outside(tmp_path, out) == before  # nothing extracted or written anywhere else
    assert not (out / "manifest.json").exists()


def test_utkface_member_header_claiming_gigabytes_is_refused(tmp_path):
    path = utk_tar(tmp_path / "UTKFace-00.tar", [], close=False)
    header = tarfile.TarInfo("UTKFace/50_0_1_2017.jpg.chip.jpg")
    header.size = 8 << 30  # the file itself has a few KiB
    path.write_bytes(path.read_bytes() + header.tobuf(format=tarfile.GNU_FORMAT) + b"\xff" * 4096 + bytes(1024))
    with pytest.raises(UnsafeTarMemberError, match="declares 8,589,934,592 bytes"):
        write_utkface_shards(tmp_path / "out", path, progress=False)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12000, 60000])  # 1.6x PIL's limit (PIL only warns) and 40x (PIL raises)
def test_jpeg_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    bomb = jpeg_declaring(side, side)
    assert side * side > MAX_IMAGE_PIXELS
    assert "decompression bomb" in jpeg_problem(bomb, "header")
    assert "decompression bomb" in jpeg_problem(bomb, "decode")
    root = tmp_path / "faces"
    for group, ident in (("A", "p1"), ("B", "p2")):
        (root / group / ident).mkdir(parents=True)
        (root / group / ident / "00.jpg").write_bytes(small_jpeg())
    (root / "B" / "p2" / "01.jpg").write_bytes(bomb)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"image B/p2/01.jpg: decompression bomb.*--skip-bad"):
        write_images_shards(out, root, progress=False)
    assert not (out / "manifest.json").exists()
    manifest = write_images_shards(out, root, skip_bad=True, progress=False)
    assert manifest.num_samples == 2 and "decompression bomb" in manifest.source["bad_files_first"][0]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_check_image_pixels_for_other_decoders():
    with Image.open(io.BytesIO(jpeg_declaring(12000, 12000))) as image:
        with pytest.raises(DataError, match="sample 7: decompression bomb: the header declares 12000 x 12000"):
            check_image_pixels(image, "sample 7")
    with Image.open(io.BytesIO(small_jpeg())) as image:
        check_image_pixels(image, "fine")


def test_yaml_config_with_python_tags_is_refused_and_not_executed(tmp_path):
    from dist_fair.config import load_config

    marker = tmp_path / "executed"
    config = tmp_path / "job.yaml"
    config.write_text(f'run_dir: !!python/object/apply:os.system ["touch {marker}"]\n'
                      f"data: !!python/object/new:os.system [\"touch {marker}\"]\n")
    with pytest.raises(ConfigError, match=f"config file {config} is not valid YAML.*python/object"):
        load_config(config)
    assert not marker.exists()
    from dist_fair.cli import main

    assert main(["run", "--config", str(config), "--plan"]) == 1
    assert not marker.exists()
