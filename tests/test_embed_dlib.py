"""The ``dlib-resnet`` embedder and the embedder registry on real LFW faces.

20 images of 5 people from ``../shared/data/lfw/lfw-deepfunneled-00.tar`` (read in place by
member offset) become two image shards. Checked against independent references: the descriptors
dlib's own calls give and the shipped ``lfw_dlib128.npz`` (same procedure, not normalised), the
same-person / different-person distance ordering, the no-face fallback box, Ray workers against
one process, and resuming after a lost shard.
"""
import io
import json
import sys
import tarfile
from collections import defaultdict

import numpy as np
import pytest

from dist_fair.data import shards as S
from dist_fair.data.images import ImageEntry, write_image_entries
from dist_fair.embed import dlib_resnet
from dist_fair.embed.registry import Embedder, EmbeddedBatch, create_embedder, list_embedders, register_embedder
from dist_fair.embed.stage import load_flag, run_embed
from dist_fair.errors import ConfigError, ShardError

pytest.importorskip("dlib", reason="dlib-resnet needs dist_fair[faces]")

PEOPLE = 5
PER_PERSON = 4
NO_FACE_IN_REFERENCE = "Abdoulaye_Wade_0003.jpg"  # lfw_dlib128.npz marks it no_face
#: images where the HOG detector finds several faces (the one nearest the centre is embedded)
SEVERAL_FACES = ["Abdullah_Gul_0008.jpg", "Abdullah_Gul_0009.jpg", "Abdullah_Gul_0011.jpg"]


@pytest.fixture(scope="module")
def lfw_dir(shared_data):
    return shared_data / "lfw"


@pytest.fixture(scope="module")
def lfw_entries(lfw_dir):
    """4 images each of the first 5 people (sorted) with >= 4 images: one of Abdoulaye Wade's has no
    HOG-detectable face, three of Abdullah Gul's have several; gender from the LFW name lists."""
    tar_path = lfw_dir / "lfw-deepfunneled-00.tar"
    female = set((lfw_dir / "lfw_female_names.txt").read_text().split())
    by_person = defaultdict(list)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                by_person[member.name.split("/")[-2]].append(member)
    people = [p for p in sorted(by_person) if len(by_person[p]) >= PER_PERSON]
    chosen = ["Abdoulaye_Wade"] + [p for p in people if p != "Abdoulaye_Wade"][: PEOPLE - 1]
    entries = []
    for identity, person in enumerate(sorted(chosen)):
        members = sorted(by_person[person], key=lambda m: m.name)
        if person == "Abdullah_Gul":
            members = [m for m in members if m.name.endswith(tuple(SEVERAL_FACES))] + members
        for member in sorted(members[:PER_PERSON], key=lambda m: m.name):
            base = member.name.split("/")[-1]
            entries.append(ImageEntry(base, str(tar_path), member.name, member.offset_data, member.size, identity,
                                      {"gender": int(base in female)}))
    return entries


@pytest.fixture(scope="module")
def lfw_shards(lfw_entries, tmp_path_factory):
    out = tmp_path_factory.mktemp("lfw-images")
    write_image_entries(out, lfw_entries, {"gender": ["male", "female"]}, {"source": "test-lfw"}, shard_rows=11,
                        progress=False)
    return out


@pytest.fixture(scope="module")
def embedded(lfw_shards, tmp_path_factory):
    """The in-process run every other check compares with."""
    out = tmp_path_factory.mktemp("lfw-emb") / "one"
    run = run_embed(lfw_shards, out, "dlib-resnet", workers=1, dtype="float32", progress=False)
    return out, run


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_output_is_normalised_and_labels_carry_over(lfw_shards, embedded):
    out, run = embedded
    manifest = run.manifest
    assert manifest.kind == "embeddings" and manifest.dim == 128 and manifest.num_samples == PEOPLE * PER_PERSON
    assert len(manifest.shards) == 2 and run.embedded == 20 and run.resumed == 0
    assert run.images_per_s > 0 and run.images_per_cpu_s > 0
    emb = S.load_embeddings(out)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    images, embedded_labels = S.load_labels(lfw_shards), S.load_labels(out)
    assert np.array_equal(images.identity, embedded_labels.identity)
    assert np.array_equal(images.attrs["gender"], embedded_labels.attrs["gender"])
    assert manifest.source["model"] == "dlib-resnet" and manifest.source["random_weights"] is False


