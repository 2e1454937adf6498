"""dist_fair.data.attribute_files: side files (name lists, JSON, CSV) joined by image or person name."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_fair.data.attribute_files import (
    AttributeFile, join_attributes, parse_attribute_spec, read_attribute_file,
)
from dist_fair.errors import DataError

# (person, image file name) in id order
SAMPLES = [("Ann", "Ann_0001.jpg"), ("Ann", "Ann_0002.jpg"), ("Bob", "Bob_0001.jpg"), ("Cid", "Cid_0001.jpg"),
           ("Dee", "Dee_0001.jpg")]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_name_lists_pool_and_count_missing_and_conflicting(tmp_path):
    female = write(tmp_path / "f.txt", "Ann_0001.jpg\nAnn_0002.jpg\n\n# comment\nDee_0001.jpg\n")
    male = write(tmp_path / "m.txt", "Bob_0001.jpg\nDee_0001.jpg\nZed_0001.jpg\n")
    joined = join_attributes(SAMPLES, [AttributeFile("gender", female, "list", value="female"),
                                       AttributeFile("gender", male, "list", value="male")])
    assert joined.names == {"gender": ["female", "male"]}
    # Cid in neither list (missing), Dee in both (conflicting)
    np.testing.assert_array_equal(joined.codes["gender"], [0, 0, 1, -1, -1])
    assert joined.codes["gender"].dtype == np.int16
    assert joined.unknown == {"gender": {"missing": 1, "conflicting": 1}}
    assert joined.unmatched_keys == {"gender": 1}          # Zed
    assert [f["join"] for f in joined.files] == ["image", "image"] and joined.files[1]["matched_keys"] == 2
    assert joined.source_fields()["attribute_unknown"] == joined.unknown


def test_json_by_person_multi_label_unknown_or_first(tmp_path):
    race = write(tmp_path / "race.json", json.dumps({"Ann": "caucasian", "Bob": "african,caucasian",
                                                     "Cid": ["latino", "other"], "Eve": "eastasian"}))
    spec = AttributeFile("race", race, "json")
    assert read_attribute_file(spec).join == "person"     # auto: no key ends in an image suffix
    joined = join_attributes(SAMPLES, [spec])
    # every label the file mentions is a group name, sorted, also those only seen in multi-labels
    assert joined.names["race"] == ["african", "caucasian", "eastasian", "latino", "other"]
    np.testing.assert_array_equal(joined.codes["race"], [1, 1, -1, -1, -1])
    assert joined.unknown["race"] == {"missing": 1, "conflicting": 2} and joined.unmatched_keys["race"] == 1
    first = join_attributes(SAMPLES, [spec], multi_label="first")
    np.testing.assert_array_equal(first.codes["race"], [1, 1, 0, 3, -1])
    assert first.unknown["race"] == {"missing": 1, "conflicting": 0}


def test_two_files_that_disagree_stay_conflicting_with_first(tmp_path):
    a = write(tmp_path / "a.json", json.dumps({"Ann": "x,y"}))
    b = write(tmp_path / "b.json", json.dumps({"Ann": "y"}))
    joined = join_attributes(SAMPLES, [AttributeFile("g", a, "json"), AttributeFile("g", b, "json")],
                             multi_label="first")
    assert joined.codes["g"][:2].tolist() == [-1, -1] and joined.unknown["g"]["conflicting"] == 2


def test_json_duplicate_keys_pool_their_values(tmp_path):
    path = write(tmp_path / "dup.json", '{"Bob": "a", "Bob": "b", "Ann": "a", "Ann": "a"}')
    values = read_attribute_file(AttributeFile("g", path, "json"))
    assert values.labels == {"Bob": ("a", "b"), "Ann": ("a",)} and values.conflicting_keys == 1
    joined = join_attributes(SAMPLES, [values])
    np.testing.assert_array_equal(joined.codes["g"], [0, 0, -1, -1, -1])
    assert joined.unknown["g"] == {"missing": 2, "conflicting": 1}


def test_csv_by_image_and_by_person(tmp_path):
    by_image = write(tmp_path / "img.csv", "file,skin,age\nAnn_0002.jpg,dark,young\nBob_0001.jpg,,old\n"
                                           "Cid_0001.jpg,light,old\n")
    joined = join_attributes(SAMPLES, [AttributeFile("skin", by_image, "csv"),
                                       AttributeFile("age", by_image, "csv")])
    assert joined.names == {"skin": ["dark", "light"], "age": ["old", "young"]}
    np.testing.assert_array_equal(joined.codes["skin"], [-1, 0, -1, 1, -1])   # Bob's empty field: missing
    np.testing.assert_array_equal(joined.codes["age"], [-1, 1, 0, 0, -1])
    assert joined.unknown["skin"] == {"missing": 3, "conflicting": 0}
    by_person = write(tmp_path / "people.csv", "group;person\nA;Ann\nB;Dee\nB;Ann\n")
    joined = join_attributes(SAMPLES, [AttributeFile("group", by_person, "csv", key_column="person")])
    np.testing.assert_array_equal(joined.codes["group"], [-1, -1, -1, -1, 1])   # Ann listed A and B
    assert joined.unknown["group"] == {"missing": 2, "conflicting": 2}
    joined = join_attributes(SAMPLES, [AttributeFile("grp", by_person, "csv", column="group", key_column="person",
                                                     join="person")])
    assert joined.names == {"grp": ["A", "B"]}


def test_bare_file_names_must_be_unique_person_paths_are_not(tmp_path):
    casia = [("0001", "001.jpg"), ("0001", "002.jpg"), ("0002", "001.jpg")]
    bare = write(tmp_path / "bare.txt", "002.jpg\n")
    assert join_attributes(casia, [AttributeFile("g", bare, "list", value="v")]).codes["g"].tolist() == [-1, 0, -1]
    ambiguous = write(tmp_path / "amb.txt", "001.jpg\n")
    with pytest.raises(DataError, match="ambiguous.*Person/file.jpg"):
        join_attributes(casia, [AttributeFile("g", ambiguous, "list", value="v")])
    paths = write(tmp_path / "paths.txt", "CASIA/0002/001.jpg\n0001\\001.jpg\n")
    joined = join_attributes(casia, [AttributeFile("g", paths, "list", value="v")])
    assert joined.codes["g"].tolist() == [0, -1, 0]


def test_spec_parsing_and_errors(tmp_path):
    assert parse_attribute_spec("gender:female=a/f.txt") == AttributeFile("gender", "a/f.txt", "list", value="female")
    assert parse_attribute_spec("race=r.json", join="person") == AttributeFile("race", "r.json", "json", join="person")
    assert parse_attribute_spec("skin=s.csv", key_column="k").key_column == "k"
    for bad, message in [("gender", "expected"), ("=x.json", "expected"), ("g=list.txt", "VALUE"),
                         ("g:=x.txt", "value")]:
        with pytest.raises(DataError, match=message):
            parse_attribute_spec(bad)
    with pytest.raises(DataError, match="join 'name' must be one of"):
        AttributeFile("g", "x.json", "json", join="name")
    with pytest.raises(DataError, match="not found"):
        join_attributes(SAMPLES, [AttributeFile("g", str(tmp_path / "none.json"), "json")])
    for text, message in [("[1, 2]", "top level must be a JSON object"), ("{nope", "not valid JSON"),
                          ('{"Ann": {"x": 1}}', "value is an object"), ('{"Ann": 1.5}', "must be a string")]:
        path = write(tmp_path / "bad.json", text)
        with pytest.raises(DataError, match=message):
            read_attribute_file(AttributeFile("g", path, "json"))
    empty = write(tmp_path / "empty.json", "{}")
    with pytest.raises(DataError, match="hold no values"):
        join_attributes(SAMPLES, [AttributeFile("g", empty, "json")])
    csv_path = write(tmp_path / "c.csv", "name,g\nAnn,x\n")
    with pytest.raises(DataError, match="no column 'race'"):
        read_attribute_file(AttributeFile("race", csv_path, "csv"))
    with pytest.raises(DataError, match="multi_label"):
        join_attributes(SAMPLES, [], multi_label="all")
