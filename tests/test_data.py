import warnings

import numpy as np
import pytest
from PIL import Image

from vsonnx.data import ArraySource, open_source
from vsonnx.errors import VsonnxError, VsonnxWarning

from conftest import GraphBuilder, cnn_with_sites

MODEL = cnn_with_sites()


def arrays(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, n)


def collect(source, bs=8):
    xs, ys = [], []
    for b in source.batches(bs):
        xs.append(b.feeds["x"])
        ys.append(b.labels)
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


def test_npy_npz_and_folder(tmp_path):
    x, y = arrays()
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    got, labels = collect(open_source(tmp_path / "a.npy", MODEL, shuffle=False))
    np.testing.assert_array_equal(got, x)
    assert labels is None
    got, labels = collect(open_source(tmp_path / "b.npz", MODEL, shuffle=True, seed=3))
    order = np.random.default_rng(3).permutation(30)
    np.testing.assert_array_equal(got, x[order])
    np.testing.assert_array_equal(labels, y[order])
    folder = tmp_path / "parts"
    folder.mkdir()
    np.savez(folder / "0.npz", x=x[:10], y=y[:10])
    np.savez(folder / "1.npz", x=x[10:], y=y[10:])
    got, labels = collect(open_source(folder, MODEL, shuffle=False, limit=25))
    np.testing.assert_array_equal(got, x[:25])
    np.testing.assert_array_equal(labels, y[:25])


def write_images(root, classes=("a", "b"), per_class=5, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_image_folder_tree_labels_and_preprocessing(tmp_path):
    write_images(tmp_path)
    source = open_source(tmp_path, MODEL, shuffle=False, preprocess={"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    x, y = collect(source, 4)
    assert x.shape == (10, 3, 8, 8) and list(y) == [0] * 5 + [1] * 5
    raw = np.asarray(Image.open(tmp_path / "a" / "0.png").convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(x[0], ((raw - 0.5) / 0.25).transpose(2, 0, 1), atol=1e-6)  # x*(1/255) vs x/255


def test_flat_image_folder_has_no_labels_and_resizes(tmp_path):
    write_images(tmp_path, classes=("",), size=16)
    x, y = collect(open_source(tmp_path, MODEL))
    assert x.shape == (5, 3, 8, 8) and y is None


def test_python_reader_function_and_get_next(tmp_path):
    x, y = arrays(20)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "reader.py").write_text(
        "import numpy as np, pathlib\n"
        "here = pathlib.Path(__file__).parent\n"
        "def feeds():\n"
        "    x, y = np.load(here / 'x.npy'), np.load(here / 'y.npy')\n"
        "    return [{'x': x[i:i + 3], 'label': y[i:i + 3]} for i in range(0, 20, 3)]\n"
        "class R:\n"
        "    def __init__(self): self.items = iter(feeds())\n"
        "    def get_next(self): return next(self.items, None)\n"
        "def reader(): return R()\n")
    got, labels = collect(open_source(f"{tmp_path}/reader.py:feeds", MODEL), 8)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, y)
    got, _ = collect(open_source(f"{tmp_path}/reader.py:reader", MODEL, limit=7), 4)
    np.testing.assert_array_equal(got, x[:7])


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is empty"),
    (lambda p: np.save(p / "c.npy", np.zeros((4, 1, 8, 8), np.float32)) or p / "c.npy", "axis 1 has size 1"),
    (lambda p: np.save(p / "r.npy", np.zeros((4, 3, 8), np.float32)) or p / "r.npy", "does not fit"),
    (lambda p: np.savez(p / "k.npz", z=np.zeros(3)) or p / "k.npz", "expected 'x'"),
    (lambda p: (p / "t.txt").write_text("hi") and p / "t.txt", "not a .npy"),
    (lambda p: f"{p}/nope.py:f", "does not exist"),
    (lambda p: np.save(p / "s.npy", np.full((4, 3, 8, 8), "a")) or p / "s.npy", "an array of <U1, not of real numbers"),
    (lambda p: np.savez(p / "s.npz", x=np.full((4, 3, 8, 8), "1.5")) or p / "s.npz", "not of real numbers"),
    (lambda p: np.save(p / "c.npy", np.ones((4, 3, 8, 8), np.complex64)) or p / "c.npy", "complex64, not of real"),
    (lambda p: np.save(p / "o.npy", np.full((4, 3, 8, 8), None), allow_pickle=True) or p / "o.npy", "cannot read"),
])
def test_source_errors(tmp_path, make, needle):
    with pytest.raises(VsonnxError, match=needle):
        open_source(make(tmp_path), MODEL)


