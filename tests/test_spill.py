"""The disk spill of the staged population pass: what is read is what was written, storage is recycled."""
import numpy as np

from vsonnx.spill import Spill


def test_arrays_come_back_as_written_and_released_files_are_rewritten_in_place(tmp_path):
    rng = np.random.default_rng(0)
    spill = Spill(tmp_path)
    big, small = rng.standard_normal((4, 3, 8, 8)).astype(np.float32), np.arange(10, dtype=np.int64)
    spill.put(("a", 0), big)
    spill.put(("b", 0), small)
    assert ("a", 0) in spill and ("a", 1) not in spill
    np.testing.assert_array_equal(spill.get(("a", 0)), big)
    np.testing.assert_array_equal(spill.get(("b", 0)), small)
    read_before = spill.get(("a", 0))
    spill.release([("a", 0)])
    assert sorted(spill.keys()) == [("b", 0)]
    replacement = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)  # fits into the released file
    spill.put(("c", 1), replacement)
    assert len(list(tmp_path.iterdir())) == 2  # no new file
    np.testing.assert_array_equal(spill.get(("c", 1)), replacement)  # only its own bytes, though the file is larger
    np.testing.assert_array_equal(read_before, big)  # an array read earlier is a copy, untouched by the reuse
    spill.put(("d", 0), rng.standard_normal((8, 3, 8, 8)).astype(np.float32))  # larger than any free file
    assert len(list(tmp_path.iterdir())) == 3


def test_the_smallest_free_file_that_fits_is_reused(tmp_path):
    spill = Spill(tmp_path)
    spill.put("large", np.zeros(1000, np.float32))
    spill.put("medium", np.zeros(100, np.float32))
    files = {k: spill._entries[k].path for k in ("large", "medium")}
    spill.release(["large", "medium"])
    spill.put("new", np.ones(50, np.float32))
    assert spill._entries["new"].path == files["medium"]
    np.testing.assert_array_equal(spill.get("new"), np.ones(50, np.float32))
