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
#: small enough for the working arrays to stay in cache. Fixed, so output never
#: depends on how many faces are asked for at once beyond the seed.
_CHUNK = 256


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


def _soft(d: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) → coverage in [0, 1] with a one-pixel ramp (anti-aliasing)."""
    return np.clip(0.5 - d, 0.0, 1.0, out=d)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float) -> None:
    """img ← img + alpha * (colour - img), in place (``img`` may be a window view; alpha is consumed)."""
    alpha *= colour - img
    img += alpha


def _noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance noise from the sum of two uniform bytes (triangular; 10x cheaper than normal)."""
    size = int(np.prod(shape))
    b = np.frombuffer(rng.bytes(2 * size), dtype=np.uint8)
    out = b[:size].astype(np.float32)
    out += b[size:]
    out -= 255.0
    out *= np.float32(1.0 / 104.2)
    return out.reshape(shape)


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
    jitter = {"brow_inner": 0.7, "brow_outer": 0.7, "eye_open": 0.2, "mouth_width": 0.6, "mouth_curve": 0.5,
              "mouth_open": 0.3, "mouth_tilt": 0.3, "brow_inner_x": 0.4}
    for f in _FIELDS:
        p[f] = p[f] + rng.normal(0.0, jitter[f], n).astype(np.float32) * 0.5
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


