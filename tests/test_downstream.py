"""Downstream adapters on fixtures in each public layout, the dense-task metrics against slow
obvious versions (and pycocotools), and the prototype-bank initialisation."""

import json

import numpy as np
import pytest
import torch

from prior_dist.data.tables import SPLITS, patient_split
from prior_dist.evaluation.datasets import open_dataset, rle_decode, rle_encode, write_split_file
from prior_dist.evaluation.detection_metrics import mean_average_precision
from prior_dist.evaluation.segmentation import dice_iou
from tests.conftest import run_cli
from tests.imaging import dicom_bytes, gradient, jpeg_bytes, png_bytes


def _all_splits(spec, **options):
    return {s: open_dataset(spec, s, **options) for s in SPLITS if _has(spec, s, **options)}


def _has(spec, split, **options):
    try:
        open_dataset(spec, split, **options)
        return True
    except ValueError:
        return False


# --- SIIM run-length code ----------------------------------------------------------------------


def test_rle_is_column_major_relative_and_round_trips():
    mask = rle_decode("1 2 3 1", 4, 3)
    # Pixel numbers run down column 0 (0..3), then column 1 (4..7): runs at 1-2 and at 6.
    expected = np.zeros((4, 3), bool)
    expected[1:3, 0] = True
    expected[2, 1] = True
    assert (mask == expected).all()
    assert (rle_decode("2 2 7 1", 4, 3, relative=False) == expected).all()
    g = np.random.default_rng(0)
    for _ in range(20):
        m = g.random((9, 7)) < 0.3
        assert (rle_decode(rle_encode(m), 9, 7) == m).all()
        assert (rle_decode(rle_encode(m, relative=False), 9, 7, relative=False) == m).all()
    assert not rle_decode("-1", 5, 5).any() and rle_encode(np.zeros((3, 3), bool)) == "-1"
    with pytest.raises(ValueError, match="leaves the 4x3 image"):
        rle_decode("10 5", 4, 3)
    with pytest.raises(ValueError, match="odd count"):
        rle_decode("1 2 3", 4, 3)


# --- fixtures in the public layouts ------------------------------------------------------------


def _image(seed: int, size: int = 48) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (gradient(size, size) * 0.5 + g.integers(0, 100, (size, size))).astype(np.uint8)