def test_corrupt_image_is_a_user_error(tmp_path):
    write_images(tmp_path)
    (tmp_path / "a" / "9.png").write_bytes(b"garbage")
    with pytest.raises(VsonnxError, match="cannot read image"):
        collect(open_source(tmp_path, MODEL))


def test_size_needed_when_model_shape_is_dynamic(tmp_path):
    write_images(tmp_path)
    model = cnn_with_sites()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(VsonnxError, match="--size"):
        open_source(tmp_path, model)
    assert open_source(tmp_path, model, preprocess={"size": (8, 8)}).size == 10


def test_replay_source_decodes_once_memory_then_disk(tmp_path):
    from vsonnx.data import Batch, ReplaySource, Source

    class Counting(Source):  # a source that counts how often it is read
        has_labels, spec, size = False, "counting", 20

        def __init__(self):
            self.reads = 0

        def batches(self, batch_size):
            self.reads += 1
            x, _ = arrays(20)
            for i in range(0, 20, batch_size):
                yield Batch({"x": x[i:i + batch_size]}, None)

    inner = Counting()
    replay = ReplaySource(inner)
    first, second = collect(replay, 8), collect(replay, 8)
    np.testing.assert_array_equal(first[0], second[0])
    assert inner.reads == 1
    collect(replay, 5)  # another batch size: read again
    assert inner.reads == 2
    small = ReplaySource(Counting(), memory=100)  # past the memory budget, batches are replayed from disk
    first, second = collect(small, 8), collect(small, 8)
    assert small.source.reads == 1 and small._folder is not None and any(small._folder.iterdir())
    np.testing.assert_array_equal(first[0], second[0])
    folder = small._folder
    del small
    import gc

    gc.collect()
    assert not folder.exists()  # the scratch folder goes with the source


def test_missing_normalisation_is_warned(tmp_path):
    write_images(tmp_path)
    with pytest.warns(UserWarning, match="no --mean/--std"):
        open_source(tmp_path, MODEL)


def test_val_split_parts_are_disjoint_complete_seeded_and_keep_labels():
    from vsonnx.data import split_source

    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    y = np.arange(1000) % 7
    g = GraphBuilder()
    model = g.build(g.node("Identity", ["x"]), input_shape=("N", 1))
    kept, held = split_source(ArraySource.from_arrays(model, x, y, shuffle=False), 0.2, seed=3)
    got_kept = [b for b in kept.batches(64)]
    got_held = [b for b in held.batches(64)]
    a = np.concatenate([b.feeds["x"][:, 0] for b in got_kept])
    h = np.concatenate([b.feeds["x"][:, 0] for b in got_held])
    assert sorted(np.concatenate([a, h])) == list(range(1000)) and not set(a) & set(h)
    assert 150 < len(h) < 250 and all(len(b) == 64 for b in got_kept[:-1])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in got_held]), h.astype(int) % 7)
    again = np.concatenate([b.feeds["x"][:, 0] for b in split_source(
        ArraySource.from_arrays(model, x, y, shuffle=False), 0.2, seed=3)[1].batches(100)])
    np.testing.assert_array_equal(again, h)  # same seed, same split, whatever the batch size


