"""Synthetic demo data: a catalog with text and users with learnable sequential structure
(training/demo.py trains the demo model on it with the GREAM recipe).

Structure the model can learn: every item has two "follow-up" items (mostly staples of its own
category, as refills and accessories follow a purchase), and users follow them most of the time,
otherwise jumping to an item of one of their favourite categories. Titles carry the category's words,
so items that follow each other tend to share semantic-ID prefixes, as on real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.catalog import Item

CATEGORIES: dict[str, list[str]] = {
    "Lab > Pipettes": ["pipette", "pipette tips", "pipette stand", "bulb pipette"],
    "Lab > Glassware": ["beaker", "flask", "graduated cylinder", "test tube"],
    "Safety > Gloves": ["nitrile gloves", "latex gloves", "cut resistant gloves", "cryo gloves"],
    "Safety > Eyewear": ["safety goggles", "face shield", "safety glasses", "goggle strap"],
    "Tools > Fasteners": ["hex bolts", "wood screws", "wing nuts", "rivets"],
    "Tools > Hand Tools": ["screwdriver set", "torque wrench", "pliers", "hex key set"],
    "Electrical > Connectors": ["crimp connectors", "terminal block", "wire nuts", "jumper wires"],
    "Electrical > Test": ["multimeter", "clamp meter", "voltage tester", "test leads"],
    "Adhesives > Tape": ["duct tape", "kapton tape", "masking tape", "double sided tape"],
    "Adhesives > Glue": ["epoxy", "super glue", "hot glue sticks", "wood glue"],
    "Plumbing > Fittings": ["brass elbow", "pvc coupling", "ball valve", "hose barb"],
    "Janitorial > Cleaning": ["microfiber cloths", "degreaser", "mop heads", "spray bottles"],
    "3D Printing > Filament": ["pla filament", "petg filament", "abs filament", "tpu filament"],
    "3D Printing > Parts": ["nozzle kit", "build plate", "extruder gear", "hotend fan"],
    "Medical > Supplies": ["gauze pads", "medical tape", "exam gloves", "thermometer covers"],
    "Packaging > Shipping": ["bubble wrap", "packing tape", "poly mailers", "shipping labels"],
}
BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Tyrell", "Cyberdyne", "Soylent",
          "Hooli", "Vandelay", "Wonka"]
ADJECTIVES = ["heavy duty", "premium", "compact", "professional", "industrial", "economy", "precision",
              "reusable", "high temperature", "lightweight"]
SIZES = ["small", "medium", "large", "pack of 10", "pack of 50", "1 lb", "5 ft", "10 mm", "kit", "set"]


@dataclass(frozen=True)
class DemoConfig:
    items: int = 1000
    users: int = 3000
    min_len: int = 6
    max_len: int = 20
    follow_prob: float = 0.8
    seed: int = 0


def synthetic_catalog(n: int, rng: np.random.Generator) -> list[Item]:
    cats = list(CATEGORIES)
    items = []
    for i in range(n):
        cat = cats[i % len(cats)]
        noun = CATEGORIES[cat][int(rng.integers(len(CATEGORIES[cat])))]
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        adj = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        title = f"{brand} {adj} {noun}, {size}"
        desc = f"{adj.capitalize()} {noun} by {brand} for {cat.split(' > ')[0].lower()} work. Model D{i:05d}."
        items.append(Item(item_id=f"D{i:05d}", title=title, description=desc, brand=brand, categories=cat))
    return items


def synthetic_sequences(items: list[Item], cfg: DemoConfig, rng: np.random.Generator) -> dict[str, list[str]]:
    n = len(items)
    by_cat: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_cat.setdefault(it.categories, []).append(i)
    cats = list(by_cat)
    # Within a category a few items are staples (Zipf weights over a random order): follow-ups are
    # drawn from them, so "what comes next" is learnable from the category of the last item.
    staple_p = {c: (w := 1.0 / np.arange(1, len(m) + 1) ** 1.5)[rng.permutation(len(m))] / w.sum()
                for c, m in by_cat.items()}
    # Two follow-ups per item: usually same category, sometimes a related one (next in the list).
    follow = np.zeros((n, 2), dtype=np.int64)
    for i, it in enumerate(items):
        for j in range(2):
            c = it.categories if rng.random() < 0.8 else cats[(cats.index(it.categories) + 1) % len(cats)]
            follow[i, j] = by_cat[c][int(rng.choice(len(by_cat[c]), p=staple_p[c]))]
    popularity = rng.zipf(1.6, n).astype(float)
    start_p = popularity / popularity.sum()
    seqs = {}
    for u in range(cfg.users):
        favs = [cats[int(c)] for c in rng.choice(len(cats), 2, replace=False)]
        length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        seq = [int(rng.choice(n, p=start_p))]
        while len(seq) < length:
            if rng.random() < cfg.follow_prob:
                seq.append(int(follow[seq[-1], 0 if rng.random() < 0.7 else 1]))
            else:
                pool = by_cat[favs[int(rng.integers(2))]]
                seq.append(pool[int(rng.integers(len(pool)))])
        seqs[f"U{u:05d}"] = [items[i].item_id for i in seq]
    return seqs


def write_demo_data(folder: Path, cfg: DemoConfig) -> Path:
    """items.jsonl, train.jsonl (all but the last item), test.jsonl (last item as target)."""
    from model_store.catalog import write_catalog
    from training.data import EvalRow, InteractionData

    rng = np.random.default_rng(cfg.seed)
    items = synthetic_catalog(cfg.items, rng)
    seqs = synthetic_sequences(items, cfg, rng)
    folder.mkdir(parents=True, exist_ok=True)
    write_catalog(items, folder / "items.jsonl")
    train = {u: s[:-2] for u, s in seqs.items()}
    valid = [EvalRow(u, s[:-2][-10:], s[-2]) for u, s in seqs.items()]
    test = [EvalRow(u, s[:-1][-10:], s[-1]) for u, s in seqs.items()]
    InteractionData(train=train, valid=valid, test=test).save(folder)
    return folder
