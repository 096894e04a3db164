"""Tests for the data spec (hqpc.runtime.data) and the top-1 metrics (hqpc.runtime.metrics).

Everything builds tiny image folders and npz files in tmp_path; the `shared_data` tests at the
end load the example specs against the real data in ../shared/data and skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hqpc.runtime.data import DataSpec, DataSpecError, Preprocess
from hqpc.runtime.metrics import top1, top1_agreement

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples" / "data"


# --- helpers -----------------------------------------------------------------------------------


def write_image(path: Path, pixels: np.ndarray | tuple[int, ...], size: tuple[int, int] = (8, 8)) -> Path:
    """Write an RGB image: `pixels` (H, W, 3) uint8, or one colour filling `size` = (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(pixels, tuple):
        Image.new("RGB", size, pixels).save(path)
    else:
        Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB").save(path)
    return path


def grey(value: int) -> tuple[int, int, int]:
    return (value, value, value)


def write_spec(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def labeled_folder(root: Path, count: int) -> Path:
    """`count` grey images img<i>.png of value 10*i and labels.txt giving image i label i."""
    images = root / "images"
    for i in range(count):
        write_image(images / f"img{i}.png", grey(10 * i))
    (root / "labels.txt").write_text("".join(f"img{i}.png {i}\n" for i in range(count)))
    return images


def labeled_spec(root: Path, count: int, extra: str = "", split: str = "") -> Path:
    """A spec over `labeled_folder(root, count)` with x = raw pixel value (scale 1)."""
    labeled_folder(root, count)
    return write_spec(
        root,
        f'[data]\nimages = "images"\nlabels = "labels.txt"\n{extra}\n'
        f"[preprocess]\nscale = 1.0\n[split]\n{split}\n",
    )


def expect_error(spec: Path, *fragments: str) -> str:
    """Load `spec`, expecting a one-line DataSpecError containing every fragment."""
    with pytest.raises(DataSpecError) as info:
        DataSpec.load(spec)
    return check_message(info.value, *fragments)


def check_message(error: Exception, *fragments: str) -> str:
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- preprocessing -----------------------------------------------------------------------------


def test_preprocess_math_scale_shift_mean_std() -> None:
    img = Image.new("RGB", (4, 3), (200, 100, 50))
    x = Preprocess(scale=1 / 127.5, shift=-1.0).apply(img)
    assert x.dtype == np.float32 and x.shape == (3, 3, 4)
    np.testing.assert_allclose(x[:, 0, 0], [200 / 127.5 - 1, 100 / 127.5 - 1, 50 / 127.5 - 1], rtol=1e-6)

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = Preprocess(mean=mean, std=std).apply(img)  # default scale 1/255
    expected = [(v / 255 - m) / s for v, m, s in zip((200, 100, 50), mean, std)]
    np.testing.assert_allclose(x[:, 1, 2], expected, rtol=1e-5)


def test_preprocess_converts_to_rgb() -> None:
    x = Preprocess(scale=1.0).apply(Image.new("L", (2, 2), 77))
    assert x.shape == (3, 2, 2) and np.all(x == 77)


def test_resize_short_then_center_crop_matches_torchvision_rule() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")  # W 40, H 30
    x = Preprocess(resize_short=20, center_crop=16, scale=1.0).apply(img)
    assert x.shape == (3, 16, 16)
    # short side 30 -> 20, long side int(20 * 40 / 30) = 26;
    # crop offsets left round((26 - 16) / 2) = 5, top round((20 - 16) / 2) = 2
    expected = np.asarray(img.resize((26, 20), Image.BILINEAR).crop((5, 2, 21, 18)), dtype=np.float32)
    np.testing.assert_array_equal(x, expected.transpose(2, 0, 1))


def test_size_resizes_directly_and_layout_nhwc() -> None:
    img = Image.new("RGB", (9, 11), (1, 2, 3))
    nchw = Preprocess(size=[5, 7]).apply(img)
    nhwc = Preprocess(size=[5, 7], layout="NHWC").apply(img)
    assert nchw.shape == (3, 5, 7) and nhwc.shape == (5, 7, 3)
    np.testing.assert_array_equal(nhwc, nchw.transpose(1, 2, 0))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"layout": "CHW"}, "layout"),
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"mean": [0.5]}, "mean"),
        ({"size": [32, 32], "resize_short": 32}, "size"),
        ({"resize_short": 200, "center_crop": 224}, "center_crop"),
        ({"center_crop": True}, "center_crop"),
    ],
)
def test_preprocess_rejects_bad_values(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Preprocess(**kwargs)


# --- sources and labels ------------------------------------------------------------------------


def test_labels_file_with_label_offset(tmp_path: Path) -> None:
    spec = DataSpec.load(labeled_spec(tmp_path, 5, extra="label_offset = 1"))
    assert spec.num_items == 5 and spec.label_offset == 1
    np.testing.assert_array_equal(spec.labels, np.arange(5))  # raw labels, as listed
    x, y = spec.split("eval").arrays()
    assert x.shape == (5, 3, 8, 8) and y.dtype == np.int64
    np.testing.assert_array_equal(y, x[:, 0, 0, 0] / 10 + 1)  # image i (value 10*i) keeps label i, +1


def test_class_subfolders_sorted_by_name(tmp_path: Path) -> None:
    for value, name in ((30, "zebra"), (10, "ant"), (20, "moose")):  # created out of order
        for k in range(2):
            write_image(tmp_path / "images" / name / f"{k}.png", grey(value))
    spec = DataSpec.load(write_spec(tmp_path, '[data]\nimages = "images"\n[preprocess]\nscale = 1.0\n'))
    assert [p.parent.name for p in spec.items] == ["ant", "ant", "moose", "moose", "zebra", "zebra"]
    np.testing.assert_array_equal(spec.labels, [0, 0, 1, 1, 2, 2])
    x, y = spec.split("eval").arrays()
    np.testing.assert_array_equal(y, x[:, 0, 0, 0] / 10 - 1)


def test_loose_images_are_unlabeled(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.jpg", grey(i))
    spec = DataSpec.load(write_spec(tmp_path, '[data]\nimages = "images"\n'))
    assert spec.labels is None
    [(x, y)] = list(spec.split("eval").batches(8))
    assert x.shape == (3, 3, 8, 8) and y is None


def test_npz_source(tmp_path: Path) -> None:
    x = np.arange(10, dtype=np.float64)[:, None].repeat(4, axis=1)  # row i is all i
    np.savez(tmp_path / "calib.npz", x=x, y=np.arange(10) % 3)
    spec = DataSpec.load(
        write_spec(tmp_path, '[data]\nnpz = "calib.npz"\nlabel_offset = 2\n[split]\ncalib = 4\neval = 6\n')
    )
    assert spec.items is None and spec.num_items == 10
    calib = spec.split("calib")
    assert len(calib) == 4 and calib.sample_shape == (4,)
    xs, ys = calib.arrays()
    assert xs.dtype == np.float32 and ys.dtype == np.int64
    np.testing.assert_array_equal(ys, xs[:, 0].astype(int) % 3 + 2)
    calib.check_input(["N", 4])


def test_npz_without_y_is_unlabeled(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", x=np.zeros((3, 2, 2), np.float32))
    spec = DataSpec.load(write_spec(tmp_path, '[data]\nnpz = "calib.npz"\n'))
    assert spec.labels is None and spec.split("eval").arrays()[1] is None


# --- split and streaming -----------------------------------------------------------------------


def test_seeded_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = labeled_spec(tmp_path, 20, split="seed = 3\ncalib = 8\neval = 10")
    first, second = DataSpec.load(path), DataSpec.load(path)
    calib, evaluate = first.split("calib"), first.split("eval")
    assert (len(calib), len(evaluate)) == (8, 10)
    assert not set(calib.indices) & set(evaluate.indices)
    np.testing.assert_array_equal(calib.indices, second.split("calib").indices)
    np.testing.assert_array_equal(evaluate.indices, second.split("eval").indices)
    assert list(calib.indices) != list(range(8))  # shuffled
    other = write_spec(tmp_path, path.read_text().replace("seed = 3", "seed = 4"), "other.toml")
    assert list(DataSpec.load(other).split("calib").indices) != list(calib.indices)


def test_eval_defaults_to_the_remaining_items(tmp_path: Path) -> None:
    spec = DataSpec.load(labeled_spec(tmp_path, 7, split="calib = 3"))
    assert (spec.calib, spec.eval, spec.seed) == (3, 4, 0)


def test_batches_stream_with_partial_last_batch(tmp_path: Path) -> None:
    dataset = DataSpec.load(labeled_spec(tmp_path, 7)).split("eval")
    batches = list(dataset.batches(3))
    assert [len(x) for x, _ in batches] == [3, 3, 1]
    assert all(x.dtype == np.float32 and y.dtype == np.int64 and len(y) == len(x) for x, y in batches)
    x_all, y_all = dataset.arrays()
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), x_all)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), y_all)
    assert len(dataset.arrays(limit=2)[0]) == 2
    with pytest.raises(ValueError, match="batch_size"):
        dataset.batches(0)