def test_arrays_are_passed_over_again_rather_than_replayed(tmp_path):
    """Preprocessed arrays (in memory or a memory-mapped .npy) already give the same batches on every pass:
    replayable() keeps them as they are instead of copying them into a replay."""
    from vsonnx.data import ArraySource, ReplaySource, Source, SplitSource, replayable

    x, _ = arrays(30)
    np.save(tmp_path / "x.npy", x)
    for source in (ArraySource.from_arrays(MODEL, x, None, seed=3), open_source(tmp_path / "x.npy", MODEL, seed=3)):
        assert replayable(source) is source
        first, second = collect(source, 8), collect(source, 8)
        np.testing.assert_array_equal(first[0], second[0])
    assert isinstance(replayable(Source()), ReplaySource)  # e.g. images to decode, or a user's reader
    split = SplitSource(ArraySource.from_arrays(MODEL, x, None), 0.5, 0, held_out=True)
    assert replayable(split) is split



def nhwc_model():
    """x [N, 8, 8, 3] (Keras's layout, as tf2onnx writes it) -> Transpose to NCHW -> conv -> BN."""
    g = GraphBuilder()
    h = g.node("Transpose", ["x"], "to_nchw", perm=[0, 3, 1, 2])
    return g.build(g.bn(g.dropout(g.conv(h, 3, 4), 0.5, "d"), 4, "bn"), input_shape=("N", 8, 8, 3))


def test_layout_follows_a_static_input_shape_that_ends_in_the_channels(tmp_path):
    write_images(tmp_path / "img")
    source = open_source(tmp_path / "img", nhwc_model(), shuffle=False)
    x, _ = collect(source, 4)
    raw = np.asarray(Image.open(tmp_path / "img" / "a" / "0.png").convert("RGB"), np.float32) / 255
    assert x.shape == (10, 8, 8, 3)
    np.testing.assert_allclose(x[0], raw, rtol=1e-6)
    pre = source.pre
    assert pre.layout == "nhwc" and any("NHWC" in note for note in pre.notes)
    with pytest.raises(VsonnxError, match="expects 8"):  # a flag wins (and here contradicts the shape)
        open_source(tmp_path / "img", nhwc_model(), shuffle=False, preprocess={"layout": "nchw"})
    assert open_source(tmp_path / "img", MODEL, shuffle=False).pre.layout == "nchw"


def test_fix_of_an_nhwc_model_needs_no_layout_flag(tmp_path):
    from conftest import run, save

    write_images(tmp_path / "img", per_class=8)
    path = save(nhwc_model(), tmp_path / "m.onnx")
    r = run("fix", path, "--calib", tmp_path / "img", "-o", tmp_path / "o.onnx", "--json")
    flagged = run("fix", path, "--calib", tmp_path / "img", "--layout", "nhwc", "-o", tmp_path / "f.onnx", "--json")
    assert r.exit_code == 0 and flagged.exit_code == 0, r.output
    import json
    got, want = (json.loads(x.output[x.output.index("{"):])["batchnorms"][0]["new_var"] for x in (r, flagged))
    np.testing.assert_array_equal(got, want)


def test_batch_size_follows_a_static_batch_dimension(tmp_path):
    """A batch of 1 baked into a Reshape (classic Model Zoo): the default batch size is the declared one."""
    from vsonnx.data import resolve_batch_size, static_batch
    from conftest import run, save

    g = GraphBuilder()
    h = g.bn(g.dropout(g.conv("x", 3, 4), 0.5, "d"), 4, "bn")
    h = g.node("Reshape", [h, g.init("shape", np.array([1, 256], np.int64))], "flat")
    model = g.build(g.gemm(h, 256, 5), input_shape=(1, 3, 8, 8))
    assert static_batch(model) == 1 and static_batch(MODEL) is None
    assert resolve_batch_size(model, None) == 1 and resolve_batch_size(model, 4) == 4
    assert resolve_batch_size(MODEL, None) == 128 and resolve_batch_size(MODEL, None, 256) == 256
    path = save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", arrays(20)[0])
    for method in ("batch", "population", "relative"):
        r = run("fix", path, "--calib", tmp_path / "x.npy", "--method", method, "-o", tmp_path / f"{method}.onnx")
        assert r.exit_code == 0, r.output
    np.savez(tmp_path / "val.npz", x=arrays(20)[0], y=arrays(20)[1])
    assert run("eval", path, "--data", tmp_path / "val.npz").exit_code == 0