def test_same_person_closer_than_different_people(embedded):
    out, _ = embedded
    emb = S.load_embeddings(out).astype(np.float64)
    identity = S.load_labels(out).identity
    dist = np.linalg.norm(emb[:, None, :] - emb[None, :, :], axis=2)
    upper = np.triu(np.ones_like(dist, bool), k=1)
    same = dist[upper & (identity[:, None] == identity[None, :])]
    different = dist[upper & (identity[:, None] != identity[None, :])]
    assert same.size == PEOPLE * PER_PERSON * (PER_PERSON - 1) // 2
    ordered = (same[:, None] < different[None, :]).mean()
    assert ordered >= 0.95, f"only {ordered:.3f} of (same, different) pairs are ordered"


def test_matches_reference_descriptors(lfw_dir, lfw_entries, embedded):
    out, run = embedded
    reference = np.load(lfw_dir / "lfw_dlib128.npz", allow_pickle=False)
    position = {str(n): i for i, n in enumerate(reference["names"])}
    rows = np.array([position[e.name] for e in lfw_entries])
    ref = reference["emb"][rows].astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cosine = (S.load_embeddings(out).astype(np.float64) * ref).sum(axis=1)
    assert cosine.min() >= 0.999, f"lowest cosine {cosine.min():.5f} at {lfw_entries[int(cosine.argmin())].name}"
    no_face = load_flag(out, "no_face")
    assert np.array_equal(no_face, reference["no_face"][rows])
    assert no_face[[e.name for e in lfw_entries].index(NO_FACE_IN_REFERENCE)]
    # The centre rule is exercised: dlib's detector finds several faces on these.
    import dlib
    from PIL import Image

    detector = dlib.get_frontal_face_detector()
    several = [e for e in lfw_entries if e.name in SEVERAL_FACES]
    assert len(several) == len(SEVERAL_FACES)
    for entry in several:
        with open(entry.path, "rb") as handle:
            handle.seek(entry.offset)
            image = np.asarray(Image.open(io.BytesIO(handle.read(entry.size))).convert("RGB"))
        assert len(detector(image, 1)) > 1, entry.name
    assert run.manifest.source["no_face"] == int(no_face.sum()) == run.flags["no_face"] >= 1


