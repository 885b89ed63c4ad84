"""cogradctl: fine-tune multi-task models with gradient coordination and measure task transference."""

__version__ = "0.1.0"