def test_integer_arrays_for_a_float_input_are_warned_and_fed_unchanged(tmp_path):
    model = cnn_with_sites()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    with pytest.warns(VsonnxWarning, match="uint8 values, fed unchanged to float input 'x'"):
        source = open_source(tmp_path / "u8.npy", model, shuffle=False)
    np.testing.assert_array_equal(next(source.batches(4)).feeds["x"], pixels.astype(np.float32))
    with pytest.warns(VsonnxWarning, match="uint8 values, fed unchanged"):  # the same check for in-memory arrays
        ArraySource.from_arrays(model, pixels, None)
    np.save(tmp_path / "f.npy", pixels.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", VsonnxWarning)
        open_source(tmp_path / "f.npy", model, shuffle=False)


def test_class_folders_are_labelled_in_the_model_order_its_metadata_names(tmp_path):
    """vsonnx.export writes vsonnx.class_names; a class folder is labelled with that list's index, not with
    its place among the sorted folder names (a model whose classes are not in alphabetical order would score
    the wrong classes). Folders the list does not name keep the sorted order, with a warning."""
    from vsonnx.model import set_metadata

    write_images(tmp_path / "data", classes=("cat", "dog", "ant"), per_class=2)
    model = cnn_with_sites(classes=3)
    set_metadata(model, {"vsonnx.class_names": '["dog", "ant", "cat"]'})
    _, y = collect(open_source(tmp_path / "data", model, shuffle=False, preprocess={"size": 8}))
    assert list(y) == [1, 1, 2, 2, 0, 0]  # sorted folders: ant, cat, dog
    set_metadata(model, {"vsonnx.class_names": '["n01", "n02", "n03"]'})
    with pytest.warns(VsonnxWarning, match="not among the model's class names"):
        _, y = collect(open_source(tmp_path / "data", model, shuffle=False, preprocess={"size": 8}))
    assert list(y) == [0, 0, 1, 1, 2, 2]
    set_metadata(model, {"vsonnx.class_names": '{"0": "ant"}'})
    with pytest.warns(VsonnxWarning, match="not a JSON list of strings"):
        _, y = collect(open_source(tmp_path / "data", model, shuffle=False, preprocess={"size": 8}))
    assert list(y) == [0, 0, 1, 1, 2, 2]


def gray_model(channels: int = 4):
    g = GraphBuilder(seed=1)
    h = g.bn(g.dropout(g.conv("x", 1, channels), 0.5, "drop"), channels, "bn")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    return g.build(g.gemm(h, channels, 3), input_shape=("N", 1, 8, 8))


def test_a_one_channel_model_gets_grayscale_images_as_pil_converts_them(tmp_path):
    write_images(tmp_path / "d", classes=("a", "b"), per_class=3)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "d" / "a" / "gray.png")
    x, y = collect(open_source(tmp_path / "d", gray_model(), shuffle=False, preprocess={"mean": (0.5,), "std": (0.25,)}))
    files = sorted((tmp_path / "d" / "a").iterdir()) + sorted((tmp_path / "d" / "b").iterdir())
    want = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) / 255 for f in files])
    assert x.shape == (7, 1, 8, 8) and list(y) == [0] * 4 + [1] * 3
    np.testing.assert_allclose(x[:, 0], (want - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_array_equal(np.round(x[3, 0] * 0.25 * 255 + 0.5 * 255), np.arange(64).reshape(8, 8))
    with pytest.raises(VsonnxError, match="3 values, but the model takes 1-channel"):
        open_source(tmp_path / "d", gray_model(), preprocess={"mean": (0.5, 0.5, 0.5), "std": (0.25,)})


def test_bgr_models_get_the_channels_reversed_before_normalising(tmp_path):
    """--channels bgr (or "channels": "bgr" in the model's metadata): OpenCV/Caffe-style models see B, G, R,
    and --mean/--std are in that order."""
    from vsonnx.model import set_metadata

    write_images(tmp_path / "d", classes=("a",), per_class=2)
    norm = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 0.125)}
    rgb, _ = collect(open_source(tmp_path / "d", MODEL, shuffle=False, preprocess={"mean": (0,), "std": (1,)}))
    want = (rgb[:, ::-1] - np.array(norm["mean"])[:, None, None]) / np.array(norm["std"])[:, None, None]
    bgr, _ = collect(open_source(tmp_path / "d", MODEL, shuffle=False, preprocess={**norm, "channels": "bgr"}))
    np.testing.assert_allclose(bgr, want, atol=1e-5)
    model = cnn_with_sites()
    set_metadata(model, {"vsonnx.preprocess": '{"channels": "bgr", "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.125]}'})
    from_meta, _ = collect(open_source(tmp_path / "d", model, shuffle=False))
    np.testing.assert_allclose(from_meta, want, atol=1e-5)
    with pytest.raises(VsonnxError, match="rgb or bgr"):
        open_source(tmp_path / "d", MODEL, preprocess={"channels": "grb"})


