"""The cheap baselines every report compares against, on the same split:

- TF-IDF (word 1-2 grams) + logistic regression, trained on the dataset's train split;
- zero-shot prompting of an instruction-tuned decoder: the prompt lists the labels, and each label
  is scored by the probability of its word as the next token after the assistant turn starts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from tunelab.evaluate.metrics import classification_metrics

ZERO_SHOT_PROMPT = ("Classify the text into exactly one of these categories: {labels}.\n\n"
                    "Text: {text}\n\nAnswer with the category name only.")


def tfidf_logreg(train_rows: list[dict], test_rows: list[dict], labels: list[str], seed: int = 0) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    label2id = {label: i for i, label in enumerate(labels)}
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vec.fit_transform([r["text"] for r in train_rows])
    y_train = np.array([label2id[r["label"]] for r in train_rows])
    clf = LogisticRegression(max_iter=2000, C=4.0, random_state=seed)
    clf.fit(x_train, y_train)
    x_test = vec.transform([r["text"] for r in test_rows])
    probs = np.zeros((len(test_rows), len(labels)))
    probs[:, clf.classes_] = clf.predict_proba(x_test)
    y = np.array([label2id[r["label"]] for r in test_rows])
    out = classification_metrics(y, probs.argmax(1), labels, probs)
    out.update(name="TF-IDF + logistic regression", train_examples=len(train_rows))
    return out


def _label_token_ids(tokenizer, label: str) -> set[int]:
    """First-token ids of the label's likely spellings as an answer ("positive", "Positive", " positive")."""
    ids = set()
    for variant in {label, label.lower(), label.capitalize(), " " + label, " " + label.capitalize()}:
        toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if toks:
            ids.add(toks[0])
    return ids


@torch.no_grad()
def zero_shot(model_ref: str, test_rows: list[dict], labels: list[str], samples: int | None = 300,
              seed: int = 0, batch_size: int = 16) -> dict:
    """Zero-shot classification by next-token label scores; `samples` caps the rows (seeded sample)."""
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_pretrained, load_tokenizer, resolve_base

    rows = test_rows
    if samples is not None and samples < len(rows):
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=samples, replace=False))
        rows = [rows[i] for i in pick]
    base = resolve_base(model_ref)
    tok = load_tokenizer(base)
    model = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32).eval()
    label_ids = [_label_token_ids(tok, label) for label in labels]
    # A first token shared by two labels cannot tell them apart: score each label by its own tokens.
    counts = Counter(t for ids in label_ids for t in ids)
    label_ids = [sorted(t for t in ids if counts[t] == 1) or sorted(ids) for ids in label_ids]
    prompts = [_prompt(tok, r["text"], labels) for r in rows]
    scores = np.zeros((len(rows), len(labels)))
    order = np.argsort([len(p) for p in prompts])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        hidden = model.base_model(**enc).last_hidden_state
        last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token
        # Project only the last position onto the vocabulary (the other positions are not needed).
        logits = model.get_output_embeddings()(hidden[torch.arange(len(idx)), last])
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j, ids in enumerate(label_ids):
            scores[idx, j] = torch.logsumexp(logp[:, ids], dim=-1).numpy()
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    label2id = {label: i for i, label in enumerate(labels)}
    y = np.array([label2id[r["label"]] for r in rows])
    out = classification_metrics(y, scores.argmax(1), labels, probs)
    out.update(name=f"zero-shot {model_ref.removeprefix('builtin:')}", sample_size=len(rows), population=len(test_rows),
               prompt=ZERO_SHOT_PROMPT)
    return out


def _prompt(tokenizer, text: str, labels: list[str]) -> str:
    content = ZERO_SHOT_PROMPT.format(labels=", ".join(labels), text=text)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + "\nAnswer:"
