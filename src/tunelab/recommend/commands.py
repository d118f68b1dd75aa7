"""`tunelab recommend prepare | train | eval | show`: the CLI over `tunelab.recommend` (the model code is imported
inside each command: `tunelab --help` loads neither implicit nor torch)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tunelab.artifacts import write_file
from tunelab.errors import UserError
from tunelab.terminal import make_console, plain

recommend_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                            short_help="recommend prepare | train | eval | show",
                            help="recommenders from interactions and item text: baselines, implicit's ALS/BPR, "
                                 "item-kNN, text embeddings, a hybrid and a fine-tuned two-stage ranker")
console = make_console()
err_console = make_console(stderr=True)
MODELS = "popularity, genre-popularity, random, itemknn, als, bpr, text, hybrid, ranker"


@recommend_app.command("prepare")
def prepare_cmd(interactions: str = typer.Argument(..., help="CSV/TSV/JSONL/Parquet of user, item (+ rating, "
                                                              "timestamp), or builtin:movielens-100k"),
                out: Path = typer.Option(..., "--out", help="the interactions dir to write"),
                items: str | None = typer.Option(None, "--items", help="item metadata: id, title and text columns"),
                split: str = typer.Option("leave-last-out", "--split", help="leave-last-out (per user) or time "
                                          "(one global cut)"),
                cold_items: float = typer.Option(0.1, "--cold-items", help="share of items held out as cold "
                                                 "(only in cold_test)"),
                test_fraction: float = typer.Option(0.1, "--test-fraction", help="--split time: latest share"),
                validation_fraction: float = typer.Option(0.1, "--validation-fraction", help="--split time"),
                min_rating: float | None = typer.Option(None, "--min-rating", help="drop interactions rated lower"),
                user_column: str | None = typer.Option(None, "--user-column"),
                item_column: str | None = typer.Option(None, "--item-column"),
                time_column: str | None = typer.Option(None, "--time-column"),
                rating_column: str | None = typer.Option(None, "--rating-column"),
                text_columns: str | None = typer.Option(None, "--text-columns", help="item text: these columns, "
                                                        "comma-separated (default: all but the id)"),
                category_column: str | None = typer.Option(None, "--category-column"),
                item_id_column: str | None = typer.Option(None, "--item-id-column", help="the id column of --items"),
                max_drop_rate: float = typer.Option(0.2, "--max-drop-rate", help="fail when more rows are unusable"),
                seed: int = typer.Option(0, "--seed"),
                overwrite: bool = typer.Option(False, "--overwrite")):
    """Read, clean and split interactions by time; hold out cold items."""
    from tunelab.recommend.data import PrepareSpec, prepare  # imported inside: numpy, kept off start-up

    spec = PrepareSpec(interactions, items, user_column, item_column, rating_column, time_column, item_id_column,
                       text_columns.split(",") if text_columns else None, category_column, split,
                       validation_fraction, test_fraction, cold_items, min_rating, seed, max_drop_rate)
    meta = prepare(spec, out, overwrite)
    c = meta["counts"]
    rejected = ", ".join(f"{n} {why}" for why, n in c["rejected"].items()) or "none"
    console.print(f"[bold green]prepared[/] {plain(out)}: {c['interactions']:,} interactions of {c['users']:,} users "
                  f"and {c['items']:,} items ({c['cold_items']:,} cold); rejected: {plain(rejected)}")
    console.print(f"train {c['train_rows']:,} · validation {c['validation_rows']:,} · test {c['test_rows']:,} · "
                  f"cold_test {c['cold_test_rows']:,}  ({meta['split']})")


@recommend_app.command("train")
def train_cmd(data: Path = typer.Argument(..., help="an interactions dir (`tunelab recommend prepare`)"),
              model: str = typer.Option(..., "--model", help=MODELS),
              out: Path = typer.Option(..., "--out", help="the recommender dir to write"),
              trials: int = typer.Option(8, "--trials", min=1, help="settings tried per searched model (the same "
                                         "budget for every model)"),
              members: str | None = typer.Option(None, "--members", help="hybrid: model names or recommender dirs, "
                                                 "comma-separated (default itemknn,als,text)"),
              stage1: str | None = typer.Option(None, "--stage1", help="ranker: the first stage, a model name or a "
                                                "recommender dir (default itemknn)"),
              candidates: int | None = typer.Option(None, "--candidates", help="ranker: candidates re-ranked (20)"),
              base: str | None = typer.Option(None, "--base", help="ranker: the classifier's base "
                                              "(builtin:minilm-l6)"),
              layers: int | None = typer.Option(None, "--layers", help="ranker: keep the base's first N layers "
                                                "(2; 0 = all)"),
              epochs: float | None = typer.Option(None, "--epochs", help="ranker: training epochs (2)"),
              seed: int = typer.Option(0, "--seed"),
              overwrite: bool = typer.Option(False, "--overwrite")):
    """Search a model's settings on validation, refit on train + validation, save a recommender dir."""
    from tunelab.recommend.fit import train_recommender  # imported inside: scipy and implicit, kept off start-up

    ranker = {"stage1": stage1, "candidates": candidates, "base": base, "layers": layers, "epochs": epochs}
    meta = train_recommender(data, model, out, trials, seed, members.split(",") if members else None, ranker,
                             overwrite, log=lambda line: err_console.print(plain(line)))
    console.print(f"[bold green]trained[/] {plain(meta['model'])} → {plain(out)}: validation NDCG@10 "
                  f"{meta['validation_ndcg@10']:.4f} in {meta['seconds']} s")