def test_resize_then_centre_crop_follows_torchvision(tmp_path):
    """--resize N: the shorter side to N, the longer to int(N * long / short), then the centre crop at
    int(round((size - crop) / 2)) (torchvision's Resize(N) + CenterCrop, values worked out from its code)."""
    from vsonnx.data.cifar import resized_then_cropped

    assert resized_then_cropped(40, 30, 20, (16, 16)) == ((26, 20), (5, 2, 21, 18))
    assert resized_then_cropped(30, 45, 20, (16, 16)) == ((20, 30), (2, 7, 18, 23))
    assert resized_then_cropped(256, 256, 256, (224, 224)) == ((256, 256), (16, 16, 240, 240))
    (tmp_path / "d" / "a").mkdir(parents=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "d" / "a" / "0.png")
    x, _ = collect(open_source(tmp_path / "d", MODEL, preprocess={"size": 16, "resize": 20, "mean": (0,), "std": (1,)}))
    want = np.asarray(image.resize((26, 20), Image.BILINEAR).crop((5, 2, 21, 18)), np.float32) / 255
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), atol=1e-6)
    with pytest.raises(VsonnxError, match="below the 16 x 16 crop"):
        open_source(tmp_path / "d", MODEL, preprocess={"size": 16, "resize": 12})


def test_a_limit_without_shuffling_that_misses_classes_is_warned(tmp_path):
    write_images(tmp_path, classes=("a", "b", "c"), per_class=4)
    with pytest.warns(VsonnxWarning, match="the 4 images taken .* cover 1 of 3 classes"):
        open_source(tmp_path, MODEL, shuffle=False, limit=4, preprocess={"mean": (0,), "std": (1,)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", VsonnxWarning)
        open_source(tmp_path, MODEL, shuffle=False, limit=12, preprocess={"mean": (0,), "std": (1,)})
        open_source(tmp_path, MODEL, shuffle=True, limit=2, preprocess={"mean": (0,), "std": (1,)})


def test_float_arrays_that_look_like_raw_pixels_are_warned_where_the_model_scales_pixels(tmp_path):
    from vsonnx.model import set_metadata

    model = cnn_with_sites()
    set_metadata(model, {"vsonnx.preprocess": '{"mean": [0.5], "std": [0.25]}'})  # default scale 1/255
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "raw.npy", pixels)
    np.save(tmp_path / "ready.npy", (pixels / 255 - 0.5) / 0.25)
    with pytest.warns(VsonnxWarning, match="values up to 255 look like raw pixels"):
        x, _ = collect(open_source(tmp_path / "raw.npy", model, shuffle=False))
    np.testing.assert_array_equal(x, pixels)  # fed as given
    with warnings.catch_warnings():
        warnings.simplefilter("error", VsonnxWarning)
        open_source(tmp_path / "ready.npy", model)
        open_source(tmp_path / "raw.npy", cnn_with_sites())  # no metadata: nothing to compare with