def test_chexpert_csv_policies_frontal_and_patient_splits(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    header = (
        "Path,Sex,Age,Frontal/Lateral,AP/PA,Atelectasis,Cardiomegaly,Consolidation,"
        "Edema,Pleural Effusion"
    )
    rows = []
    for patient in range(40):
        for view, kind in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
            rel = f"train/patient{patient:05d}/study1/{view}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(jpeg_bytes(_image(patient)))
            value = ["1.0", "", "-1.0", "0.0", "1"][patient % 5]
            rows.append(f"CheXpert-v1.0-small/{rel},Male,60,{kind},PA,{value},,0,-1.0,")
    (root / "train.csv").write_text("\n".join([header] + rows) + "\n")
    (root / "valid.csv").write_text("\n".join([header] + rows[:10]) + "\n")
    spec = f"chexpert:{root}"
    parts = _all_splits(spec)
    assert set(parts) == {"train", "validate", "test"}
    keys = {s: set(d.keys) for s, d in parts.items() if s != "test"}
    assert not keys["train"] & keys["validate"] and len(keys["train"] | keys["validate"]) == 40
    assert all("lateral" not in k for k in keys["train"])  # frontal only by default
    subjects = {s: {r.subject for r in d.records} for s, d in parts.items()}
    assert not subjects["train"] & subjects["validate"]
    ignore = open_dataset(spec, "train")
    labels = {r.key: r.load().labels for r in ignore.records}
    uncertain_key = next(k for k in labels if int(k.split("patient")[1][:5]) % 5 == 2)
    assert np.isnan(labels[uncertain_key][0]) and np.isnan(labels[uncertain_key][3])
    ones = {r.key: r.load().labels for r in open_dataset(spec, "train", uncertain="ones").records}
    zeros = {r.key: r.load().labels for r in open_dataset(spec, "train", uncertain="zeros").records}
    assert ones[uncertain_key][0] == 1 and zeros[uncertain_key][0] == 0
    assert ignore[0].image.size == (48, 48)
    (root / "train.csv").write_text(header + "\nCheXpert-v1.0-small/x.jpg,M,1,Frontal,PA,2,,,,\n")
    with pytest.raises(ValueError, match="line 2 .*label value '2'"):
        open_dataset(spec, "train")
    (root / "train.csv").write_text("Path,Atelectasis\nx.jpg,1\n")
    with pytest.raises(ValueError, match="missing column"):
        open_dataset(spec, "train")


def test_5x200_json_both_forms(tmp_path):
    classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(_image(i)))
    listed = {
        "classes": classes,
        "images": [{"path": f"{i}.png", "label": classes[i % 5]} for i in range(10)],
    }
    (tmp_path / "a.json").write_text(json.dumps(listed))
    (tmp_path / "b.json").write_text(
        json.dumps(
            {c: [f"{i}.png" for i in range(10) if i % 5 == k] for k, c in enumerate(classes)}
        )
    )
    for name in ("a.json", "b.json"):
        test = open_dataset(f"chexpert5x200:{tmp_path / name}", "test")
        assert test.exclusive and test.classes == tuple(classes) and len(test) == 10
        assert all(test[i].labels.sum() == 1 for i in range(10))
    (tmp_path / "c.json").write_text(
        json.dumps({"classes": ["A"], "images": [{"path": "0.png", "label": "B"}]})
    )
    with pytest.raises(ValueError, match="not among classes"):
        open_dataset(f"chexpert5x200:{tmp_path / 'c.json'}", "test")


