import pytest

from tunelab.data.overlap import load_texts, overlap
from tunelab.errors import UserError

from conftest import make_rows, write_csv

A = ["the flight to albuquerque was late again and the crew at the gate was rude to everyone",
     "my new phone arrived today and the screen is already cracked which is sad"]


def test_exact_and_near_overlap_are_counted_separately():
    b = [A[0].upper() + "  ", A[1] + " really", "something entirely unrelated to anything above here"]
    rep = overlap(A, b)
    assert rep["exact"] == 1 and rep["near"] == 1 and rep["contaminated"] == 2
    assert rep["near_examples"][0]["a"] == A[1]
    assert rep["contaminated_share"] == pytest.approx(2 / 3)


def test_load_texts_from_files_and_dataset_dirs(tmp_path, small_dataset):
    assert len(load_texts(str(small_dataset))) == 300
    assert len(load_texts(f"{small_dataset}:test")) == 30
    src = write_csv(tmp_path / "x.csv", make_rows(5))
    assert len(load_texts(str(src))) == 5
    with pytest.raises(UserError, match="no text column"):
        load_texts(str(src), "body")
    with pytest.raises(UserError, match="not a prepared dataset dir"):
        load_texts(f"{src}:train")


def test_prepared_splits_do_not_overlap(small_dataset):
    rep = overlap(load_texts(f"{small_dataset}:train"), load_texts(f"{small_dataset}:test"))
    assert rep["contaminated"] == 0