def test_no_face_fallback_is_counted_and_matches_dlib(lfw_entries, tmp_path):
    import dlib
    from PIL import Image

    rng = np.random.default_rng(0)
    uniform = np.full((250, 250, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
    face = lfw_entries[0]
    with open(face.path, "rb") as handle:
        handle.seek(face.offset)
        face_jpg = handle.read(face.size)
    jpgs = [_jpeg(uniform), face_jpg, _jpeg(noise)]
    folder = tmp_path / "files"
    folder.mkdir()
    entries = []
    for i, data in enumerate(jpgs):
        (folder / f"{i}.jpg").write_bytes(data)
        entries.append(ImageEntry(f"{i}.jpg", str(folder / f"{i}.jpg"), None, 0, len(data), None, {}))
    write_image_entries(tmp_path / "images", entries, {}, {"source": "test"}, shard_rows=2, progress=False)
    run = run_embed(tmp_path / "images", tmp_path / "emb", "dlib-resnet", dtype="float32", progress=False)
    assert run.manifest.num_samples == 3 and run.manifest.source["no_face"] == 2
    assert load_flag(tmp_path / "emb").tolist() == [True, False, True]
    emb = S.load_embeddings(tmp_path / "emb")
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # Independent reference: dlib's calls on the centred 111 x 111 box.
    files = dlib_resnet.locate_model_files()
    predictor = dlib.shape_predictor(str(files["landmarks"]))
    recognition = dlib.face_recognition_model_v1(str(files["recognition"]))
    for row, image in ((0, uniform), (2, noise)):
        assert len(dlib.get_frontal_face_detector()(image, 1)) == 0
        h, w = image.shape[:2]
        decoded = np.asarray(Image.open(io.BytesIO(jpgs[row])).convert("RGB"))
        box = dlib.rectangle(w // 2 - 55, h // 2 - 55, w // 2 + 55, h // 2 + 55)
        expected = np.array(recognition.compute_face_descriptor(decoded, predictor(decoded, box), 0, 0.25))
        assert float(emb[row] @ expected / np.linalg.norm(expected)) > 0.99999


def test_choose_face_and_fallback_box():
    assert dlib_resnet.choose_face([], 250, 250) is None
    boxes = [(0, 0, 50, 50), (100, 100, 150, 150), (200, 200, 250, 250)]
    assert dlib_resnet.choose_face(boxes, 250, 250) == 1
    assert dlib_resnet.choose_face(boxes, 60, 60) == 0
    assert dlib_resnet.fallback_box(250, 250) == (70, 70, 180, 180)
    assert dlib_resnet.fallback_box(240, 180) == (65, 35, 175, 145)


def test_ray_workers_equal_one_process_and_resume(lfw_shards, embedded, tmp_path, ray_cluster):
    one_dir, one = embedded
    two = run_embed(lfw_shards, tmp_path / "two", "dlib-resnet", workers=2, dtype="float32", progress=False)
    assert [s.sha256 for s in two.manifest.shards] == [s.sha256 for s in one.manifest.shards]
    assert np.array_equal(load_flag(tmp_path / "two"), load_flag(one_dir))
    assert two.embedded == 20 and two.manifest.source["no_face"] == one.manifest.source["no_face"]
    first, second = two.manifest.shards
    kept_stat = (tmp_path / "two" / first.name).stat()
    (tmp_path / "two" / second.name).unlink()
    again = run_embed(lfw_shards, tmp_path / "two", "dlib-resnet", workers=2, dtype="float32", progress=False)
    assert again.embedded == second.samples and again.resumed == first.samples
    assert [s.sha256 for s in again.manifest.shards] == [s.sha256 for s in one.manifest.shards]
    assert (tmp_path / "two" / first.name).stat().st_mtime_ns == kept_stat.st_mtime_ns
    assert np.array_equal(load_flag(tmp_path / "two"), load_flag(one_dir))
    assert again.manifest.source["no_face"] == one.manifest.source["no_face"]


def test_lost_record_redoes_its_shard(lfw_shards, embedded, tmp_path):
    """A finished shard whose flags record is gone is embedded again (its flags are not guessed)."""
    import shutil

    one_dir, one = embedded
    shutil.copytree(one_dir, tmp_path / "copy")
    first = one.manifest.shards[0]
    records = sorted((tmp_path / "copy").glob(f".{first.name[:-4]}.embed-*.npz"))
    assert len(records) == 1
    records[0].unlink()
    # The copy lives elsewhere, but the job (image shards, model, dtype) is the same one.
    again = run_embed(lfw_shards, tmp_path / "copy", "dlib-resnet", dtype="float32", progress=False)
    assert again.embedded == first.samples and again.resumed == one.manifest.num_samples - first.samples
    assert np.array_equal(load_flag(tmp_path / "copy"), load_flag(one_dir))


def test_cli_summary(lfw_shards, tmp_path, capsys, ray_cluster):
    from dist_fair.cli import main

    small = tmp_path / "small"
    manifest = S.read_manifest(lfw_shards)
    entries = []
    for info in manifest.shards[:1]:
        for sample in S.iter_tar_samples(lfw_shards / info.name):
            path = tmp_path / f"{sample['__key__']}.jpg"
            path.write_bytes(sample["jpg"])
            entries.append(ImageEntry(path.name, str(path), None, 0, path.stat().st_size, 0, {}))
            if len(entries) == 4:
                break
    write_image_entries(small, entries, {}, {"source": "test"}, shard_rows=2, progress=False)
    assert main(["embed", "--model", "dlib-resnet", "--shards", str(small), "--out", str(tmp_path / "e"),
                 "--workers", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 4 and summary["dim"] == 128 and summary["embedded"] == 4
    assert summary["images_per_s"] > 0 and summary["images_per_cpu_s"] > 0
    assert "no_face" in summary and summary["random_weights"] is False
    assert main(["embed", "--model", "dlib-resnet", "--checkpoint", "w.pt", "--shards", str(small),
                 "--out", str(tmp_path / "f")]) == 1
    assert "takes no option 'checkpoint'" in capsys.readouterr().err


def test_registry_names_and_errors():
    choices = list_embedders()
    assert "dlib-resnet" in choices and "timm:<model>" in choices
    with pytest.raises(ConfigError, match="unknown; choose one of: .*dlib-resnet.*timm:<model>"):
        create_embedder("no_such_model_xyz")
    with pytest.raises(ConfigError, match="not a timm model name"):
        create_embedder("timm:no_such_model_xyz")
    with pytest.raises(ConfigError, match="takes no option 'image_size'"):
        create_embedder("dlib-resnet", image_size=112)
    with pytest.raises(ConfigError, match="takes no option 'nonsense'.*checkpoint, image_size, seed"):
        create_embedder("resnet18", nonsense=1)
    timm_net = create_embedder("resnet18", image_size=32)
    assert timm_net.dim == 512 and timm_net.flags == ()
    assert create_embedder("timm:resnet18", image_size=32).describe() == timm_net.describe()
    dlib_net = create_embedder("dlib-resnet")
    assert dlib_net.dim == 128 and dlib_net.flags == ("no_face",)
    assert dlib_net.describe()["weights"]["recognition_file"] == dlib_resnet.RECOGNITION_FILE


def test_timm_name_still_runs_through_the_stage(lfw_shards, tmp_path):
    run = run_embed(lfw_shards, tmp_path / "t", "resnet18", image_size=32, dtype="float32", progress=False)
    emb = S.load_embeddings(tmp_path / "t")
    assert emb.shape == (20, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert run.manifest.source["random_weights"] is True and "no_face" not in run.manifest.source
    with pytest.raises(ShardError, match="no flag 'no_face'"):
        load_flag(tmp_path / "t")


def test_register_a_custom_embedder():
    @register_embedder("test-mean-colour", description="mean RGB of the image (test only)")
    def make(model: str, scale: float = 1.0) -> Embedder:
        class MeanColour(Embedder):
            dim = 3

            def embed_jpegs(self, images, where):
                from PIL import Image

                rows = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.float32).mean((0, 1))
                                 for d in images]) * scale
                return EmbeddedBatch(rows / np.linalg.norm(rows, axis=1, keepdims=True))

            def describe(self):
                return {"model": "test-mean-colour", "scale": scale}

        return MeanColour()

    embedder = create_embedder("test-mean-colour", scale=2.0)
    assert embedder.name == "test-mean-colour" and embedder.describe()["scale"] == 2.0
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    rows = embedder.embed_jpegs([_jpeg(red)], ["red"]).rows
    assert rows.shape == (1, 3) and rows[0, 0] > 0.99
    assert "test-mean-colour" in list_embedders()
    with pytest.raises(ConfigError, match="registered twice"):
        register_embedder("test-mean-colour")(lambda model: None)


def test_missing_dependencies_name_the_install(monkeypatch):
    with pytest.raises(ConfigError, match=r"not installed; install .*dist_fair\[faces\]"):
        dlib_resnet.locate_model_files("no_such_package_xyz")
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs dlib.*dist_fair\[faces\].*make install"):
        dlib_resnet.import_dlib()
