"""A built-in procedural expression set: 48x48 grey cartoon faces for every emotion.

Why it exists: tests, benchmarks and quick starts need labelled faces without FER2013
(which cannot be downloaded here and may not be committed). The faces are drawn with
signed-distance shapes on coordinate grids, many at once in numpy, with soft (anti-
aliased) edges. Each emotion has its own brows, eyes and mouth; pose, size, skin,
hair, background, lighting, expression strength and noise vary per face, so a
classifier has to learn the expression, not memorise pixels — yet a small CNN reaches
well over 90% in seconds, which is what makes the set useful for checking that a
pipeline learns at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bicogan_dist.data.records import IMAGE_SIZE, FaceRecord
from bicogan_dist.labels import FER_CODE_NAMES, EmotionLabels

#: Faces rendered per vectorised chunk: big enough to amortise numpy's per-call cost,
#: small enough for the working arrays (64 x 48 x 48 float32 = 590 KB) to stay in
#: cache — 64 renders about twice as fast as 256 here.
_CHUNK = 64


@dataclass(frozen=True)
class _Expression:
    """Face-local geometry of one emotion, in pixels at scale 1 (v grows downwards)."""

    brow_inner: float  # height of the brow's inner end (negative = above the face centre)
    brow_outer: float
    eye_open: float  # half-height of the eye opening
    mouth_width: float  # half-width
    mouth_curve: float  # corner lift: > 0 smile, < 0 frown
    mouth_open: float  # half-height of the opening at the centre
    mouth_tilt: float = 0.0  # one corner up (disgust's sneer)
    brow_inner_x: float = 3.2


_NEUTRAL = _Expression(brow_inner=-9.0, brow_outer=-9.3, eye_open=1.7, mouth_width=6.5, mouth_curve=0.0,
                       mouth_open=0.0)

#: FER code → expression. Each differs from neutral in at least two cues, as in the
#: FACS descriptions the FER labellers used (surprise: raised brows, wide eyes, dropped
#: jaw; fear: raised and drawn-together brows, wide eyes, stretched mouth; ...).
_EXPRESSIONS: dict[int, _Expression] = {
    0: _Expression(brow_inner=-5.8, brow_outer=-10.2, eye_open=1.2, mouth_width=4.8, mouth_curve=-1.2,
                   mouth_open=0.0),  # angry: brows down and in, narrowed eyes, pressed mouth
    1: _Expression(brow_inner=-7.0, brow_outer=-8.0, eye_open=1.1, mouth_width=5.5, mouth_curve=-1.5,
                   mouth_open=0.9, mouth_tilt=2.2),  # disgust: lowered brows, squint, sneer
    2: _Expression(brow_inner=-12.6, brow_outer=-11.0, eye_open=2.6, mouth_width=8.5, mouth_curve=-1.4,
                   mouth_open=1.8, brow_inner_x=2.4),  # fear
    3: _Expression(brow_inner=-9.6, brow_outer=-9.6, eye_open=1.1, mouth_width=8.8, mouth_curve=3.6,
                   mouth_open=1.4),  # happy: upward curve, open smile, cheeks squint the eyes
    4: _Expression(brow_inner=-12.0, brow_outer=-8.0, eye_open=1.4, mouth_width=6.5, mouth_curve=-3.2,
                   mouth_open=0.0),  # sad: inner brows raised, downward curve
    5: _Expression(brow_inner=-13.2, brow_outer=-13.2, eye_open=2.9, mouth_width=3.6, mouth_curve=0.0,
                   mouth_open=4.2),  # surprise: high brows, wide eyes, round open mouth
    6: _NEUTRAL,
}
_FIELDS = tuple(_NEUTRAL.__dataclass_fields__)


def _expression_table(fer_codes: np.ndarray) -> dict[str, np.ndarray]:
    unknown = sorted(set(int(c) for c in np.unique(fer_codes)) - set(_EXPRESSIONS))
    if unknown:
        raise ValueError(f"no synthetic expression for FER code(s) {unknown}; codes are 0..6 {list(FER_CODE_NAMES)}")
    table = np.array([[getattr(_EXPRESSIONS[c], f) for f in _FIELDS] for c in range(7)], dtype=np.float32)
    rows = table[fer_codes]
    return {f: rows[:, i] for i, f in enumerate(_FIELDS)}


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float) -> None:
    """img ← img + alpha * (colour - img), in place (``img`` may be a window view; alpha is consumed)."""
    alpha *= colour - img
    img += alpha


def _col(x: np.ndarray) -> np.ndarray:
    """Per-face parameters (n,) → (n, 1, 1) float32 for broadcasting over the pixel grid."""
    return np.asarray(x, dtype=np.float32).reshape(-1, 1, 1)


def _draw_params(codes: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every random number a face needs, drawn up front in a fixed order (determinism)."""
    n = len(codes)
    u = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)  # noqa: E731
    expr = _expression_table(codes)
    strength = u(0.7, 1.15)  # how pronounced the expression is
    p: dict[str, np.ndarray] = {}
    for f in _FIELDS:
        base = getattr(_NEUTRAL, f)
        p[f] = base + strength * (expr[f] - base)
    jitter_sd = {"brow_inner": 0.35, "brow_outer": 0.35, "eye_open": 0.1, "mouth_width": 0.3, "mouth_curve": 0.25,
                 "mouth_open": 0.15, "mouth_tilt": 0.15, "brow_inner_x": 0.2}
    for f in _FIELDS:
        p[f] = p[f] + rng.normal(0.0, jitter_sd[f], n).astype(np.float32)
    p["eye_open"] = np.maximum(p["eye_open"], 0.7)
    p["mouth_open"] = np.maximum(p["mouth_open"], 0.0)
    p["mouth_width"] = np.maximum(p["mouth_width"], 2.5)
    p["mouth_tilt"] *= rng.choice(np.array([-1.0, 1.0], np.float32), n)  # sneer on either side
    # pose and face shape
    p["angle"] = u(-0.21, 0.21)  # ±12 degrees
    p["scale"] = u(0.9, 1.15)
    p["dx"], p["dy"] = u(-3.0, 3.0), u(-2.5, 3.0)
    p["head_w"], p["head_h"] = u(15.0, 17.5), u(19.0, 21.5)
    p["eye_x"], p["eye_y"] = u(6.3, 7.7), u(-4.8, -3.2)
    p["mouth_y"] = u(8.3, 10.0)
    p["brow_thick"] = u(0.8, 1.3)
    p["lip_thick"] = u(0.55, 0.9)
    # tones (0..255)
    p["skin"] = u(105.0, 215.0)
    p["bg"] = u(15.0, 240.0)
    p["bg_gx"], p["bg_gy"] = u(-40.0, 40.0), u(-40.0, 40.0)
    p["hair"] = np.where(rng.random(n) < 0.8, u(15.0, 80.0), u(150.0, 220.0)).astype(np.float32)
    p["hairline"] = np.where(rng.random(n) < 0.8, u(-16.0, -11.5), -100.0).astype(np.float32)  # -100: bald
    p["light_gx"], p["light_gy"] = u(-0.3, 0.3), u(-0.2, 0.2)
    p["contrast"] = u(0.75, 1.1)
    p["noise"] = u(1.5, 7.0)
    return p


