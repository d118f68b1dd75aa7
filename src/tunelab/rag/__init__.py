"""Retrieval over a knowledge base: `sources` (files and folders -> documents), `chunking` (documents -> chunks
with exact offsets and heading paths), `index` (an index folder: dense MiniLM-style embeddings in FAISS, BM25,
fused by reciprocal rank; incremental add/remove by document id), `commands` (`tunelab index …`)."""
