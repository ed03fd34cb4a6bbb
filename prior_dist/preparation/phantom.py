"""The phantom dataset: synthetic chest-X-ray-like studies with reports, labels, boxes and masks.

Deterministic by seed. Each study has its own anatomy (torso, lung fields, heart, mediastinum,
diaphragm, ribs, vessel markings, exposure, noise) and zero or more findings, each with a
visual signature and a location. Images follow the radiological convention: the patient's
right is on the image's left. Reports are written in radiology style with varied phrasing and
sentence order, negations, laterality and severity.

Findings (bit `i` of the stored mask is finding `FINDINGS[i]`):
atelectasis (plate-like band at a lung base), cardiomegaly (cardiothoracic ratio > 0.55),
consolidation (dense patchy opacity in one zone), edema (bilateral perihilar haze and septal
lines), pleural effusion (basal opacity with a meniscus), pneumothorax (apical or lateral
lucency without markings, with a pleural line), nodule (small round opacity) and support
devices (tube line, pacemaker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prior_dist.data.labels import PHANTOM_FINDINGS
from prior_dist.seeding import stable_hash

# Bumped whenever the generator's output changes; shards record it in their manifest's source,
# so stale phantom shards are refused instead of silently reused.
# 2: positive findings can also be reported as "<finding> is observed" (as real reports do).
GENERATOR_VERSION = 2

FINDINGS = tuple(PHANTOM_FINDINGS)
NO_FINDING = "No Finding"
PREVALENCE = {
    "atelectasis": 0.16,
    "cardiomegaly": 0.16,
    "consolidation": 0.16,
    "edema": 0.14,
    "pleural_effusion": 0.16,
    "pneumothorax": 0.08,
    "nodule": 0.10,
    "support_devices": 0.15,
}
SPLIT_FRACTIONS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))


@dataclass
class Finding:
    name: str
    side: str  # "left" | "right" | "bilateral" | "midline" (patient's side)
    zone: str  # "upper" | "middle" | "lower" | "apical" | ""
    severity: str  # "mild" | "moderate" | "severe" | "small" | "large" | ""


@dataclass
class PhantomStudy:
    key: str
    subject_id: str
    split: str
    images: list[np.ndarray]  # uint8 [H, W], one per frontal view
    findings: list[Finding]
    report: str
    labels: dict[str, int]
    mask: np.ndarray  # uint8 [H, W], bit i = FINDINGS[i]
    boxes: list[dict] = field(default_factory=list)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(stable_hash(repr((seed,) + parts)))


def split_for_subject(seed: int, subject: int) -> str:
    u = _rng(seed, "split", subject).random()
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


class _Canvas:
    """Normalised coordinates x (left->right of the image) and y (top->bottom), both in [0, 1]."""

    def __init__(self, size: int):
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")
        self.size = size

    def ellipse(self, cx, cy, rx, ry, softness=0.02):
        d = np.sqrt(((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2)
        return np.clip((1.0 - d) / softness + 0.5, 0.0, 1.0)

    def gaussian(self, cx, cy, sx, sy):
        return np.exp(-0.5 * (((self.x - cx) / sx) ** 2 + ((self.y - cy) / sy) ** 2))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    coords = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(coords.astype(int), cells - 1)
    t = coords - i0
    rows = grid[i0] * (1 - t)[:, None] + grid[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def _render(
    rng: np.random.Generator, size: int, findings: list[Finding], anatomy: dict
) -> tuple[np.ndarray, np.ndarray]:
    c = _Canvas(size)
    a = anatomy
    shift_x, shift_y = a["shift_x"], a["shift_y"]
    # Patient's right lung is on the image's left.
    lung_cx = {"right": 0.32 + shift_x, "left": 0.68 + shift_x}
    lung_cy = 0.47 + shift_y
    lung_rx, lung_ry = a["lung_rx"], a["lung_ry"]
    img = np.full((size, size), 0.08, dtype=np.float32)
    torso = c.ellipse(0.5 + shift_x, 0.55 + shift_y, 0.46, 0.56, softness=0.08)
    img += 0.55 * torso
    lungs = np.zeros_like(img)
    for side in ("right", "left"):
        lungs = np.maximum(lungs, c.ellipse(lung_cx[side], lung_cy, lung_rx, lung_ry, 0.06))
    # Diaphragm domes cut the lung bases.
    for side in ("right", "left"):
        dome_y = lung_cy + lung_ry * (0.62 if side == "right" else 0.70)
        dome = c.y > dome_y - 0.12 * np.exp(-(((c.x - lung_cx[side]) / 0.12) ** 2))
        lungs = np.where(dome & (np.abs(c.x - lung_cx[side]) < lung_rx * 1.2), lungs * 0.15, lungs)
    markings = 0.5 + 0.5 * _smooth_noise(rng, size, 24) * _smooth_noise(rng, size, 7)
    img -= 0.42 * lungs * (0.85 + 0.15 * markings)
    # Ribs: bright arcs over the lungs.
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.sin(
        2 * np.pi * a["rib_freq"] * (c.y + 0.12 * (c.x - 0.5) ** 2 * 4) + phase
    )
    img += 0.07 * (ribs**6) * lungs
    # Mediastinum and heart (heart sits toward the patient's left = image right).
    img += 0.16 * c.ellipse(0.5 + shift_x, 0.35 + shift_y, 0.06, 0.3, 0.1)
    # Cardiothoracic ratio: heart width over the outer width of the two lung fields.
    thorax_width = lung_cx["left"] - lung_cx["right"] + 2 * lung_rx
    heart_rx = a["ctr"] * thorax_width / 2
    heart = c.ellipse(0.53 + shift_x, lung_cy + 0.13, heart_rx, 0.13 * a["heart_ry"], 0.08)
    img = np.maximum(img, img * (1 - heart) + heart * (0.55 + 0.05 * markings))
    # Vessel markings and small calcified granulomas: distractors present in every study.
    img += 0.05 * lungs * c.gaussian(0.5 + shift_x, lung_cy, 0.15, 0.12) * markings
    for _ in range(rng.integers(0, 3)):
        side = rng.choice(["right", "left"])
        gx = lung_cx[side] + rng.uniform(-0.7, 0.7) * lung_rx
        gy = lung_cy + rng.uniform(-0.6, 0.4) * lung_ry
        img += 0.35 * c.ellipse(gx, gy, 0.006, 0.006, 0.3) * lungs

    mask = np.zeros((size, size), dtype=np.uint8)
    for finding in findings:
        bit = np.uint8(1 << FINDINGS.index(finding.name))
        region = _draw_finding(
            rng, c, img, finding, lung_cx, lung_cy, lung_rx, lung_ry, lungs, heart
        )
        mask[region > 0.5] |= bit
    # Exposure, noise, clipping.
    img = a["gain"] * img + a["offset"]
    img = np.clip(img, 0, 1) ** a["gamma"]
    img += rng.normal(0, a["noise"], img.shape).astype(np.float32)
    return np.clip(img * 255.0, 0, 255).astype(np.uint8), mask


def _severity_scale(severity: str) -> float:
    return {"mild": 0.7, "small": 0.7, "moderate": 1.0, "severe": 1.35, "large": 1.35}.get(
        severity, 1.0
    )


def _zone_y(zone: str, lung_cy: float, lung_ry: float) -> float:
    return (
        lung_cy
        + {"upper": -0.45, "apical": -0.7, "middle": 0.0, "lower": 0.42}.get(zone, 0.0) * lung_ry
    )


def _draw_finding(
    rng, c: _Canvas, img, f: Finding, lung_cx, lung_cy, lung_rx, lung_ry, lungs, heart
) -> np.ndarray:
    """Draw one finding into `img` in place and return its region (float mask in [0, 1]).

    Long because it is a table: one branch per finding, in one function so that the order of
    the random draws (which `GENERATOR_VERSION` pins: same seed, same images) stays visible.
    """
    k = _severity_scale(f.severity)
    sides = ["right", "left"] if f.side == "bilateral" else [f.side]
    region = np.zeros_like(img)
    if f.name == "cardiomegaly":
        return (heart > 0.5).astype(np.float32)
    for side in sides:
        cx = lung_cx.get(side, 0.5)
        if f.name == "atelectasis":
            y = _zone_y("lower", lung_cy, lung_ry) - 0.02
            tilt = rng.uniform(-0.08, 0.08)
            band = np.exp(-0.5 * ((c.y - y - tilt * (c.x - cx)) / (0.011 * k)) ** 2)
            band *= np.abs(c.x - cx - rng.uniform(-0.02, 0.02)) < lung_rx * 0.75
            r = band * (lungs > 0.3)
            img += 0.3 * r
        elif f.name == "consolidation":
            y = _zone_y(f.zone, lung_cy, lung_ry)
            blob = c.gaussian(cx + rng.uniform(-0.2, 0.2) * lung_rx, y, 0.07 * k, 0.06 * k)
            patchy = blob * (0.55 + 0.45 * _smooth_noise(rng, c.size, 16))
            r = (patchy > 0.35) * (lungs > 0.2)
            img += 0.38 * np.clip(patchy * 1.4, 0, 1) * (lungs > 0.2)
        elif f.name == "edema":
            haze = c.gaussian(
                cx + (0.1 if side == "right" else -0.1), lung_cy + 0.02, 0.11 * k, 0.16 * k
            )
            kerley = (np.abs(np.sin(c.y * 180.0)) > 0.93) * (np.abs(c.x - cx) > lung_rx * 0.6)
            kerley = kerley * (c.y > lung_cy + 0.15)
            r = ((haze > 0.4) | (kerley > 0)) * (lungs > 0.2)
            img += (0.22 * haze + 0.12 * kerley) * (lungs > 0.2)
        elif f.name == "pleural_effusion":
            base = lung_cy + lung_ry * 0.75
            height = 0.08 * k + rng.uniform(0, 0.03)
            # Meniscus: the fluid rises along the lateral chest wall.
            lateral = np.abs(c.x - cx) / lung_rx
            level = base - height * (0.6 + 0.8 * np.clip(lateral, 0, 1) ** 2)
            fluid = (c.y > level) & (np.abs(c.x - cx) < lung_rx * 1.1) & (c.y < base + 0.12)
            r = fluid * (lungs > 0.05)
            img += 0.42 * r
        elif f.name == "pneumothorax":
            lateral = 1.0 if side == "left" else -1.0
            apex_y = lung_cy - lung_ry * 0.95
            depth = 0.10 * k
            edge_x = cx + lateral * (lung_rx - depth)
            pocket = (lateral * (c.x - edge_x) > 0) & (c.y < apex_y + lung_ry * 1.1) & (lungs > 0.3)
            r = pocket.astype(np.float32)
            # Lucent, no markings, with a thin bright visceral pleural line.
            img -= 0.12 * r
            img += (
                0.18
                * np.exp(-0.5 * ((c.x - edge_x) / 0.003) ** 2)
                * (c.y < apex_y + lung_ry * 1.1)
                * (lungs > 0.3)
            )
        elif f.name == "nodule":
            y = _zone_y(f.zone, lung_cy, lung_ry)
            nx = cx + rng.uniform(-0.4, 0.4) * lung_rx
            radius = rng.uniform(0.015, 0.028)
            spot = c.ellipse(nx, y, radius, radius, 0.15)
            r = spot
            img += 0.35 * spot
        elif f.name == "support_devices":
            tube_x = 0.5 + rng.uniform(-0.01, 0.01)
            tip = lung_cy + rng.uniform(-0.15, 0.05)
            tube = np.exp(-0.5 * ((c.x - tube_x - 0.03 * (c.y - 0.1)) / 0.004) ** 2) * (c.y < tip)
            img += 0.45 * tube
            r = (tube > 0.3).astype(np.float32)
            if rng.random() < 0.5:
                pacer = (np.abs(c.x - 0.78) < 0.05) & (np.abs(c.y - 0.16) < 0.03)
                img += 0.5 * pacer
                r = np.maximum(r, pacer)
        else:
            raise ValueError(f"unknown finding {f.name!r}")
        region = np.maximum(region, r)
    return region


# ----------------------------------------------------------------------------- studies and reports

_SEVERITIES = {
    "atelectasis": ["mild", "moderate", ""],
    "cardiomegaly": ["mild", "moderate", "severe"],
    "consolidation": ["", "moderate", "severe"],
    "edema": ["mild", "moderate", "severe"],
    "pleural_effusion": ["small", "moderate", "large"],
    "pneumothorax": ["small", "moderate", "large"],
    "nodule": [""],
    "support_devices": [""],
}


def _sample_findings(rng: np.random.Generator) -> list[Finding]:
    found = []
    for name in FINDINGS:
        if rng.random() >= PREVALENCE[name]:
            continue
        severity = str(rng.choice(_SEVERITIES[name]))
        if name == "cardiomegaly":
            side, zone = "midline", ""
        elif name == "support_devices":
            side, zone = "midline", ""
        elif name == "edema":
            side, zone = "bilateral", ""
        elif name == "pleural_effusion":
            side = str(rng.choice(["left", "right", "bilateral"], p=[0.4, 0.4, 0.2]))
            zone = "lower"
        elif name == "pneumothorax":
            side, zone = str(rng.choice(["left", "right"])), "apical"
        elif name == "atelectasis":
            side = str(rng.choice(["left", "right", "bilateral"], p=[0.4, 0.4, 0.2]))
            zone = "lower"
        else:
            side = str(rng.choice(["left", "right"]))
            zone = str(rng.choice(["upper", "middle", "lower"]))
        found.append(Finding(name, side, zone, severity))
    return found


def _side_words(side: str) -> str:
    return {"bilateral": "bilateral", "left": "left", "right": "right"}.get(side, "")


def _lobe(side: str, zone: str) -> str:
    lobes = {
        ("right", "upper"): "right upper lobe",
        ("right", "middle"): "right middle lobe",
        ("right", "lower"): "right lower lobe",
        ("left", "upper"): "left upper lobe",
        ("left", "middle"): "lingula",
        ("left", "lower"): "left lower lobe",
    }
    return lobes.get((side, zone), f"{side} lung")


def _positive_sentence(rng, f: Finding) -> str:
    """One sentence stating finding `f`, phrased at random.

    Long because it is a phrase table, one branch per finding; the random draws keep the order
    that `GENERATOR_VERSION` pins.
    """
    sev = f.severity
    side = _side_words(f.side)
    pick = lambda options: str(rng.choice(options))  # noqa: E731
    if f.name == "atelectasis":
        where = "bibasilar" if f.side == "bilateral" else f"{side} basilar"
        return pick(
            [
                f"{(sev + ' ') if sev else ''}{where} atelectasis is present.".capitalize(),
                f"There is {(sev + ' ') if sev else ''}plate-like atelectasis at the {side} "
                f"lung base{'s' if f.side == 'bilateral' else ''}.",
                f"Linear opacity at the {side} base{'s' if f.side == 'bilateral' else ''} is "
                "consistent with atelectasis.",
                f"{(sev + ' ') if sev else ''}{where} atelectasis is observed.".capitalize(),
            ]
        )
    if f.name == "cardiomegaly":
        return pick(
            [
                f"The heart is {sev}ly enlarged."
                if sev != "severe"
                else "The heart is markedly enlarged.",
                f"There is {sev} cardiomegaly.",
                f"The cardiac silhouette is enlarged, consistent with {sev} cardiomegaly.",
                f"{sev.capitalize()} cardiomegaly is observed.",
            ]
        )
    if f.name == "consolidation":
        lobe = _lobe(f.side, f.zone)
        dense = {"severe": "dense ", "moderate": "", "": ""}[sev]
        return pick(
            [
                f"There is {dense}consolidation in the {lobe}.",
                f"{'Dense' if dense else 'Patchy'} airspace consolidation is seen in the {lobe}, "
                "concerning for pneumonia.",
                f"Focal consolidation is present in the {lobe}.",
                f"Consolidation is observed in the {lobe}.",
            ]
        )
    if f.name == "edema":
        return pick(
            [
                f"There is {sev} pulmonary edema.",
                f"{sev.capitalize()} interstitial pulmonary edema is present with perihilar "
                "haziness.",
                f"Findings are consistent with {sev} pulmonary edema.",
                f"{sev.capitalize()} pulmonary edema is observed.",
            ]
        )
    if f.name == "pleural_effusion":
        if f.side == "bilateral":
            return pick(
                [
                    f"There are {sev} bilateral pleural effusions.",
                    f"{sev.capitalize()} bilateral pleural effusions are present.",
                    f"{sev.capitalize()} bilateral pleural effusions are observed.",
                ]
            )
        return pick(
            [
                f"There is a {sev} {side} pleural effusion.",
                f"A {sev} {side} pleural effusion is present with blunting of the costophrenic "
                "angle.",
                f"{sev.capitalize()} {side}-sided pleural effusion.",
                f"A {sev} {side} pleural effusion is observed.",
            ]
        )
    if f.name == "pneumothorax":
        return pick(
            [
                f"There is a {sev} {side} apical pneumothorax.",
                f"A {sev} {side} pneumothorax is seen.",
                f"{sev.capitalize()} {side}-sided pneumothorax with a visible pleural line.",
                f"A {sev} {side} pneumothorax is observed.",
            ]
        )
    if f.name == "nodule":
        size_cm = rng.choice(["0.8", "1.0", "1.2", "1.5"])
        lobe = _lobe(f.side, f.zone)
        return pick(
            [
                f"There is a {size_cm} cm nodule in the {lobe}.",
                f"A {size_cm} cm rounded opacity in the {lobe} may represent a nodule.",
                f"A {lobe} pulmonary nodule measures {size_cm} cm.",
                f"A {size_cm} cm nodule is observed in the {lobe}.",
            ]
        )
    if f.name == "support_devices":
        return pick(
            [
                "An endotracheal tube is in place.",
                "Support devices are in standard position.",
                "A nasogastric tube courses below the diaphragm.",
                "The enteric tube is in satisfactory position.",
            ]
        )
    raise ValueError(f.name)


_NEGATIVES = {
    "atelectasis": ["No atelectasis.", "There is no atelectasis."],
    "cardiomegaly": [
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The cardiomediastinal silhouette is normal.",
    ],
    "consolidation": [
        "No focal consolidation.",
        "There is no focal consolidation.",
        "No focal airspace consolidation is seen.",
    ],
    "edema": ["No pulmonary edema.", "There is no pulmonary vascular congestion or edema."],
    "pleural_effusion": [
        "No pleural effusion.",
        "There is no pleural effusion.",
        "The costophrenic angles are sharp.",
    ],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "nodule": ["No suspicious pulmonary nodules.", "No focal nodules are identified."],
    "support_devices": [],
}
_FILLERS = [
    "The osseous structures are unremarkable.",
    "The mediastinal contours are normal.",
    "Visualized upper abdomen is unremarkable.",
    "Degenerative changes of the thoracic spine.",
    "The hila are normal in size.",
    "Surgical clips are noted in the upper abdomen.",
]
_IMPRESSION_NAMES = {
    "atelectasis": "atelectasis",
    "cardiomegaly": "cardiomegaly",
    "consolidation": "consolidation",
    "edema": "pulmonary edema",
    "pleural_effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "nodule": "pulmonary nodule",
    "support_devices": "support devices in place",
}


def write_report(rng: np.random.Generator, findings: list[Finding]) -> str:
    """A radiology-style report: FINDINGS (shuffled positives, negatives, fillers), IMPRESSION."""
    present = {f.name for f in findings}
    sentences = [_positive_sentence(rng, f) for f in findings]
    for name in FINDINGS:
        if name not in present and _NEGATIVES[name] and rng.random() < 0.8:
            sentences.append(str(rng.choice(_NEGATIVES[name])))
    for filler in rng.choice(_FILLERS, size=rng.integers(1, 3), replace=False):
        sentences.append(str(filler))
    rng.shuffle(sentences)
    if findings:
        parts = []
        for f in findings:
            side = _side_words(f.side) if f.side in ("left", "right", "bilateral") else ""
            sev = f"{f.severity} " if f.severity and f.name not in ("support_devices",) else ""
            parts.append(f"{sev}{side + ' ' if side else ''}{_IMPRESSION_NAMES[f.name]}".strip())
        if len(parts) == 1 or rng.random() < 0.5:
            impression = " ".join(f"{p.capitalize()}." for p in parts)
        else:
            impression = " ".join(f"{i + 1}. {p.capitalize()}." for i, p in enumerate(parts))
    else:
        impression = str(
            rng.choice(
                [
                    "No acute cardiopulmonary process.",
                    "No acute intrathoracic abnormality.",
                    "Normal chest radiograph.",
                ]
            )
        )
    header = str(rng.choice(["FINDINGS:", "Findings:", "FINDINGS :"]))
    # Line-wrap the findings at ~70 characters as dictation systems do.
    text, line = [], ""
    for word in " ".join(sentences).split():
        if len(line) + len(word) > 70:
            text.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    text.append(line)
    return (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n\n"
        " INDICATION:  ___ year old with dyspnea.\n\n"
        f" {header}\n\n " + "\n ".join(text) + "\n\n IMPRESSION:\n\n " + impression + "\n"
    )


def _anatomy(rng: np.random.Generator, findings: list[Finding]) -> dict:
    enlarged = next((f for f in findings if f.name == "cardiomegaly"), None)
    ctr = (
        rng.uniform(0.40, 0.48)
        if enlarged is None
        else {"mild": 0.56, "moderate": 0.61, "severe": 0.67}[enlarged.severity]
        + rng.uniform(-0.01, 0.02)
    )
    return {
        "shift_x": rng.normal(0, 0.015),
        "shift_y": rng.normal(0, 0.015),
        "lung_rx": rng.uniform(0.15, 0.18),
        "lung_ry": rng.uniform(0.26, 0.31),
        "rib_freq": rng.uniform(9.0, 12.0),
        "ctr": ctr,
        "heart_ry": rng.uniform(0.9, 1.15),
        "gain": rng.uniform(0.85, 1.15),
        "offset": rng.uniform(-0.05, 0.05),
        "gamma": rng.uniform(0.8, 1.25),
        "noise": rng.uniform(0.01, 0.035),
    }


def render_findings(findings: list[Finding], key: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One frontal image showing `findings` (and its finding mask), its anatomy, exposure and
    noise drawn from `key`: the image half of a synthetic pair for a real report."""
    anatomy = _anatomy(_rng(0, "render", key), findings)
    return _render(_rng(0, "render", key, "draw"), size, findings, anatomy)