def test_check_input_accepts_symbolic_dims(tmp_path: Path) -> None:
    dataset = DataSpec.load(labeled_spec(tmp_path, 2)).split("eval")
    for shape in (["N", 3, 8, 8], [None, 3, 8, 8], [1, 3, "h", "w"], [-1, 3, 8, 8]):
        dataset.check_input(shape)


# --- errors: one line, naming the file and key or item -----------------------------------------


def test_error_missing_spec_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.toml", "nope.toml", "not found")


def test_error_malformed_toml_names_line(tmp_path: Path) -> None:
    path = write_spec(tmp_path, '[data]\nimages = \n')
    expect_error(path, str(path), "line 2")


def test_error_unknown_key_lists_allowed(tmp_path: Path) -> None:
    labeled_folder(tmp_path, 2)
    path = write_spec(tmp_path, '[data]\nimages = "images"\n[preprocess]\ncentre_crop = 4\n')
    expect_error(path, str(path), "[preprocess]", "'centre_crop'", "allowed:", "center_crop")
    path = write_spec(tmp_path, '[data]\nimages = "images"\n[spilt]\ncalib = 1\n')
    expect_error(path, "'spilt'", "allowed: data, preprocess, split")


def test_error_bad_value_names_key(tmp_path: Path) -> None:
    labeled_folder(tmp_path, 2)
    path = write_spec(tmp_path, '[data]\nimages = "images"\n[preprocess]\nlayout = "CHW"\n')
    expect_error(path, str(path), "[preprocess] layout")
    path = write_spec(tmp_path, '[data]\nimages = "images"\n[split]\ncalib = "10"\n')
    expect_error(path, "[split] calib", "integer")


