"""Tests of `m2d2_hf.data.labels`: label cells → names → targets."""

import numpy as np
import pytest
import torch

from m2d2_hf.data.labels import (
    LabelReader,
    class_names,
    encode_targets,
    parse_label_list,
    split_labels,
    targets_of,
)


def test_split_labels():
    assert split_labels(None) == []
    assert split_labels(" dog, bark ,,") == ["dog", "bark"]
    assert split_labels("a;b", separator=None) == ["a;b"]
    assert split_labels(["a", None, 2]) == ["a", 2]
    assert split_labels(np.array([1, 3])) == [1, 3]
    assert split_labels(4) == [4]


def test_label_reader_names_and_the_single_label_check():
    single = LabelReader("label", multi_label=False, separator=None)
    assert single.names(" dog ") == ["dog"] and single.names(None) == [] and single.names(3) == ["3"]
    with pytest.raises(ValueError, match="holds several labels .* pass --multi_label"):
        single.names(["a", "b"])
    multi = LabelReader("label", multi_label=True, separator=";")
    assert multi.names("a; b;") == ["a", "b"] and multi.names(np.array(["x", "y"])) == ["x", "y"]


def test_class_names_and_encode_targets():
    assert class_names(["b", "a", "b"]) == ["a", "b"]
    assert class_names(["a, c", ["b"]], multi_label=True) == ["a", "b", "c"]
    labels = ["a", "b", "c"]
    encoded = encode_targets(["c", 0, np.int64(1)], labels)
    assert encoded.dtype == np.int64 and encoded.tolist() == [2, 0, 1]
    assert encode_targets(["a|c", [1]], labels, multi_label=True, separator="|").tolist() == [[1, 0, 1], [0, 1, 0]]
    for bad in ("d", 3, True):
        with pytest.raises(ValueError, match="is not one of the 3 classes"):
            encode_targets([bad], labels)


def test_targets_of_ignores_names_outside_the_label_set():
    reader = LabelReader("label", multi_label=True, separator=",")
    targets = targets_of(["a,c", "b,unknown", None], reader, {"a": 0, "b": 1, "c": 2})
    assert targets.dtype == torch.float32
    assert targets.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_parse_label_list():
    assert parse_label_list(" dog, cat ,") == ["dog", "cat"]
    assert parse_label_list("dog\r\ncat\n\n", "\n") == ["dog", "cat"]
    assert parse_label_list(" , ") == []
    with pytest.raises(ValueError, match=r"the labels repeat \['dog'\]: give each class once"):
        parse_label_list("dog,cat,dog")
