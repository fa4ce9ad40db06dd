"""Project-wide test settings.

Two cores are shared by every test and by the worker processes the tests launch: one thread per
process keeps tiny CPU models from thrashing each other (measured up to 40x slower with two).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
