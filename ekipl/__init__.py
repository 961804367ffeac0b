"""ekipl: External Knowledge-Infused Policy Learning (Vision-EKIPL) trainer."""

__version__ = "0.1.0"
