"""The raw material of the catalog: designers, categories, colours and phrases.

Everything here is a constant table; ``fixture_shop.catalog`` draws from it with
seeded generators. Changing a table changes every seed's catalog, so tests that
pin exact bytes pin them against these tables.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final


def slugify(text: str) -> str:
    """``"Dolce & Gabbana"`` -> ``"dolce-gabbana"``, ``"Chloé"`` -> ``"chloe"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    ascii_text = ascii_text.lower().replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


@dataclass(frozen=True, slots=True)
class Designer:
    name: str
    price_tier: float  # multiplies the category's price range

    @property
    def slug(self) -> str:
        return slugify(self.name)


DESIGNERS: Final = (
    Designer("Valentino", 1.1),
    Designer("Gucci", 1.05),
    Designer("Prada", 1.1),
    Designer("Saint Laurent", 1.1),
    Designer("Bottega Veneta", 1.2),
    Designer("Balenciaga", 1.05),
    Designer("Loewe", 1.1),
    Designer("Celine", 1.1),
    Designer("Chloé", 0.95),
    Designer("The Row", 1.3),
    Designer("Jil Sander", 0.95),
    Designer("Max Mara", 0.9),
    Designer("Burberry", 0.9),
    Designer("Alexander McQueen", 1.05),
    Designer("Givenchy", 1.0),
    Designer("Fendi", 1.1),
    Designer("Dolce & Gabbana", 1.1),
    Designer("Miu Miu", 1.0),
    Designer("Khaite", 1.0),
    Designer("Totême", 0.7),
    Designer("Acne Studios", 0.65),
    Designer("Isabel Marant", 0.75),
    Designer("Zimmermann", 0.85),
    Designer("Brunello Cucinelli", 1.35),
    Designer("Loro Piana", 1.4),
    Designer("Tom Ford", 1.2),
    Designer("Dries Van Noten", 0.85),
    Designer("Marni", 0.8),
    Designer("Etro", 0.8),
    Designer("Moncler", 1.0),
    Designer("Stella McCartney", 0.85),
    Designer("Versace", 1.0),
    Designer("Ferragamo", 0.95),
    Designer("Tod's", 0.85),
    Designer("Jimmy Choo", 0.9),
    Designer("Gianvito Rossi", 0.95),
    Designer("Alaïa", 1.15),
    Designer("Lemaire", 0.7),
    Designer("Gabriela Hearst", 1.15),
    Designer("Balmain", 1.0),
    Designer("Zegna", 1.05),
)

ALPHA_SIZES: Final = ("XS", "S", "M", "L", "XL")
MEN_ALPHA_SIZES: Final = ("S", "M", "L", "XL", "XXL")
WOMEN_SHOE_SIZES: Final = ("EU 36", "EU 37", "EU 38", "EU 39", "EU 40", "EU 41")
MEN_SHOE_SIZES: Final = ("EU 40", "EU 41", "EU 42", "EU 43", "EU 44", "EU 45", "EU 46")
ONE_SIZE: Final = ("One Size",)

# Each material family lists the materials, the name details and the sentences
# that suit one kind of thing (a "pleated leather sneaker" never happens).
MATERIALS: Final[dict[str, tuple[str, ...]]] = {
    "woven": ("silk", "silk-satin", "wool", "wool-blend", "cotton-poplin", "linen", "crepe",
              "tweed", "cady", "leather", "cotton-twill", "velvet"),
    "knit": ("cashmere", "merino wool", "alpaca-blend", "ribbed cotton", "mohair-blend",
             "wool-cashmere"),
    "bag": ("leather", "suede", "calfskin", "patent leather", "grained leather",
            "canvas and leather", "raffia"),
    "shoe": ("leather", "suede", "calfskin", "patent leather", "nappa leather", "canvas"),
    "belt": ("leather", "suede", "patent leather", "grained leather"),
    "eyewear": ("acetate", "metal", "tortoiseshell acetate"),
    "soft": ("silk", "cashmere", "wool", "silk-twill", "modal-blend"),
}  # fmt: skip