_GRID = np.stack([*np.meshgrid(np.arange(IMAGE_SIZE, dtype=np.float32), np.arange(IMAGE_SIZE, dtype=np.float32)),
                  np.ones((IMAGE_SIZE, IMAGE_SIZE), np.float32)])  # (3, H, W): x, y, 1 per pixel


class _Frame:
    """Per-face pose: maps image pixels (x, y) to face-local coordinates (u right, v down, pixels at scale 1).

    Every shape is drawn from affine functions of (u, v), and an affine function of
    (u, v) is one of (x, y, 1), so ``lin`` evaluates it for a whole chunk with a single
    (n, 3) @ (3, pixels) product — cheaper than building u and v and combining them.
    Features are drawn only in the image window that can hold them for every face of
    the chunk (``window``).
    """

    def __init__(self, p: dict[str, np.ndarray]):
        cos, sin, inv_s = np.cos(p["angle"]), np.sin(p["angle"]), 1.0 / p["scale"]
        c = (IMAGE_SIZE - 1) / 2
        x0, y0 = c + p["dx"], c + p["dy"]  # face centre in the image
        # u = (cos (x - x0) + sin (y - y0)) / s ;  v = (cos (y - y0) - sin (x - x0)) / s
        self.m_u = np.stack([cos * inv_s, sin * inv_s, -(cos * x0 + sin * y0) * inv_s], 1).astype(np.float32)
        self.m_v = np.stack([-sin * inv_s, cos * inv_s, (sin * x0 - cos * y0) * inv_s], 1).astype(np.float32)
        self.cos, self.sin, self.s, self.x0, self.y0 = cos, sin, p["scale"], x0, y0
        self.full()

    def full(self) -> None:
        """Select the whole image."""
        self.rows, self.cols = slice(None), slice(None)
        self._basis = _GRID.reshape(3, -1)
        self._shape = (IMAGE_SIZE, IMAGE_SIZE)

    def window(self, u0, u1, v0, v1) -> tuple[slice, slice]:
        """Select (and return) the image rows/columns that cover local box [u0, u1] x [v0, v1] for every face."""
        xs, ys = [], []
        for u, v in ((u0, v0), (u0, v1), (u1, v0), (u1, v1)):
            xs.append(self.x0 + self.s * (self.cos * u - self.sin * v))
            ys.append(self.y0 + self.s * (self.sin * u + self.cos * v))
        clamp = lambda t: int(min(max(t, 0), IMAGE_SIZE))  # noqa: E731
        self.rows = slice(clamp(np.floor(np.min(ys)) - 1), clamp(np.ceil(np.max(ys)) + 2))
        self.cols = slice(clamp(np.floor(np.min(xs)) - 1), clamp(np.ceil(np.max(xs)) + 2))
        window = _GRID[:, self.rows, self.cols]
        self._shape = window.shape[1:]
        self._basis = window.reshape(3, -1)
        return self.rows, self.cols

    def lin(self, a=0.0, b=0.0, c=0.0) -> np.ndarray:
        """a*u + b*v + c (each a scalar or per face) over the current window → (n, rows, cols) float32."""
        col = lambda t: np.asarray(t, np.float32).reshape(-1, 1)  # noqa: E731
        coef = col(a) * self.m_u + col(b) * self.m_v
        coef[:, 2] += c
        return (coef @ self._basis).reshape(-1, *self._shape)