def test_rsna_boxes_from_dicom(tmp_path):
    (tmp_path / "stage_2_train_images").mkdir()
    lines = ["patientId,x,y,width,height,Target"]
    for i in range(30):
        pid = f"p{i:04d}"
        (tmp_path / "stage_2_train_images" / f"{pid}.dcm").write_bytes(
            dicom_bytes(_image(i, 64).astype(np.uint16) * 16)
        )
        if i % 3 == 0:
            lines += [f"{pid},4,8,10,20,1", f"{pid},30,30,5,5,1"]
        else:
            lines.append(f"{pid},,,,,0")
    (tmp_path / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    parts = _all_splits(f"rsna:{tmp_path}")
    assert sum(len(d) for d in parts.values()) == 30
    sample = next(d[i] for d in parts.values() for i in range(len(d)) if d[i].key == "p0000")
    assert sample.boxes.tolist() == [[4, 8, 14, 28], [30, 30, 35, 35]]
    assert sample.labels.tolist() == [0, 1] and sample.image.size == (64, 64)
    filled = np.zeros((64, 64), bool)
    filled[8:28, 4:14] = True
    filled[30:35, 30:35] = True
    assert (sample.masks[0] == filled).all()
    negative = next(d[i] for d in parts.values() for i in range(len(d)) if d[i].key == "p0001")
    assert negative.boxes.shape == (0, 4) and negative.labels.tolist() == [1, 0]


def test_siim_masks_from_rle_png_and_dicom(tmp_path):
    g = np.random.default_rng(1)
    lines = ["ImageId, EncodedPixels"]  # the competition's header has the space
    truth = {}
    for i in range(24):
        image_id = f"1.2.{i}"
        folder = tmp_path / "dicom-images-train" / f"s{i}"
        folder.mkdir(parents=True)
        if i % 2:
            (folder / f"{image_id}.png").write_bytes(png_bytes(_image(i, 32)))
        else:
            (folder / f"{image_id}.dcm").write_bytes(dicom_bytes(_image(i, 32).astype(np.uint16)))
        mask = np.zeros((32, 32), bool)
        if i % 3 == 0:
            mask[g.integers(0, 16) : 24, 3 : g.integers(5, 20)] = True
            mask[28:30, 28:31] = True
            # Two rows for one image (two regions), as the competition file has.
            upper, lower = mask.copy(), mask.copy()
            upper[16:] = False
            lower[:16] = False
            lines += [f"{image_id}, {rle_encode(upper)}", f"{image_id}, {rle_encode(lower)}"]
        else:
            lines.append(f"{image_id}, -1")
        truth[image_id] = mask
    (tmp_path / "train-rle.csv").write_text("\n".join(lines) + "\n")
    parts = _all_splits(f"siim:{tmp_path}")
    seen = 0
    for dataset in parts.values():
        assert dataset.mask_classes == ("Pneumothorax",)
        for i in range(len(dataset)):
            s = dataset[i]
            assert (s.masks[0] == truth[s.key]).all()
            assert s.labels[1] == float(truth[s.key].any())
            seen += 1
    assert seen == 24


def test_covidx_label_files_and_split_file(tmp_path):
    # 100 training patients: a 10% validation split of a handful could be empty.
    for name, count in (("train", 200), ("test", 6)):
        (tmp_path / name).mkdir()
        lines = []
        for i in range(count):
            file = f"{name}{i}.png"
            (tmp_path / name / file).write_bytes(png_bytes(_image(i, 24)))
            label = ("positive", "negative")[i % 2]
            lines.append(f"pat{i // 2} {file} {label} sourceA")
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    spec = f"covidx:{tmp_path}"
    test = open_dataset(spec, "test")
    assert test.classes == ("negative", "positive") and len(test) == 6 and test.exclusive
    train, validate = open_dataset(spec, "train"), open_dataset(spec, "validate")
    assert len(train) + len(validate) == 200
    # Both images of a patient land in the same split.
    assert not {r.subject for r in train.records} & {r.subject for r in validate.records}
    counts = write_split_file(spec, str(tmp_path / "splits.json"))
    assert counts == {"train": len(train), "validate": len(validate), "test": 6}
    proc = run_cli(
        "prior_dist.evaluate", "splits", "--data", spec, "--out", str(tmp_path / "cli.json")
    )
    assert (tmp_path / "cli.json").read_text() == (tmp_path / "splits.json").read_text()
    assert "-> " in proc.stdout
    pinned = json.loads((tmp_path / "splits.json").read_text())
    pinned["train"], pinned["validate"] = (
        pinned["train"][:5],
        pinned["validate"] + pinned["train"][5:],
    )
    (tmp_path / "pinned.json").write_text(json.dumps(pinned))
    assert len(open_dataset(spec, "train", split_file=str(tmp_path / "pinned.json"))) == 5
    (tmp_path / "test.txt").write_text("only-two fields\n")
    with pytest.raises(ValueError, match="line 1"):
        open_dataset(spec, "test")
    with pytest.raises(ValueError, match="unknown dataset kind 'nosuch'"):
        open_dataset("nosuch:/x", "test")


def test_patient_split_follows_the_fractions():
    rule = {"validate": 0.2, "test": 0.2}
    got = [patient_split(f"subject{i}", rule, "7") for i in range(5000)]
    assert abs(got.count("train") / 5000 - 0.6) < 0.03
    assert abs(got.count("test") / 5000 - 0.2) < 0.03


def test_patient_split_is_the_committed_hash():
    """Pretraining shards built before the split rule moved to `data.tables` keep their splits:
    the rule is sha256("salt:subject"), test first, then validate, then train."""
    import hashlib

    def slow(subject, validate, test, salt):
        u = (
            int.from_bytes(hashlib.sha256(f"{salt}:{subject}".encode()).digest()[:8], "little")
            / 2**64
        )
        return "test" if u < test else "validate" if u < test + validate else "train"

    for i in range(300):
        assert patient_split(
            str(10000000 + i), {"validate": 0.05, "test": 0.1}, "prior_dist"
        ) == slow(str(10000000 + i), 0.05, 0.1, "prior_dist")


# --- metrics -----------------------------------------------------------------------------------


def test_dice_iou_against_per_pixel_counts():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 2, 8, 8, generator=g) > 0.5
    target = torch.rand(5, 2, 8, 8, generator=g) > 0.6
    target[0, 1] = False
    out = dice_iou(pred, target, ["a", "b"])
    for m, name in enumerate("ab"):
        tp = sum(
            int(p and t)
            for p, t in zip(pred[:, m].flatten().tolist(), target[:, m].flatten().tolist())
        )
        fp = int(pred[:, m].sum()) - tp
        fn = int(target[:, m].sum()) - tp
        assert out["per_class"][name]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert out["per_class"][name]["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert out["per_class"]["b"]["positive_images"] == 4


def _random_detections(seed: int, images: int = 12, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    preds, truths = [], []
    for _ in range(images):
        n = int(torch.randint(0, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 30 + 4
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, classes, (n,), generator=g)
        truths.append({"boxes": boxes, "labels": labels})
        # Detections: jittered copies of the truth, some wrong labels, some extras.
        k = int(torch.randint(0, 7, (1,), generator=g))
        base = torch.cat(
            [
                boxes,
                torch.rand(k, 2, generator=g).repeat(1, 2) * 60 + torch.tensor([0, 0, 10, 10.0]),
            ]
        )
        base = base + torch.randn(base.shape, generator=g) * 3
        base[:, 2:] = torch.maximum(base[:, 2:], base[:, :2] + 1)
        plabels = torch.cat([labels, torch.randint(0, classes, (k,), generator=g)])
        flip = torch.rand(len(plabels), generator=g) < 0.15
        plabels[flip] = (plabels[flip] + 1) % classes
        preds.append(
            {"boxes": base, "labels": plabels, "scores": torch.rand(len(plabels), generator=g)}
        )
    return preds, truths


def test_map_matches_pycocotools():
    pytest.importorskip("pycocotools")
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for seed in range(3):
        preds, truths = _random_detections(seed)
        ours = mean_average_precision(preds, truths, 3)
        gt = {
            "images": [{"id": i, "width": 100, "height": 100} for i in range(len(truths))],
            "categories": [{"id": c} for c in range(3)],
            "annotations": [],
        }
        for i, t in enumerate(truths):
            for b, c in zip(t["boxes"].tolist(), t["labels"].tolist()):
                gt["annotations"].append(
                    {
                        "id": len(gt["annotations"]) + 1,
                        "image_id": i,
                        "category_id": c,
                        "iscrowd": 0,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "area": (b[2] - b[0]) * (b[3] - b[1]),
                    }
                )
        dets = [
            {
                "image_id": i,
                "category_id": c,
                "score": s,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            }
            for i, p in enumerate(preds)
            for b, c, s in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist())
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert ours["map"] == pytest.approx(evaluator.stats[0], abs=1e-6)
        assert ours["map_50"] == pytest.approx(evaluator.stats[1], abs=1e-6)
        assert ours["map_75"] == pytest.approx(evaluator.stats[2], abs=1e-6)


def test_map_perfect_and_empty():
    preds, truths = _random_detections(5)
    perfect = [
        {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
        for t in truths
    ]
    assert mean_average_precision(perfect, truths, 3)["map"] == pytest.approx(1.0)
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "scores": torch.zeros(0),
        }
        for _ in truths
    ]
    assert mean_average_precision(empty, truths, 3)["map_50"] == 0.0


# --- prototype bank start ----------------------------------------------------------------------


def test_farthest_point_rows_and_fill():
    from prior_dist.task.prototype_init import farthest_point_rows, initial_prototypes

    x = torch.tensor([[0.0, 0], [0, 0], [10, 0], [0, 1], [10, 0], [5, 5]])
    assert farthest_point_rows(x, 3).tolist() == [0, 2, 5]
    # Only 4 distinct rows: duplicates are not picked, the rest is drawn around the data.
    assert len(farthest_point_rows(x, 6)) == 4
    bank = initial_prototypes(x, 6, seed=0)
    assert bank.shape == (6, 2) and torch.equal(bank[:4], x[[0, 2, 5, 3]])
    assert torch.equal(bank, initial_prototypes(x, 6, seed=0))
    assert not torch.equal(bank[4:], initial_prototypes(x, 6, seed=1)[4:])


# --- dense heads on both towers ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_dense_heads_on_each_tower(arch):
    from prior_dist.evaluation.detection import build_detector
    from prior_dist.evaluation.segmentation import SegmentationModel
    from prior_dist.models.config import ImageTowerConfig
    from prior_dist.models.towers import build_image_tower

    torch.manual_seed(0)
    cfg = (
        ImageTowerConfig(image_size=64, block="basic", layers=(1, 1, 1, 1), width=8, pool_heads=2)
        if arch == "resnet"
        else ImageTowerConfig(
            arch="vit", image_size=64, patch_size=16, vit_depth=1, vit_width=32, vit_heads=2
        )
    )
    tower = build_image_tower(cfg, 16, "spatial")
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    seg = SegmentationModel(tower, 64, 3).train()
    images = torch.randn(2, 1, 64, 64)
    logits = seg(images)
    assert logits.shape == (2, 3, 64, 64)
    logits.sum().backward()
    # Frozen encoder: no gradient, BN statistics untouched; the decoder learns.
    assert all(p.grad is None for p in seg.pyramid.tower.parameters())
    assert all(torch.equal(v, before[k]) for k, v in seg.pyramid.tower.state_dict().items())
    assert any(p.grad is not None for p in seg.decoder.parameters())
    tuned = SegmentationModel(tower, 64, 3, finetune=True).train()
    tuned(images).sum().backward()
    assert any(p.grad is not None for p in tuned.pyramid.tower.parameters())
    for kind in ("retinanet", "faster_rcnn"):
        detector = build_detector(tower, 64, 2, kind).train()
        targets = [
            {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        ]
        losses = detector(list(images), targets)
        assert all(torch.isfinite(v) for v in losses.values()), (kind, losses)
        out = detector.eval()(list(images))
        assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


def test_label_fraction_subsets_are_stratified_per_label():
    """1% of 1000 multi-label samples where one class has 3 positives: a plain seeded draw of
    10 misses it for most seeds; the stratified draw never does, and keeps its size."""
    from prior_dist.evaluation.tensors import label_subset, spread

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(1000, 4, generator=g) < torch.tensor([0.3, 0.1, 0.02, 0.0])).float()
    labels[:, 3] = float("nan")
    labels[[5, 500, 900], 3] = 1.0  # the rare class: 3 positives
    labels[7, 0] = -1.0  # uncertain counts as not positive
    plain_missed, sizes = 0, set()
    for seed in range(20):
        plain = label_subset(1000, 0.01, seed)
        plain_missed += int(not (labels[plain, 3] == 1).any())
        picked = label_subset(1000, 0.01, seed, labels)
        sizes.add(len(picked))
        assert len(set(picked.tolist())) == len(picked)
        for c in range(4):
            assert (labels[picked, c] == 1).any(), (seed, c)
        assert torch.equal(picked, label_subset(1000, 0.01, seed, labels))
    assert plain_missed >= 10 and sizes == {10}
    common = label_subset(1000, 0.2, 3, labels)
    share = float((labels[common, 0] == 1).float().mean())
    assert abs(share - float((labels[:, 0] == 1).float().mean())) < 0.06
    assert spread([1.0]) is None and spread([1.0, 3.0]) == pytest.approx(2**0.5)