def make_study(
    index: int, seed: int = 0, size: int = 256, studies_per_subject: int = 2
) -> PhantomStudy:
    """Generate study `index` of the phantom dataset with `seed` (pure function of both)."""
    rng = _rng(seed, "study", index)
    findings = _sample_findings(rng)
    anatomy = _anatomy(rng, findings)
    num_images = 2 if rng.random() < 0.2 else 1
    # One rendering per study; further views are the same anatomy and findings with their own
    # exposure and noise, so views agree on what they show.
    image, mask = _render(_rng(seed, "study", index, "draw"), size, findings, anatomy)
    images = [image]
    for view in range(1, num_images):
        view_rng = _rng(seed, "study", index, "view", view)
        noise = view_rng.normal(0, 6.0, image.shape)
        images.append(
            np.clip(image.astype(np.float32) * view_rng.uniform(0.9, 1.1) + noise, 0, 255).astype(
                np.uint8
            )
        )
    report = write_report(_rng(seed, "report", index), findings)
    present = {f.name for f in findings}
    labels = {PHANTOM_FINDINGS[name]: int(name in present) for name in FINDINGS}
    labels[NO_FINDING] = int(not present)
    subject = index // studies_per_subject
    boxes = []
    for i, name in enumerate(FINDINGS):
        ys, xs = np.nonzero(mask & (1 << i))
        if len(xs):
            boxes.append(
                {
                    "label": PHANTOM_FINDINGS[name],
                    "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                }
            )
    return PhantomStudy(
        key=f"ph{seed:04d}s{index:08d}",
        subject_id=f"ph{seed:04d}p{subject:08d}",
        split=split_for_subject(seed, subject),
        images=images,
        findings=findings,
        report=report,
        labels=labels,
        mask=mask,
        boxes=boxes,
    )