def _ellipse(r2: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """In place: squared normalised radius → 0.5 - signed distance (distance ~ (r^2 - 1) * radius / 2)."""
    k = 0.5 * radius
    r2 *= -k
    r2 += k + 0.5
    return r2


def _cover(e: np.ndarray) -> np.ndarray:
    """In place: 0.5 - signed distance → coverage in [0, 1]: a one-pixel soft (anti-aliased) edge."""
    return np.clip(e, 0.0, 1.0, out=e)


def _render_chunk(p: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Draw a chunk of faces. Shapes are coverages ``clip(0.5 - signed distance)`` (one-pixel soft edges)."""
    f = _Frame(p)
    c = {k: _col(val) for k, val in p.items()}
    skin = c["skin"]

    # background: a grey level with a linear gradient across the image (image, not face, coordinates)
    bg = np.stack([p["bg_gx"] / IMAGE_SIZE, p["bg_gy"] / IMAGE_SIZE, p["bg"] - 0.5 * (p["bg_gx"] + p["bg_gy"])], 1)
    img = bg.astype(np.float32) @ _GRID.reshape(3, -1)
    img = img.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)

    # neck below the head
    f.window(-9.0, 9.0, 12.5, 40.0)
    neck = np.abs(f.lin(a=1.0))
    np.subtract(8.0, neck, out=neck)
    np.minimum(neck, f.lin(b=1.0, c=-13.5), out=neck)
    _paint(img[:, f.rows, f.cols], _cover(neck), 0.8 * skin)

    # head: an ellipse slightly below the face centre; hair: a larger one above a hairline
    f.full()
    hw, hh = p["head_w"], p["head_h"]
    hu = f.lin(a=1.0 / hw)
    hu *= hu
    head = f.lin(b=1.0 / hh, c=-1.0 / hh)
    head *= head
    head += hu
    hair_w = hw + 2.5
    hair = f.lin(b=1.0 / (hh + 2.5), c=1.5 / (hh + 2.5))
    hair *= hair
    hu *= _col((hw / hair_w) ** 2)
    hair += hu
    hairline = f.lin(b=-1.0, c=0.5 + p["hairline"])  # 0.5 - (v - hairline - 0.045 u^2)
    hu *= _col(0.045 * hair_w ** 2)
    hairline += hu
    _paint(img, _cover(_ellipse(head, c["head_w"])), skin)
    hair = np.minimum(_ellipse(hair, _col(hair_w)), hairline, out=hair)
    _paint(img, _cover(hair), c["hair"])

    # eyes and brows, drawn once in |u| (mirror symmetry)
    top = np.minimum(p["brow_inner"], p["brow_outer"]) - p["brow_thick"] - 1.5
    reach = np.maximum(p["eye_x"] + 3.3, 10.8 + p["brow_thick"]) + 1.5
    f.window(-reach, reach, top, p["eye_y"] + p["eye_open"] + 1.5)
    win = img[:, f.rows, f.cols]
    ex = np.abs(f.lin(a=1.0))
    ex -= c["eye_x"]
    ey = f.lin(b=1.0, c=-p["eye_y"])
    ex2, ey2 = ex * ex, ey * ey
    # iris: a dark disc of radius 1.6 clipped to the eye opening
    iris = ex2 + ey2
    iris *= -1 / 3.2
    iris += 0.5 + 1.6 / 2
    # sclera: a light almond; a darker rim around it reads as lids
    ex2 *= np.float32(1 / 3.3 ** 2)
    ey2 *= 1.0 / c["eye_open"] ** 2
    ex2 += ey2
    sclera = _ellipse(ex2, np.minimum(c["eye_open"], 3.3))
    rim = _cover(sclera + 0.6)
    rim *= 0.6
    sclera = _cover(sclera)
    np.minimum(_cover(iris), sclera, out=iris)
    _paint(win, rim, 0.45 * skin)
    _paint(win, sclera, np.minimum(skin + 45.0, 250.0))
    _paint(win, iris, 0.18 * skin)
    # brows: a thick segment from the inner to the outer end
    bx0 = c["brow_inner_x"]
    bdx, bdy = 10.8 - bx0, c["brow_outer"] - c["brow_inner"]
    ex += c["eye_x"] - bx0  # |u| - inner x
    ay = f.lin(b=1.0, c=-p["brow_inner"])
    inv_len2 = 1.0 / (bdx * bdx + bdy * bdy)
    t = ex * (bdx * inv_len2)
    t += ay * (bdy * inv_len2)
    np.clip(t, 0.0, 1.0, out=t)
    ex -= t * bdx
    ay -= t * bdy
    ex *= ex
    ay *= ay
    ex += ay
    brow = np.sqrt(ex, out=ex)
    np.subtract(c["brow_thick"] + 0.5, brow, out=brow)
    _paint(win, _cover(brow), np.minimum(c["hair"], 0.35 * skin) * 0.5 + 0.2 * skin)

    # nose shadow
    f.window(-4.5, 4.5, 0.5, 6.0)
    nose = f.lin(a=1 / 2.4)
    nose *= nose
    nv = f.lin(b=1 / 1.3, c=-3.2 / 1.3)
    nose += nv * nv
    nose = _cover(_ellipse(nose, np.float32(1.6)))
    nose *= 0.5
    _paint(img[:, f.rows, f.cols], nose, 0.6 * skin)

    # mouth: a curved band (corner lift = curve, one-sided tilt) opened into a lens
    w = c["mouth_width"]
    extent = np.abs(p["mouth_curve"]) * 1.5 + np.abs(p["mouth_tilt"]) * 0.6 + p["mouth_open"] + p["lip_thick"] + 2.7
    f.window(-(p["mouth_width"] + 2.5), p["mouth_width"] + 2.5, p["mouth_y"] - extent, p["mouth_y"] + extent)
    win = img[:, f.rows, f.cols]
    un = f.lin(a=1.0 / p["mouth_width"])
    un2 = un * un
    dv = f.lin(b=1.0, c=-p["mouth_y"])  # v - centre line, centre = y - curve un^2 + tilt un / 2
    dv += c["mouth_curve"] * un2
    dv -= (0.5 * c["mouth_tilt"]) * un
    np.abs(dv, out=dv)
    np.subtract(1.0, un2, out=un2)
    half = np.sqrt(np.clip(un2, 0.0, 1.0, out=un2), out=un2)
    half *= c["mouth_open"]
    dv -= half  # vertical distance outside the opening
    du = np.abs(un, out=un)
    du -= 1.0
    du *= w  # horizontal distance beyond the corners
    lips = np.subtract(c["lip_thick"] + 1.2, dv)
    np.minimum(lips, np.subtract(1.0, du), out=lips)
    _cover(lips)
    lips *= 0.7
    _paint(win, lips, 0.62 * skin)
    np.subtract(0.5 + 0.6 * c["lip_thick"], dv, out=dv)
    np.subtract(0.5, du, out=du)
    inner = np.minimum(dv, du, out=dv)
    _paint(win, _cover(inner), 0.22 * skin)

    # lighting gradient and contrast (one per-pixel gain), sensor noise, rounding (+0.5, then truncate)
    mean = img.mean(axis=(1, 2), keepdims=True)
    k = p["contrast"]
    gain = (np.stack([p["light_gx"] / 24, p["light_gy"] / 24, 1.0 - p["light_gx"] - p["light_gy"]], 1)
            * k[:, None]).astype(np.float32) @ _GRID.reshape(3, -1)
    img *= gain.reshape(img.shape)
    bytes_ = np.frombuffer(rng.bytes(2 * img.size), dtype=np.uint8).reshape(2, *img.shape)
    noise = np.add(bytes_[0], bytes_[1], dtype=np.float32)  # triangular on [0, 510]: mean 255, sd 104.2
    sd = c["noise"] / np.float32(104.2)
    noise *= sd
    noise += mean * (1.0 - c["contrast"]) + 0.5 - 255.0 * sd
    img += noise
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def render_faces(fer_codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one face per FER code (0..6) → uint8 (n, 48, 48); the same rng state gives the same faces."""
    codes = np.asarray(fer_codes, dtype=np.int64).reshape(-1)
    params = _draw_params(codes, rng)
    out = np.empty((len(codes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, len(codes), _CHUNK):
        part = {k: v[start:start + _CHUNK] for k, v in params.items()}
        out[start:start + _CHUNK] = _render_chunk(part, rng)
    return out


#: Position within each class (mod 10) → split: 8 Training, 1 PublicTest, 1 PrivateTest.
#: The test splits come early in the cycle so that every split holds every class as
#: soon as a class has three faces.
_SPLIT_CYCLE = ("Training", "PublicTest", "PrivateTest") + ("Training",) * 7


def synthetic_records(n: int, seed: int = 0, labels: EmotionLabels | None = None) -> list[FaceRecord]:
    """``n`` synthetic faces, classes balanced (round robin, then shuffled), split ~80/10/10.

    Deterministic for ``seed``; ``source`` is ``synthetic:seed<seed>:i<index>``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    labels = labels or EmotionLabels.six()
    rng = np.random.default_rng(seed)
    codes = np.array(labels.fer_codes, dtype=np.int64)[np.arange(n) % labels.num_classes]
    rng.shuffle(codes)
    pixels = render_faces(codes, rng)
    seen: dict[int, int] = {}
    records = []
    for i, code in enumerate(codes.tolist()):
        k = seen.get(code, 0)
        seen[code] = k + 1
        records.append(FaceRecord(pixels=pixels[i].copy(), fer_code=code, split=_SPLIT_CYCLE[k % len(_SPLIT_CYCLE)],
                                  source=f"synthetic:seed{seed}:i{i}"))
    return records