def test_error_images_folder_missing(tmp_path: Path) -> None:
    expect_error(write_spec(tmp_path, '[data]\nimages = "absent"\n'), "[data] images", "absent", "not found")


def test_error_label_count_mismatch(tmp_path: Path) -> None:
    path = labeled_spec(tmp_path, 3)
    write_image(tmp_path / "images" / "extra.png", grey(0))
    expect_error(path, "labels.txt", "label count mismatch", "3 labels but 4 images", "extra.png")


def test_error_missing_image_listed_in_labels(tmp_path: Path) -> None:
    path = labeled_spec(tmp_path, 3)
    (tmp_path / "images" / "img1.png").unlink()
    expect_error(path, "labels.txt:2", "img1.png", "not found")


def test_error_malformed_label_line(tmp_path: Path) -> None:
    path = labeled_spec(tmp_path, 3)
    (tmp_path / "labels.txt").write_text("img0.png 0\nimg1.png one\nimg2.png 2\n")
    expect_error(path, "labels.txt:2", "FILE LABEL", "img1.png one")


def test_error_calib_plus_eval_too_large(tmp_path: Path) -> None:
    path = labeled_spec(tmp_path, 5, split="calib = 3\neval = 3")
    expect_error(path, str(path), "[split]", "3 + 3 = 6 exceeds the 5 items")


def test_error_npz_problems(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad_y.npz", x=np.zeros((4, 2)), y=np.zeros(3, np.int64))
    expect_error(write_spec(tmp_path, '[data]\nnpz = "bad_y.npz"\n'), "bad_y.npz", "y must be", "(4,)")
    np.savez(tmp_path / "no_x.npz", y=np.zeros(3, np.int64))
    expect_error(write_spec(tmp_path, '[data]\nnpz = "no_x.npz"\n'), "no_x.npz", "'x'")
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 2)))
    path = write_spec(tmp_path, '[data]\nnpz = "ok.npz"\n[preprocess]\nscale = 1.0\n')
    expect_error(path, "[preprocess]", "npz")


def test_error_unreadable_image_names_file(tmp_path: Path) -> None:
    """A file no image format recognises is reported when the spec is loaded (headers are checked)."""
    path = labeled_spec(tmp_path, 3)
    (tmp_path / "images" / "img2.png").write_bytes(b"this is not an image")
    expect_error(path, "img2.png", "cannot read image")


