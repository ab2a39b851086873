"""The normal abdomen: every organ's shape, position and HU per contrast phase, drawn onto a canvas."""

from __future__ import annotations

import numpy as np

from noisy_student_nnunet.flare import FLARE22_ORGANS
from noisy_student_nnunet.phantoms.geometry import Canvas, Chunk, Noise, Tube, ellipsoid, ellipsoid_box, rotation

ORGAN_LABELS: dict[str, int] = {organ.name: organ.label for organ in FLARE22_ORGANS}
_L = ORGAN_LABELS

Z_WINDOW = (0.0, 245.0)  # reference z-range that holds every organ (kidney lower pole .. oesophagus)

# Mean HU per tissue for the (native, arterial, portal venous) phase. Several organs overlap on
# purpose (liver/spleen, pancreas/bowel wall, kidney/aorta, gallbladder/bowel fluid): a network has to
# use shape and position.
HU: dict[str, tuple[float, float, float]] = {
    "liver": (58, 75, 110), "spleen": (50, 95, 115), "kidney_cortex": (35, 185, 170),
    "kidney_medulla": (32, 85, 150), "pancreas": (42, 105, 95), "artery": (42, 290, 165),
    "vein": (40, 75, 145), "portal": (40, 95, 175), "adrenal": (35, 60, 75), "gut_wall": (40, 80, 90),
    "muscle": (50, 55, 60), "heart": (42, 210, 140),
}



def enhanced(tissue: str, phase: int, strength: float) -> float:
    native = HU[tissue][0]
    return native + strength * (HU[tissue][phase] - native)



