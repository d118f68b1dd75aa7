"""Data stage: read raw rows, clean, de-duplicate, split, and account for every row."""