def test_error_unreadable_jpg(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    expect_error(write_spec(tmp_path, '[data]\nimages = "images"\n'), "broken.jpg", "cannot read image")


def test_error_truncated_pixels_are_found_when_decoded(tmp_path: Path) -> None:
    """A valid header over truncated pixel data opens at load; decoding (lazy) names the file."""
    path = labeled_spec(tmp_path, 3)
    png = tmp_path / "images" / "img1.png"
    write_image(png, np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8))
    png.write_bytes(png.read_bytes()[:60])
    dataset = DataSpec.load(path).split("eval")
    with pytest.raises(DataSpecError) as info:
        dataset.arrays()
    check_message(info.value, "img1.png", "cannot read image")


def test_error_mixed_image_sizes_without_crop(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.png", grey(0), size=(8, 8))
    write_image(tmp_path / "images" / "b.png", grey(0), size=(6, 8))
    spec = DataSpec.load(write_spec(tmp_path, '[data]\nimages = "images"\n'))
    with pytest.raises(DataSpecError) as info:
        spec.split("eval").arrays()
    check_message(info.value, "b.png", "center_crop or size")


def test_error_check_input_shape_mismatch(tmp_path: Path) -> None:
    dataset = DataSpec.load(labeled_spec(tmp_path, 2)).split("calib")
    with pytest.raises(DataSpecError) as info:
        dataset.check_input(["N", 3, 224, 224])
    check_message(info.value, "[3, 8, 8]", "['N', 3, 224, 224]", "spec.toml")
    with pytest.raises(DataSpecError):
        dataset.check_input(["N", 8, 8, 3])  # NHWC model, NCHW data


def test_error_unknown_split_name(tmp_path: Path) -> None:
    with pytest.raises(DataSpecError, match="'train'"):
        DataSpec.load(labeled_spec(tmp_path, 2)).split("train")


# --- metrics -----------------------------------------------------------------------------------


def test_top1_and_agreement() -> None:
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    b = np.array([[0.1, 0.9], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert top1(a, np.array([0, 1, 1, 1])) == 0.75
    assert top1_agreement(a, b) == 0.75
    with pytest.raises(ValueError, match="lengths differ"):
        top1(a, np.array([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        top1(np.zeros(4), np.zeros(4))


# --- real data (../shared/data) ----------------------------------------------------------------


def shared(test):
    """Mark a test as needing the real data, skipping it with the reason when absent."""
    reason = f"real data not found at {SHARED} (a sibling 'shared/data' of the repo)"
    return pytest.mark.shared_data(pytest.mark.skipif(not SHARED.is_dir(), reason=reason)(test))


EXAMPLE_SPECS = {
    "imagenet_mobilenet.toml": ((3, 224, 224), 1001),
    "cifar10_resnet.toml": ((3, 32, 32), 10),
}


@shared
@pytest.mark.parametrize("name", sorted(EXAMPLE_SPECS))
def test_example_specs_load_real_data(name: str) -> None:
    sample_shape, classes = EXAMPLE_SPECS[name]
    spec = DataSpec.load(EXAMPLES / name)
    assert spec.calib > 0 and spec.eval > 0
    assert 0 <= spec.labels.min() + spec.label_offset and spec.labels.max() + spec.label_offset < classes
    for split in ("calib", "eval"):
        x, y = spec.split(split).arrays(limit=16)
        assert x.shape == (16, *sample_shape) and x.dtype == np.float32
        assert y.shape == (16,) and np.all((0 <= y) & (y < classes))
        assert np.isfinite(x).all()


@shared
@pytest.mark.parametrize(
    ("name", "model", "count", "low", "high"),
    [
        ("cifar10_resnet.toml", "cifar10_resnet20.onnx", 200, 0.70, 0.90),  # README: 81.0 %
        ("imagenet_mobilenet.toml", "mobilenet_v2.onnx", 100, 0.65, 1.0),  # README: 80.08 %
    ],
)
def test_real_model_accuracy_validates_preprocessing(
    name: str, model: str, count: int, low: float, high: float
) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(SHARED / "models" / model), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    dataset = DataSpec.load(EXAMPLES / name).split("eval")
    dataset.check_input(model_input.shape)
    x, y = dataset.arrays(limit=count)
    accuracy = top1(session.run(None, {model_input.name: x})[0], y)
    print(f"{model} top-1 on the first {count} eval images of {name}: {accuracy:.3f}")
    assert low <= accuracy <= high