class Anatomy:
    """Draws one abdomen onto a canvas. Every random choice comes from ``rng`` in a fixed order."""

    def __init__(self, canvas: Canvas, rng: np.random.Generator, habitus: dict, drop: frozenset[str],
                 phase: int | None = None, organ_scale: dict[str, float] | None = None):
        """``phase`` (0 native, 1 arterial, 2 portal) replaces the drawn one; ``organ_scale`` enlarges or shrinks
        organs (hepatomegaly, splenomegaly, atrophy). Either leaves every random draw as it was."""
        self.c = canvas
        self.rng = rng
        self.h = habitus
        self.drop = drop
        self.r_min = 0.8 * max(canvas.voxel[1], canvas.voxel[2])  # thin structures stay >= ~1.6 voxels wide
        self.phase = int(rng.choice(3, p=[0.2, 0.3, 0.5]))
        if phase is not None:
            self.phase = int(phase)
        self.strength = float(rng.uniform(0.75, 1.15))
        self.k = habitus["k"]  # per-case stretch of organ positions (z, y, x)
        self.organ_scale = dict(organ_scale or {})

    # helpers -------------------------------------------------------------------------------------
    def hu(self, tissue: str, jitter: float = 6.0) -> float:
        return enhanced(tissue, self.phase, self.strength) + float(self.rng.normal(0, jitter))

    def at(self, z: float, y: float, x: float, jitter: float = 0.0) -> np.ndarray:
        """A reference position stretched by the case's habitus, plus random jitter (mm)."""
        p = np.array([z, y, x]) * self.k
        return p + (self.rng.normal(0, jitter, 3) if jitter else 0.0)

    def path(self, points, jitter: float) -> np.ndarray:
        return np.array([self.at(*p, jitter=jitter) for p in points])

    def noise(self, box, cell: float) -> Noise:
        """A noise field over ``box`` clipped to the canvas (lattice cells no finer than half a voxel)."""
        c = self.c
        clipped = [(max(lo, float(v[0])), min(hi, float(v[-1]))) for (lo, hi), v in zip(box, (c.z, c.y, c.x))]
        clipped = [(lo, max(lo, hi)) for lo, hi in clipped]
        return Noise(self.rng, clipped, max(cell, 0.5 * min(c.voxel)))

    def body_r(self, ch: Chunk, grow: tuple[float, float, float]) -> np.ndarray:
        """Superellipse radius of the body cross-section grown by (lateral, anterior, posterior) mm."""
        h = self.h
        wave = 1.0 + 0.03 * np.sin(ch.Z * np.float32(2 * np.pi / 300.0) + np.float32(h["wave_phase"]))
        a = (np.float32(h["cavity_a"] + grow[0]) * wave)
        b = np.where(ch.Y < 0, np.float32(h["cavity_ant"] + grow[1]), np.float32(h["cavity_post"] + grow[2]))
        p = np.float32(h["exponent"])
        r = (np.abs(ch.X / a) ** p + np.abs(ch.Y / (b * wave)) ** p) ** (1.0 / p)
        return r + np.float32(0.012) * self.body_noise(ch.z, ch.y, ch.x)

    def cavity(self, ch: Chunk) -> np.ndarray:
        return self.cav[ch.sl]

    def diaphragm(self, ch: Chunk) -> np.ndarray:
        """Height (reference z) of the diaphragm over each (y, x): two domes, lower posteriorly."""
        h, k = self.h, self.k
        Y, X = ch.Y[0], ch.X[0]
        right = h["dome_r"] - 40.0 * (((X + 60 * k[2]) / (100 * k[2])) ** 2 + ((Y - 10) / (120 * k[1])) ** 2)
        left = h["dome_l"] - 40.0 * (((X - 60 * k[2]) / (95 * k[2])) ** 2 + ((Y - 10) / (120 * k[1])) ** 2)
        dome = np.maximum(right, left) - 20.0 * np.clip((Y - 40.0) / 60.0, 0.0, 1.0)
        return dome[None].astype(np.float32)

    def abdominal(self, ch: Chunk) -> np.ndarray:
        return self.cav[ch.sl] & self.below[ch.sl]

    def organ(self, name: str, box, shape_fn, value_fn, where=None) -> None:
        if name in self.drop:
            return
        self.c.paint(box, shape_fn, value_fn, label=_L[name], where=where or self.abdominal)

    # drawing -------------------------------------------------------------------------------------
    def draw(self) -> None:
        full = [(-1e4, 1e4)] * 3
        self.body_noise = self.noise([(self.c.z[0], self.c.z[-1]), (-200, 200), (-200, 200)], 40.0)
        self.cav = np.zeros(self.c.shape, bool)
        self.below = np.zeros(self.c.shape, bool)
        for ch in self.c.chunks(full):
            self.cav[ch.sl] = self.body_r(ch, (0.0, 0.0, 0.0)) < 1.0
            self.below[ch.sl] = ch.Z < self.diaphragm(ch)
        self.background(full)
        self.thorax(full)
        self.retroperitoneum()
        self.bowel()
        self.vessels()
        self.liver()
        self.spleen()
        self.kidneys()
        self.stomach_and_duodenum()
        self.pancreas()
        self.gallbladder()
        self.adrenals()
        self.great_vessels()
        self.spine(full)

    def background(self, full) -> None:
        h, rng = self.h, self.rng
        fat_tex = self.noise([(self.c.z[0], self.c.z[-1]), (-200, 200), (-200, 200)], 10.0)
        fat_hu, muscle_hu = float(rng.uniform(-115, -85)), self.hu("muscle")
        m = h["muscle"]
        body = (h["fat_lat"] + m, h["fat_ant"] + m, h["fat_post"] + m)

        def values(ch, f, base, amp):
            return base + amp * fat_tex(ch.z, ch.y, ch.x)

        self.c.paint(full, lambda ch: self.body_r(ch, body) < 1.0, lambda ch, f: values(ch, f, fat_hu, 8.0))
        self.c.paint(full, lambda ch: self.body_r(ch, (m, m, m)) < 1.0, lambda ch, f: values(ch, f, muscle_hu, 6.0))
        self.c.paint(full, self.cavity, lambda ch, f: values(ch, f, fat_hu + 10.0, 10.0))
        # Lower ribs: bone in the muscle wall at periodic heights, not in front.
        rib_hu, rib_phase = float(rng.uniform(300, 550)), float(rng.uniform(0, 26))

        def ribs(ch):
            wall = ~self.cav[ch.sl] & (self.body_r(ch, (m, m, m)) < 1.0)
            angle = np.arctan2(ch.Y, ch.X)  # +pi/2 is posterior, -pi/2 anterior
            height = (ch.Z + np.float32(rib_phase) + 70.0 * (1.0 - np.sin(angle))) % 26.0
            front = np.abs(angle + np.pi / 2) < 0.7
            return wall & (height < 8.0) & ~front & (ch.Z > 110.0)

        self.c.paint([(110.0, 1e4), (-1e4, 1e4), (-1e4, 1e4)], ribs, rib_hu)

    def thorax(self, full) -> None:
        """Lung bases and heart above the diaphragm, so the top slices look like the thoracoabdominal junction."""
        lung_hu, heart_hu = float(self.rng.uniform(-880, -800)), self.hu("heart", 10.0)
        lung_tex = self.noise([(150, 400), (-200, 200), (-200, 200)], 8.0)
        above = lambda ch: self.cav[ch.sl] & ~self.below[ch.sl]  # noqa: E731
        box = [(150.0, 1e4), (-1e4, 1e4), (-1e4, 1e4)]
        self.c.paint(box, above, lambda ch, f: lung_hu + 25.0 * lung_tex(ch.z, ch.y, ch.x))
        heart_c, heart_s = self.at(300, -30, 20, 6), np.array([75.0, 65.0, 80.0]) * self.k
        self.c.paint(ellipsoid_box(heart_c, heart_s), lambda ch: ellipsoid(ch, heart_c, heart_s), heart_hu,
                     where=above)

    def retroperitoneum(self) -> None:
        """Psoas muscles: unlabeled soft tissue beside the spine that grows towards the pelvis."""
        hu = self.hu("muscle")
        for side in (-1, 1):
            pts = self.path([(150, 60, side * 26), (90, 62, side * 40), (0, 58, side * 52), (-60, 50, side * 62)], 3)
            tube = Tube(pts, [3.0, 10.0, 16.0, 19.0], self.r_min)
            self.c.paint(tube.box, tube.field, hu, where=self.cavity)

    def bowel(self) -> None:
        """Colon and small-bowel loops: unlabeled distractors with gut-wall HU, fluid and gas."""
        rng, k = self.rng, self.k
        wall_hu = self.hu("gut_wall")
        colon = self.path([(15, 0, -100), (70, 5, -108), (112, -10, -100), (105, -65, -50), (98, -75, 0),
                           (108, -68, 50), (148, -20, 95), (120, 15, 112), (60, 25, 115), (10, 20, 105)], 6)
        radii = np.array([22, 20, 19, 17, 17, 17, 17, 16, 15, 15]) * rng.uniform(0.85, 1.15)
        tube = Tube(colon, radii, self.r_min)
        tex = self.noise(tube.box, 6.0)
        wall = float(rng.uniform(2.5, 4.0))

        def colon_hu(ch, f):
            t = tex(ch.z, ch.y, ch.x)
            content = np.where(t > 0.2, np.float32(-950.0), np.float32(-120.0) + 60.0 * t)
            return np.where(f > -wall, np.float32(wall_hu), content)

        self.c.paint(tube.box, tube.field, colon_hu, where=self.cavity)
        for _ in range(int(rng.integers(4, 8))):
            start = np.array([rng.uniform(5, 95), rng.uniform(-80, 0), rng.uniform(-70, 70)])
            pts = [start]
            direction = rng.normal(0, 1, 3)
            for _ in range(4):
                direction = direction / np.linalg.norm(direction) + rng.normal(0, 0.7, 3)
                nxt = pts[-1] + 28.0 * direction / np.linalg.norm(direction)
                pts.append(np.clip(nxt, [0, -85, -80], [100, 10, 80]))
            loop = Tube(np.array(pts) * k, rng.uniform(8, 12, len(pts)), self.r_min)
            kind = rng.choice(3, p=[0.5, 0.2, 0.3])  # fluid-filled, gas, collapsed
            content = [float(rng.uniform(0, 30)), -900.0, wall_hu][kind]
            wall_mm = float(rng.uniform(2.0, 3.0))
            self.c.paint(loop.box, loop.field,
                         lambda ch, f, c=content: np.where(f > -wall_mm, np.float32(wall_hu), np.float32(c)),
                         where=self.cavity)

    def vessels(self) -> None:
        """Unlabeled vessels (portal system, renal, iliac): same HU as the labeled aorta and IVC."""
        artery, vein, portal = self.hu("artery", 8), self.hu("vein", 8), self.hu("portal", 8)
        specs = [
            (portal, [(108, 12, -5), (135, 10, -25), (150, 5, -45)], [7, 7, 6]),  # portal vein
            (portal, [(108, 12, -5), (118, 25, 30), (135, 40, 70), (150, 45, 90)], [4.5, 4.5, 4, 4]),  # splenic
            (portal, [(108, 12, -5), (70, 5, -8), (20, 0, -12)], [5, 5, 4.5]),  # SMV
            (artery, [(112, 25, 12), (95, 12, 10), (40, 5, 5)], [3.5, 3.5, 3]),  # SMA
            (vein, [(100, 45, 45), (100, 12, 25), (98, 20, -15)], [5, 5, 5]),  # left renal vein
            (vein, [(88, 45, -45), (92, 30, -25)], [5, 5]),  # right renal vein
            (artery, [(105, 35, 12), (100, 50, 45)], [3, 3]),  # left renal artery
            (artery, [(103, 38, 12), (95, 45, -20), (88, 48, -45)], [3, 3, 3]),  # right renal artery
            (artery, [(15, 32, 10), (-25, 30, -25)], [7, 6]),  # iliac arteries
            (artery, [(15, 32, 10), (-25, 30, 40)], [7, 6]),
            (vein, [(10, 30, -20), (-25, 38, -35)], [8, 7]),  # iliac veins
            (vein, [(10, 30, -20), (-25, 40, 25)], [8, 7]),
        ]
        for hu, pts, radii in specs:
            tube = Tube(self.path(pts, 3), radii, self.r_min)
            self.c.paint(tube.box, tube.field, hu, where=self.cavity)

    def liver(self) -> None:
        rng, k = self.rng, self.k
        c = self.at(170, -5, -55, 6)
        semi = np.array([70, 80, 90]) * k * rng.uniform(0.9, 1.1, 3) * self.organ_scale.get("liver", 1.0)
        box = [(c[0] - semi[0] - 10, c[0] + semi[0] + 30), (c[1] - semi[1] - 40, c[1] + semi[1] + 10),
               (c[2] - semi[2] - 10, c[2] + semi[2] + 10)]
        shape_noise, tex = self.noise(box, 25.0), self.noise(box, 5.0)
        amp, left_reach = float(rng.uniform(6, 12)), float(rng.uniform(90, 130)) * self.organ_scale.get("liver", 1.0)

        def shape(ch):
            t = np.clip((ch.X - np.float32(c[2] + 10)) / np.float32(left_reach), 0, 1)  # 0 right lobe, 1 left tip
            sy, sz = semi[1] * (1 - 0.55 * t), semi[0] * (1 - 0.5 * t)
            qz, qy, qx = (ch.Z - c[0] - 10 * t) / sz, (ch.Y - c[1] + 25 * t) / sy, (ch.X - c[2]) / semi[2]
            r = np.sqrt(qz * qz + qy * qy + qx * qx)
            return (r - 1.0) * 60.0 + amp * shape_noise(ch.z, ch.y, ch.x)

        hu = self.hu("liver")
        self.organ("liver", box, shape, lambda ch, f: hu + 6.0 * tex(ch.z, ch.y, ch.x))
        if "liver" in self.drop:
            return
        # Hepatic and portal branches inside the liver: labeled liver, vessel HU.
        inside = lambda ch: ch.label == _L["liver"]  # noqa: E731
        hv, pv = self.hu("vein", 8), self.hu("portal", 8)
        branches = [(hv, [(230, 15, -15), (205, 0, -110)]), (hv, [(230, 15, -15), (212, -45, -60)]),
                    (hv, [(230, 15, -15), (215, -40, 10)]), (pv, [(150, 5, -45), (160, 10, -105)]),
                    (pv, [(150, 5, -45), (172, -40, -25)])]
        for hu_v, pts in branches:
            tube = Tube(self.path(pts, 5), [6.0, 2.5], self.r_min)
            self.c.paint(tube.box, tube.field, hu_v, where=inside)

    def spleen(self) -> None:
        rng = self.rng
        c = self.at(170, 48, 100, 6)
        angle = float(rng.normal(np.pi / 4, 0.15))
        rot = rotation(axial=angle, sagittal=float(rng.normal(0, 0.15)))
        # (z, thickness, length)
        semi = np.array([48, 22, 55]) * rng.uniform(0.85, 1.15, 3) * self.organ_scale.get("spleen", 1.0)
        normal = rot[:, 1]  # outward (towards posterolateral wall)
        inner_c = c - (semi[1] + 6) * normal
        inner_s = semi * np.array([1.0, 1.1, 0.95])
        box = ellipsoid_box(c, semi, 10)
        shape_noise, tex = self.noise(box, 18.0), self.noise(box, 7.0)

        def shape(ch):
            f = np.maximum(ellipsoid(ch, c, semi, rot), -ellipsoid(ch, inner_c, inner_s, rot))
            return f + 4.0 * shape_noise(ch.z, ch.y, ch.x)

        hu, amp = self.hu("spleen"), 25.0 if self.phase == 1 else 5.0
        self.organ("spleen", box, shape, lambda ch, f: hu + amp * tex(ch.z, ch.y, ch.x))

    def kidneys(self) -> None:
        rng = self.rng
        cortex, medulla = self.hu("kidney_cortex"), self.hu("kidney_medulla")
        for name, side, z in (("right_kidney", -1, 85.0), ("left_kidney", 1, 100.0)):
            c = self.at(z, 55, side * 65, 5)
            semi = np.array([55, 25, 27]) * rng.uniform(0.88, 1.12, 3) * self.organ_scale.get(name, 1.0)
            rot = rotation(axial=float(rng.normal(side * 0.35, 0.1)), coronal=float(rng.normal(-side * 0.22, 0.06)))
            hilum = c + rot @ np.array([0.0, -8.0, -side * (semi[2] + 2)])
            hilum_r = float(rng.uniform(11, 15))
            pelvis = c + rot @ np.array([0.0, -4.0, -side * 10.0])
            box = ellipsoid_box(c, semi, 6)
            shape_noise = self.noise(box, 15.0)
            thickness = float(rng.uniform(6, 9))

            def shape(ch, c=c, semi=semi, rot=rot, hilum=hilum, hilum_r=hilum_r, shape_noise=shape_noise):
                f = np.maximum(ellipsoid(ch, c, semi, rot), -ellipsoid(ch, hilum, (hilum_r,) * 3))
                return f + 2.5 * shape_noise(ch.z, ch.y, ch.x)

            def values(ch, f, pelvis=pelvis, thickness=thickness):
                v = np.where(f > -thickness, np.float32(cortex), np.float32(medulla))
                return np.where(ellipsoid(ch, pelvis, (14.0, 7.0, 7.0)) < 0, np.float32(10.0), v)

            self.organ(name, box, shape, values)

    def stomach_and_duodenum(self) -> None:
        rng = self.rng
        wall_hu = self.hu("gut_wall")
        content_kind = int(rng.choice(4, p=[0.45, 0.3, 0.1, 0.15]))  # fluid, food, empty, oral contrast
        content_hu = [float(rng.uniform(0, 25)), float(rng.uniform(30, 60)), wall_hu,
                      float(rng.uniform(180, 320))][content_kind]
        collapsed = 0.6 if content_kind == 2 else 1.0
        pts = self.path([(215, 25, 60), (190, -5, 70), (160, -35, 65), (130, -55, 45), (118, -55, 15),
                         (120, -40, -10), (122, -28, -22)], 6)
        radii = np.array([30, 33, 30, 25, 18, 12, 8]) * rng.uniform(0.85, 1.15) * collapsed
        stomach = Tube(pts, radii, self.r_min)
        tex = self.noise(stomach.box, 7.0)
        wall = float(rng.uniform(4, 7))
        gas_level = float(pts[3][1] - rng.uniform(0, 20)) if rng.random() < 0.75 else -1e4

        def stomach_hu(ch, f):
            content = np.float32(content_hu) + (12.0 if content_kind == 1 else 3.0) * tex(ch.z, ch.y, ch.x)
            content = np.where(ch.Y < gas_level, np.float32(-950.0), content)
            return np.where(f > -wall, np.float32(wall_hu), content)

        self.organ("stomach", stomach.box, stomach.field, stomach_hu)
        duo = self.path([(122, -28, -22), (125, -15, -45), (118, 0, -58), (95, 5, -62), (72, 8, -56),
                         (62, 5, -30), (60, 5, 0), (65, 5, 25), (80, 8, 35), (95, 5, 30)], 4)
        tube = Tube(duo, rng.uniform(10, 13) * np.ones(len(duo)), self.r_min)
        gas = rng.random() < 0.3
        duo_content = content_hu if content_kind == 3 else float(rng.uniform(0, 30))

        def duo_hu(ch, f):
            content = np.where((ch.Y < duo[1][1] + 3) & gas, np.float32(-900.0), np.float32(duo_content))
            return np.where(f > -3.0, np.float32(wall_hu), content)

        self.organ("duodenum", tube.box, tube.field, duo_hu)

    def pancreas(self) -> None:
        rng = self.rng
        pts = self.path([(80, 18, -25), (95, 10, -40), (105, 0, -8), (115, 10, 30), (130, 30, 70), (135, 40, 85)], 4)
        radii = np.array([10, 16, 9, 11, 10, 8]) * rng.uniform(0.85, 1.15)
        tube = Tube(pts, radii, self.r_min)
        shape_noise, tex = self.noise(tube.box, 8.0), self.noise(tube.box, 3.5)
        fatty = float(rng.uniform(0, 25))
        hu = self.hu("pancreas") - fatty
        amp = 8.0 + fatty * 0.6

        def shape(ch):
            return tube.field(ch) + 2.5 * shape_noise(ch.z, ch.y, ch.x)

        self.organ("pancreas", tube.box, shape, lambda ch, f: hu + amp * tex(ch.z, ch.y, ch.x))

    def gallbladder(self) -> None:
        rng = self.rng
        c = self.at(118, -45, -50, 5)
        semi = np.array([32, 14, 14]) * rng.uniform(0.75, 1.2, 3)
        rot = rotation(axial=float(rng.normal(0.3, 0.2)), sagittal=float(rng.normal(-0.6, 0.2)))
        box = ellipsoid_box(c, semi, 5)
        shape_noise = self.noise(box, 12.0)
        hu = float(rng.uniform(5, 30))
        self.organ("gallbladder", box, lambda ch: ellipsoid(ch, c, semi, rot) + 2.0 * shape_noise(ch.z, ch.y, ch.x),
                   lambda ch, f: np.where(f > -2.0, np.float32(hu + 15.0), np.float32(hu)))

    def adrenals(self) -> None:
        hu = self.hu("adrenal")
        shapes = (("right_adrenal_gland", [(135, 60, -32), (165, 38, -38), (140, 55, -52)]),
                  ("left_adrenal_gland", [(132, 58, 38), (160, 30, 32), (138, 48, 55)]))
        for name, pts in shapes:
            tube = Tube(self.path(pts, 3), self.rng.uniform(3.0, 4.5, 3), self.r_min, step=2.0)
            self.organ(name, tube.box, tube.field, hu)

    def great_vessels(self) -> None:
        rng, top = self.rng, float(self.c.z[-1]) + 20.0
        wall = self.hu("gut_wall")
        eso = Tube(self.path([(max(top, 300.0), 38, 2), (240, 25, 12), (215, 10, 28), (200, 2, 45)], 3),
                    rng.uniform(7, 10) * np.ones(4), self.r_min)
        air = rng.random() < 0.3
        eso_axis = eso

        def eso_hu(ch, f):
            return np.where((f < -eso_axis.rad.min() + 2.5) & air, np.float32(-900.0), np.float32(wall))

        self.organ("esophagus", eso.box, eso.field, eso_hu, where=self.cavity)
        ivc_pts = self.path([(10, 30, -20), (60, 30, -22), (120, 25, -25), (180, 15, -25), (240, 5, -15)], 3)
        ivc = Tube(ivc_pts, rng.uniform(10, 12.5) * np.ones(5), self.r_min, scale=(1.0, 1.35, 1.0))
        vein, artery = self.hu("vein", 8), self.hu("artery", 8)
        mixing = self.noise(ivc.box, 12.0)
        self.organ("inferior_vena_cava", ivc.box, ivc.field,
                   lambda ch, f: vein + (20.0 if self.phase == 1 else 4.0) * mixing(ch.z, ch.y, ch.x),
                   where=self.cavity)
        aorta_pts = self.path([(15, 32, 10), (100, 32, 12), (170, 34, 14), (230, 40, 20), (max(top, 300.0), 42, 24)], 3)
        aorta = Tube(aorta_pts, np.array([10, 11, 11.5, 12, 12.5]) * rng.uniform(0.9, 1.15), self.r_min)
        self.organ("aorta", aorta.box, aorta.field, artery, where=self.cavity)
        if "aorta" not in self.drop and rng.random() < 0.35:
            for _ in range(int(rng.integers(1, 4))):  # wall calcifications, still labeled aorta
                i = int(rng.integers(0, len(aorta.pts)))
                theta = rng.uniform(0, 2 * np.pi)
                spot = aorta.pts[i] + aorta.rad[i] * 0.85 * np.array([0.0, np.sin(theta), np.cos(theta)])
                self.c.paint(ellipsoid_box(spot, (3.0,) * 3), lambda ch, s=spot: ellipsoid(ch, s, (3.0, 2.5, 2.5)),
                             float(rng.uniform(500, 900)), where=lambda ch: ch.label == _L["aorta"])

    def spine(self, full) -> None:
        """Vertebrae and paraspinal muscles, painted last and unlabeled (they bound the organs)."""
        rng, k = self.rng, self.k
        cy, r_body = 65.0 * k[1], float(rng.uniform(18, 22))
        cortical, cancellous = float(rng.uniform(550, 800)), float(rng.uniform(180, 300))
        disc_phase, level = float(rng.uniform(0, 33)), 33.0
        muscle = self.hu("muscle")
        tex = self.noise([(self.c.z[0], self.c.z[-1]), (0, 160), (-80, 80)], 4.0)
        box = [(-1e4, 1e4), (cy - r_body - 2, 160.0), (-90.0, 90.0)]
        for side in (-1, 1):
            c, semi = (0.0, (cy + 43), side * 38.0 * k[2]), (1e4, 20.0, 26.0)
            self.c.paint(box, lambda ch, c=c, semi=semi: ellipsoid(ch, c, semi), muscle,
                         where=lambda ch: self.body_r(ch, (5, 5, 5)) < 1.0, clear_label=True)

        def vertebra(ch):
            disc = ((ch.Z + np.float32(disc_phase)) % np.float32(level)) < 7.0
            r_vb = np.sqrt(ch.X ** 2 + (ch.Y - cy) ** 2)
            canal = np.sqrt(ch.X ** 2 + (ch.Y - cy - 30) ** 2)
            arch = (canal < 16.0) & (canal >= 9.0) & (ch.Y > cy + 20)
            spinous = (np.abs(ch.X) < 4.0) & (ch.Y > cy + 40) & (ch.Y < cy + 62)
            transverse = (np.abs(np.abs(ch.X) - 24) < 9) & (np.abs(ch.Y - cy - 24) < 3)
            bone = (r_vb < r_body) | ((arch | spinous | transverse) & ~disc)
            return bone | (canal < 9.0)

        def vertebra_hu(ch, f):
            disc = ((ch.Z + np.float32(disc_phase)) % np.float32(level)) < 7.0
            r_vb = np.sqrt(ch.X ** 2 + (ch.Y - cy) ** 2)
            canal = np.sqrt(ch.X ** 2 + (ch.Y - cy - 30) ** 2)
            spongy = np.float32(cancellous) + 40.0 * tex(ch.z, ch.y, ch.x)
            v = np.where(r_vb > r_body - 2.5, np.float32(cortical), spongy)
            v = np.where((r_vb < r_body) & disc, np.float32(90.0), v)
            v = np.where((r_vb >= r_body) & ~disc, np.float32(cortical * 0.6) + 60.0 * tex(ch.z, ch.y, ch.x), v)
            return np.where(canal < 9.0, np.float32(25.0), v)

        self.c.paint(box, vertebra, vertebra_hu, clear_label=True)
