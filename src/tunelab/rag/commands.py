"""`tunelab index build | add | remove | search | show`: the CLI over `tunelab.rag.index`, which each command
imports inside itself (it loads torch, FAISS and bm25s: `tunelab --help` loads none of them)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tunelab.errors import UserError
from tunelab.terminal import make_console, plain

index_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        short_help="index build | add | remove | search | show | training-data",
                        help="a retrieval index over a knowledge base (Markdown, text, HTML, FAQ CSV/JSONL): dense "
                             "embeddings and BM25, fused")
console = make_console()


def _summary(verb: str, out: Path, summary: dict) -> None:
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items())
    console.print(f"[bold green]{verb}[/] {plain(out)}: {summary['documents']} documents, {summary['chunks']} chunks "
                  f"({summary['encoded']} encoded) in {summary['seconds']} s" + (f"; skipped: {skipped}" if skipped
                                                                                   else ""))


@index_app.command("build")
def build_cmd(sources: list[Path] = typer.Argument(..., help="files and folders of Markdown, text, HTML and FAQ "
                                                             "tables (CSV/JSONL with question and answer columns)"),
              out: Path = typer.Option(..., "--out", help="the index folder to write"),
              encoder: str = typer.Option("builtin:minilm-l6", "--encoder", help="an encoder: a built-in, a "
                                          "Hugging Face folder or a tunelab model dir (a fine-tuned retriever)"),
              max_chars: int = typer.Option(1000, "--max-chars", min=100, help="longest chunk, in characters"),
              overlap: int = typer.Option(1, "--overlap", min=0, help="sentences consecutive chunks share"),
              overwrite: bool = typer.Option(False, "--overwrite", help="replace an index already at --out")):
    """Read, chunk, embed and index a knowledge base."""
    from tunelab.rag.index import Index  # torch, FAISS, bm25s: start-up

    _, summary = Index.build(list(sources), out, encoder, max_chars, overlap, overwrite)
    _summary("built", out, summary)


@index_app.command("add")
def add_cmd(index: Path = typer.Argument(..., help="an index folder"),
            sources: list[Path] = typer.Argument(..., help="files and folders whose documents to add or update")):
    """Add documents, or replace those whose id is already there and whose text changed."""
    from tunelab.rag.index import Index  # torch, FAISS, bm25s: start-up

    _, summary = Index.load(index).add(list(sources))
    _summary("updated", index, summary)


@index_app.command("remove")
def remove_cmd(index: Path = typer.Argument(..., help="an index folder"),
               doc_ids: list[str] = typer.Argument(..., help="document ids, as `tunelab index show` lists them")):
    """Remove documents by id."""
    from tunelab.rag.index import Index  # torch, FAISS, bm25s: start-up

    _, summary = Index.load(index).remove(doc_ids)
    _summary("updated", index, summary)


@index_app.command("search")
def search_cmd(index: Path = typer.Argument(..., help="an index folder"),
               query: str = typer.Argument(..., help="what to look for"),
               k: int = typer.Option(5, "-k", min=1, max=100, help="how many chunks"),
               mode: str = typer.Option("hybrid", "--mode", help="hybrid (dense and BM25 fused), dense or bm25")):
    """The best chunks for a query, with their document, headings, offsets and score."""
    from tunelab.rag.index import Index  # torch, FAISS, bm25s: start-up

    hits = Index.load(index).search(query, k, mode)
    table = Table(show_lines=False)
    for col in ("#", "score", "document", "headings", "span", "text"):
        table.add_column(col, overflow="fold")
    for n, h in enumerate(hits, start=1):
        c = h.chunk
        table.add_row(str(n), f"{h.score:.4f}", plain(c.doc_id), plain(" > ".join(c.headings)), f"{c.start}-{c.end}",
                      plain(" ".join(c.text.split())[:160]))  # plain: user text, never rich markup
    console.print(table if hits else "no chunk matches")


@index_app.command("show")
def show_cmd(index: Path = typer.Argument(..., help="an index folder")):
    """What an index holds: its encoder, settings, and documents with their chunk counts."""
    from tunelab.rag.index import Index  # torch, FAISS, bm25s: start-up

    idx = Index.load(index)
    enc = idx.meta["encoder"]
    console.print(f"{plain(index)}: {len(idx.documents)} documents, {len(idx.chunks)} chunks · encoder "
                  f"{plain(enc['ref'])} "
                  f"({enc['dim']} dimensions, fingerprint {enc['fingerprint'][:12]}) · chunks ≤ "
                  f"{idx.meta['chunking']['max_chars']} characters, overlap {idx.meta['chunking']['overlap']}")
    counts: dict[str, int] = {}
    for c in idx.chunks:
        counts[c.doc_id] = counts.get(c.doc_id, 0) + 1
    table = Table()
    for col in ("document", "format", "chunks", "characters", "source"):
        table.add_column(col, overflow="fold")
    for d in idx.documents.values():
        table.add_row(plain(d["id"]), d["format"], str(counts.get(d["id"], 0)), f"{len(d['text']):,}",
                      plain(d["source"]))
    console.print(table)


@index_app.command("training-data")
def training_data_cmd(index: Path = typer.Argument(..., help="an index folder"),
                      out: Path = typer.Option(..., "--out", help="a folder for retrieval.jsonl and sft.jsonl"),
                      handoff_share: float = typer.Option(0.25, "--handoff-share", min=0.0, max=1.0,
                                                          help="SFT conversations whose passages lack the answer "
                                                          "and whose reply is the hand-off message"),
                      seed: int = typer.Option(0, "--seed"),
                      overwrite: bool = typer.Option(False, "--overwrite", help="replace files written before")):
    """Training data from the knowledge base's question headings: retrieval pairs (question, answering passage)
    for `data prepare --task retrieval`, and grounded SFT conversations (passages in the prompt, cited answers,
    hand-offs) for `data prepare --task sft`."""
    import json

    from tunelab.artifacts import check_file_target, write_file
    from tunelab.rag.answer import Assistant  # torch, FAISS, bm25s: start-up
    from tunelab.rag.index import Index
    from tunelab.rag.training import retrieval_pairs, sft_conversations

    names = ("retrieval.jsonl", "sft.jsonl")
    for name in names:  # both checked before either is written
        check_file_target(out / name, "training-data", overwrite)
    assistant = Assistant(Index.load(index))
    pairs = retrieval_pairs(assistant.index.chunks)
    if not pairs:
        raise UserError(f"{index}: no heading of the knowledge base is a question (ending in ? or ？), so there is "
                        "nothing to build training data from")
    for name, rows in zip(names, (pairs, sft_conversations(assistant, handoff_share, seed))):
        write_file(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "training-data",
                   checked=True)
        console.print(f"wrote {plain(out / name)}: {len(rows)} rows")