@recommend_app.command("eval")
def eval_cmd(data: Path = typer.Argument(..., help="the interactions dir the models were trained on"),
             models: list[Path] = typer.Argument(..., help="recommender dirs"),
             k: int = typer.Option(10, "--k", min=1),
             against: str | None = typer.Option(None, "--against", help="the reference model's folder name "
                                                "(default the first)"),
             out: Path | None = typer.Option(None, "--out", help="write the report JSON here"),
             overwrite: bool = typer.Option(False, "--overwrite")):
    """Every model side by side on the warm test and cold-start splits, with bootstrap intervals."""
    from tunelab.recommend.evaluate import evaluate_models  # imported inside: scipy, kept off start-up

    report = evaluate_models(data, models, k=k, against=against)
    for split, section in report["splits"].items():
        table = Table(title=f"{split} ({next(iter(section.values()))['users']} users; reference "
                            f"{report['reference']})")
        for col in ("model", f"precision@{k}", f"recall@{k}", f"NDCG@{k} [95% CI]", "MRR", "coverage", "vs ref"):
            table.add_column(col)
        for name, row in section.items():
            nd = row[f"ndcg@{k}"]
            vs = row.get(f"vs_{report['reference']}")
            table.add_row(plain(name), f"{row[f'precision@{k}']['value']:.4f}", f"{row[f'recall@{k}']['value']:.4f}",
                          f"{nd['value']:.4f} [{nd['interval'][0]:.4f}, {nd['interval'][1]:.4f}]",
                          f"{row['mrr']['value']:.4f}", f"{row['coverage']:.3f}",
                          f"{vs['difference']:+.4f} {vs['verdict']}" if vs else "")
        console.print(table)
    if out is not None:
        write_file(out, json.dumps(report, indent=2) + "\n", "recommend-report", overwrite)
        console.print(f"report → {plain(out)}")


@recommend_app.command("show")
def show_cmd(model: Path = typer.Argument(..., help="a recommender dir"),
             user: str | None = typer.Option(None, "--user", help="a user id of its data"),
             history: str | None = typer.Option(None, "--history", help="item ids, comma-separated, oldest first"),
             k: int = typer.Option(10, "--k", min=1)):
    """Recommend for a user (or a history) and print the items."""
    from tunelab.recommend.serving import Recommendations  # imported inside: scipy, kept off start-up

    rec = Recommendations(model)
    answer = rec.recommend(user=user, items=history.split(",") if history else None, k=k)
    console.print(f"{plain(answer['strategy'])} · {answer['latency_ms']} ms")
    for row in answer["items"]:
        console.print(f"  {row['score']:8.4f}  {plain(row['item'])}  {plain(row['title'])}")
    if not answer["items"]:
        raise UserError("no items to recommend (every candidate is in the history)")