DETAILS: Final[dict[str, tuple[str, ...]]] = {
    "woven": ("Belted", "Ruched", "Pleated", "Draped", "Oversized", "Cropped", "Asymmetric",
              "Embroidered", "Ruffled", "Tailored", "Fringed", "Quilted", "Double-breasted",
              "Cutout", "Tie-front", "Gathered"),
    "knit": ("Ribbed", "Cable-knit", "Oversized", "Cropped", "Intarsia", "Fine-knit",
             "Brushed", "Open-knit"),
    "bag": ("Mini", "Small", "Medium", "Large", "Quilted", "Logo-embossed", "Croc-effect",
            "Woven", "Chain-strap"),
    "shoe": ("Pointed-toe", "Square-toe", "Leather-trimmed", "Shearling-lined", "Embellished",
             "Platform", "Logo-appliqué", "Chunky"),
    "belt": ("Logo-buckle", "Croc-effect", "Skinny", "Wide", "Studded"),
    "eyewear": ("Oversized", "Round-frame", "Square-frame", "Logo-detailed", "Tinted"),
    "soft": ("Printed", "Monogrammed", "Reversible", "Fringed", "Logo-jacquard", "Striped"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class CategorySpec:
    gender: str
    department: str
    name: str
    nouns: tuple[str, ...]
    sizes: tuple[str, ...]
    price_range: tuple[int, int]  # EUR, before the designer's tier
    shape: str  # the silhouette fixture_shop.images draws
    family: str  # a key of MATERIALS / DETAILS / the sentence tables
    weight: int  # how often products fall in this category

    @property
    def path(self) -> tuple[str, str, str]:
        return (self.gender, self.department, self.name)

    @property
    def slug(self) -> str:
        return slugify(f"{self.gender} {self.name}")


CATEGORIES: Final = (
    CategorySpec("Women", "Clothing", "Dresses",
                 ("midi dress", "maxi dress", "mini dress", "slip dress", "shirt dress",
                  "wrap dress", "gown"), ALPHA_SIZES, (900, 4500), "dress", "woven", 10),
    CategorySpec("Women", "Clothing", "Coats",
                 ("coat", "trench coat", "wrap coat", "puffer coat", "peacoat", "car coat"),
                 ALPHA_SIZES, (1500, 6000), "coat", "woven", 7),
    CategorySpec("Women", "Clothing", "Knitwear",
                 ("sweater", "cardigan", "turtleneck sweater", "knitted vest", "polo sweater"),
                 ALPHA_SIZES, (450, 1800), "top", "knit", 7),
    CategorySpec("Women", "Clothing", "Shirts",
                 ("shirt", "blouse", "oversized shirt", "tunic"),
                 ALPHA_SIZES, (350, 1400), "top", "woven", 6),
    CategorySpec("Women", "Clothing", "Trousers",
                 ("wide-leg trousers", "straight-leg trousers", "tailored pants",
                  "cigarette trousers", "cargo pants"), ALPHA_SIZES, (450, 1500), "trousers",
                 "woven", 6),
    CategorySpec("Women", "Clothing", "Skirts",
                 ("midi skirt", "pleated skirt", "mini skirt", "pencil skirt", "maxi skirt"),
                 ALPHA_SIZES, (400, 1600), "skirt", "woven", 5),
    CategorySpec("Women", "Bags", "Shoulder Bags",
                 ("shoulder bag", "crossbody bag", "saddle bag", "hobo bag"),
                 ONE_SIZE, (1200, 4500), "bag", "bag", 5),
    CategorySpec("Women", "Bags", "Tote Bags",
                 ("tote bag", "shopper bag", "bucket bag"), ONE_SIZE, (900, 3800), "bag",
                 "bag", 4),
    CategorySpec("Women", "Shoes", "Boots",
                 ("ankle boots", "knee-high boots", "Chelsea boots"), WOMEN_SHOE_SIZES,
                 (800, 1900), "boot", "shoe", 4),
    CategorySpec("Women", "Shoes", "Pumps",
                 ("pumps", "slingback pumps", "mules"), WOMEN_SHOE_SIZES, (550, 1200), "shoe",
                 "shoe", 4),
    CategorySpec("Women", "Shoes", "Sneakers",
                 ("sneakers", "low-top sneakers", "high-top sneakers"), WOMEN_SHOE_SIZES,
                 (450, 950), "shoe", "shoe", 3),
    CategorySpec("Women", "Accessories", "Scarves",
                 ("scarf", "square scarf", "wrap", "stole"), ONE_SIZE, (250, 1100), "scarf",
                 "soft", 3),
    CategorySpec("Women", "Accessories", "Belts",
                 ("belt", "waist belt", "buckle belt"), ("70", "75", "80", "85", "90"),
                 (350, 900), "belt", "belt", 2),
    CategorySpec("Women", "Accessories", "Sunglasses",
                 ("sunglasses", "cat-eye sunglasses", "aviator sunglasses"), ONE_SIZE,
                 (300, 650), "sunglasses", "eyewear", 2),
    CategorySpec("Men", "Clothing", "Coats",
                 ("overcoat", "trench coat", "peacoat", "parka", "car coat"), MEN_ALPHA_SIZES,
                 (1600, 6000), "coat", "woven", 6),
    CategorySpec("Men", "Clothing", "Knitwear",
                 ("sweater", "cardigan", "rollneck sweater", "zip-up cardigan"),
                 MEN_ALPHA_SIZES, (500, 1900), "top", "knit", 5),
    CategorySpec("Men", "Clothing", "Shirts",
                 ("shirt", "oxford shirt", "overshirt", "camp-collar shirt"), MEN_ALPHA_SIZES,
                 (300, 1100), "top", "woven", 5),
    CategorySpec("Men", "Clothing", "Trousers",
                 ("chinos", "tailored trousers", "pleated trousers", "straight-leg jeans",
                  "cargo trousers"), MEN_ALPHA_SIZES, (350, 1300), "trousers", "woven", 5),
    CategorySpec("Men", "Bags", "Backpacks",
                 ("backpack", "rucksack"), ONE_SIZE, (1100, 3500), "bag", "bag", 2),
    CategorySpec("Men", "Bags", "Tote Bags",
                 ("tote bag", "briefcase", "messenger bag"), ONE_SIZE, (1000, 3900), "bag",
                 "bag", 2),
    CategorySpec("Men", "Shoes", "Boots",
                 ("Chelsea boots", "lace-up boots", "combat boots"), MEN_SHOE_SIZES,
                 (850, 1800), "boot", "shoe", 3),
    CategorySpec("Men", "Shoes", "Loafers",
                 ("loafers", "penny loafers", "horsebit loafers"), MEN_SHOE_SIZES,
                 (650, 1300), "shoe", "shoe", 3),
    CategorySpec("Men", "Shoes", "Sneakers",
                 ("sneakers", "low-top sneakers", "runner sneakers"), MEN_SHOE_SIZES,
                 (450, 1000), "shoe", "shoe", 3),
    CategorySpec("Men", "Accessories", "Scarves",
                 ("scarf", "cashmere-blend scarf"), ONE_SIZE, (250, 950), "scarf", "soft", 2),
    CategorySpec("Men", "Accessories", "Belts",
                 ("belt", "reversible belt"), ("85", "90", "95", "100", "105"), (350, 850),
                 "belt", "belt", 2),
    CategorySpec("Men", "Accessories", "Sunglasses",
                 ("sunglasses", "aviator sunglasses", "square sunglasses"), ONE_SIZE,
                 (300, 600), "sunglasses", "eyewear", 2),
)  # fmt: skip

# name -> RGB, used by the description and by the drawn silhouette.
COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "black": (24, 24, 26),
    "ivory": (236, 228, 206),
    "camel": (193, 154, 107),
    "navy": (30, 42, 82),
    "burgundy": (110, 24, 44),
    "olive": (102, 108, 58),
    "grey": (128, 128, 132),
    "chocolate": (84, 52, 36),
    "ecru": (214, 200, 170),
    "red": (190, 30, 40),
    "emerald": (22, 120, 84),
    "powder-blue": (150, 186, 214),
    "blush": (226, 170, 168),
    "mustard": (206, 160, 40),
    "charcoal": (58, 60, 64),
    "sand": (200, 182, 146),
    "lilac": (184, 160, 206),
    "cobalt": (36, 78, 170),
}

# {this} / {verb} agree with the noun: "this coat is", "these sneakers are".
OPENINGS: Final = (
    "From {designer}, {this} {noun} {verb} cut from {colour} {material}.",
    "Cut from {colour} {material}, {this} {noun} by {designer} {verb} made to last for seasons.",
    "{designer} brings its signature polish to {this} {colour} {material} {noun}.",
    "{this_capital} {colour} {noun} from {designer} {verb} crafted from {material}.",
    "Part of the new-season collection from {designer}, {this} {noun} {verb} {colour} {material}.",
)

DETAIL_SENTENCES: Final[dict[str, tuple[str, ...]]] = {
    "woven": ("A relaxed fit skims the body.",
              "The waist is defined by a self-tie belt.",
              "Concealed buttons keep the front clean.",
              "Side seam pockets add a practical touch.",
              "An elegant length moves beautifully.",
              "Tonal topstitching traces the seams.",
              "The lining is cut from smooth silk-blend."),
    "knit": ("Dropped shoulders meet ribbed trims.",
             "The dense knit keeps its shape wash after wash.",
             "The yarn is spun for a soft, lofty hand.",
             "A relaxed silhouette makes layering easy."),
    "bag": ("The structured body opens to a suede-lined interior with a slip pocket.",
            "Gold-tone hardware catches the light.",
            "The adjustable strap can be worn on the shoulder or across the body.",
            "Edges are hand-painted in a tonal shade."),
    "shoe": ("A stacked leather sole adds a little height.",
             "A padded insole keeps every step comfortable.",
             "The lining is soft, breathable leather.",
             "Hand-finished welts show the craft behind the pair."),
    "belt": ("A polished buckle fastens it neatly.",
             "Edges are hand-painted in a tonal shade.",
             "Five punched holes make the fit adjustable."),
    "eyewear": ("The lenses offer full UV protection.",
                "Slim temples are finished with the house emblem.",
                "A branded case and cleaning cloth come with the pair."),
    "soft": ("Hand-rolled edges finish the piece.",
             "The print is inspired by the house archives.",
             "Light enough to wear all year."),
}  # fmt: skip

STYLING_SENTENCES: Final = (
    "Wear with sleek boots and minimal jewellery.",
    "Style with tailored pieces for the office.",
    "Pair with denim for the weekend.",
    "Let it lead an evening look with a sculptural heel.",
    "Team with neutral layers for an easy, polished outfit.",
)

ORIGIN_SENTENCES: Final = (
    "Made in Italy.",
    "Made in France.",
    "Made in Portugal.",
    "Made in Spain.",
    "Made in Romania.",
)