class _Frame:
    """Face-local coordinates (u right, v down, pixels at scale 1) of a chunk of faces.

    u and v are sums of a per-column and a per-row term, so the grid of any image
    window costs one addition each; features are drawn only inside the window that
    can hold them (the union over the chunk's poses), which keeps rendering cheap.
    """

    def __init__(self, p: dict[str, np.ndarray]):
        g = np.arange(IMAGE_SIZE, dtype=np.float32) - np.float32((IMAGE_SIZE - 1) / 2)
        self.cos, self.sin, self.s = np.cos(p["angle"]), np.sin(p["angle"]), p["scale"]
        self.dx, self.dy = p["dx"], p["dy"]
        x0 = g[None, :] - self.dx[:, None]  # (n, W)
        y0 = g[None, :] - self.dy[:, None]  # (n, H)
        cs, ss = _col(self.cos / self.s)[:, :, 0], _col(self.sin / self.s)[:, :, 0]
        self._ux, self._uy = (cs * x0)[:, None, :], (ss * y0)[:, :, None]
        self._vx, self._vy = (-ss * x0)[:, None, :], (cs * y0)[:, :, None]

    def window(self, u0, u1, v0, v1) -> tuple[slice, slice]:
        """Image rows/columns covering local box [u0, u1] x [v0, v1] (scalars or per face) for every face."""
        u0, u1, v0, v1 = (np.broadcast_to(np.asarray(t, np.float32), self.s.shape) for t in (u0, u1, v0, v1))
        xs, ys = [], []
        for u, v in ((u0, v0), (u0, v1), (u1, v0), (u1, v1)):
            xs.append(self.dx + self.s * (self.cos * u - self.sin * v))
            ys.append(self.dy + self.s * (self.sin * u + self.cos * v))
        c = (IMAGE_SIZE - 1) / 2
        x_lo, x_hi = np.min(xs) + c - 1.0, np.max(xs) + c + 1.0
        y_lo, y_hi = np.min(ys) + c - 1.0, np.max(ys) + c + 1.0
        clamp = lambda t: int(min(max(t, 0), IMAGE_SIZE))  # noqa: E731
        return slice(clamp(np.floor(y_lo)), clamp(np.ceil(y_hi) + 1)), slice(clamp(np.floor(x_lo)), clamp(np.ceil(x_hi) + 1))

    def uv(self, rows: slice = slice(None), cols: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        return self._ux[:, :, cols] + self._uy[:, rows, :], self._vx[:, :, cols] + self._vy[:, rows, :]


def _render_chunk(p: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    n = len(p["angle"])
    f = _Frame(p)
    c = {k: _col(val) for k, val in p.items()}
    skin = c["skin"]
    g = np.arange(IMAGE_SIZE, dtype=np.float32) / IMAGE_SIZE - np.float32(0.5)
    gx, gy = g.reshape(1, 1, -1), g.reshape(1, -1, 1)

    # background with a linear gradient
    img = (c["bg"] + c["bg_gx"] * gx) + c["bg_gy"] * gy

    u, v = f.uv()
    # neck below the head
    rows, cols = f.window(-9.0, 9.0, 12.5, 40.0)
    uw, vw = f.uv(rows, cols)
    neck = np.maximum(np.abs(uw) - 7.5, 14.0 - vw)
    _paint(img[:, rows, cols], _soft(neck), 0.8 * skin)
    # head: an ellipse slightly below the face centre (distance ~ (r^2 - 1) * radius / 2)
    uu = u * u
    head = uu * (1.0 / c["head_w"] ** 2)
    head += ((v - 1.0) / c["head_h"]) ** 2
    head -= 1.0
    head *= 0.5 * c["head_w"]
    _paint(img, _soft(head), skin)
    # hair: a larger ellipse above a hairline that curves down the sides
    hair_w, hair_h = c["head_w"] + 2.5, c["head_h"] + 2.5
    hair = uu * (1.0 / hair_w ** 2)
    hair += ((v + 1.5) / hair_h) ** 2
    hair -= 1.0
    hair *= 0.5 * hair_w
    uu *= 0.045
    uu += c["hairline"]
    np.maximum(hair, np.subtract(v, uu, out=uu), out=hair)
    _paint(img, _soft(hair), c["hair"])

    # eyes and brows, drawn once in |u| (mirror symmetry)
    top = np.minimum(c["brow_inner"], c["brow_outer"]) - c["brow_thick"] - 1.5
    bottom = c["eye_y"] + c["eye_open"] + 1.5
    reach = np.maximum(c["eye_x"] + 3.3, 10.8 + c["brow_thick"]) + 1.5
    rows, cols = f.window(-reach[:, 0, 0], reach[:, 0, 0], top[:, 0, 0], bottom[:, 0, 0])
    win = img[:, rows, cols]
    uw, vw = f.uv(rows, cols)
    au = np.abs(uw)
    ex, ey = au - c["eye_x"], vw - c["eye_y"]
    # light sclera in an almond, dark iris clipped to it, darker upper lid line
    sclera = (ex * np.float32(1 / 3.3)) ** 2 + (ey / c["eye_open"]) ** 2
    sclera -= 1.0
    sclera *= 0.5 * np.minimum(c["eye_open"], 3.3)
    lid = np.maximum(np.abs(sclera + 0.3) - 0.35, ey)
    sclera = _soft(sclera)
    iris = ex * ex
    iris += ey * ey
    iris -= 1.6 ** 2
    iris *= 1 / 3.2
    iris = np.minimum(_soft(iris), sclera, out=iris)
    _paint(win, sclera, np.minimum(skin + 45.0, 250.0))
    _paint(win, iris, 0.18 * skin)
    _paint(win, 0.6 * _soft(lid), 0.45 * skin)
    # brows: a thick segment from the inner to the outer end
    bx0, by0 = c["brow_inner_x"], c["brow_inner"]
    bdx, bdy = 10.8 - bx0, c["brow_outer"] - by0
    ax, ay = au - bx0, vw - by0
    t = ax * (bdx / (bdx * bdx + bdy * bdy))
    t += ay * (bdy / (bdx * bdx + bdy * bdy))
    np.clip(t, 0.0, 1.0, out=t)
    ax -= t * bdx
    ay -= t * bdy
    ax *= ax
    ay *= ay
    ax += ay
    brow = np.sqrt(ax, out=ax)
    brow -= c["brow_thick"]
    _paint(win, _soft(brow), np.minimum(c["hair"], 0.35 * skin) * 0.5 + 0.2 * skin)

    # nose shadow
    rows, cols = f.window(-4.5, 4.5, 0.5, 6.0)
    uw, vw = f.uv(rows, cols)
    nose = (uw * np.float32(1 / 2.4)) ** 2 + ((vw - 3.2) * np.float32(1 / 1.3)) ** 2
    nose -= 1.0
    nose *= 0.8
    _paint(img[:, rows, cols], 0.5 * _soft(nose), 0.6 * skin)

    # mouth: a curved band (corner lift = curve, one-sided tilt) opened into a lens
    w = c["mouth_width"]
    extent = (np.abs(c["mouth_curve"]) * 1.5 + np.abs(c["mouth_tilt"]) * 0.6 + c["mouth_open"]
              + c["lip_thick"] + 2.7)[:, 0, 0]
    my = p["mouth_y"]
    rows, cols = f.window(-(p["mouth_width"] + 2.5), p["mouth_width"] + 2.5, my - extent, my + extent)
    win = img[:, rows, cols]
    uw, vw = f.uv(rows, cols)
    un = uw / w
    un2 = un * un
    centre = c["mouth_y"] - c["mouth_curve"] * un2
    centre += (0.5 * c["mouth_tilt"]) * un
    half = np.sqrt(np.clip(1.0 - un2, 0.0, 1.0, out=un2), out=un2)
    half *= c["mouth_open"]
    dv = np.abs(np.subtract(vw, centre, out=centre), out=centre)
    dv -= half
    du = np.abs(uw, out=uw)
    du -= w
    lips = np.maximum(dv - (c["lip_thick"] + 0.7), du - 0.5)
    _paint(win, 0.7 * _soft(lips), 0.62 * skin)
    dv -= 0.6 * c["lip_thick"]
    _paint(win, _soft(np.maximum(dv, du, out=dv)), 0.22 * skin)

    # lighting gradient, contrast, sensor noise
    img *= (1.0 + c["light_gx"] * (2 * gx)) + c["light_gy"] * (2 * gy)
    mean = img.mean(axis=(1, 2), keepdims=True)
    img *= c["contrast"]
    img += mean * (1.0 - c["contrast"])
    noise = _noise(img.shape, rng)
    noise *= c["noise"]
    img += noise
    return np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8)


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
