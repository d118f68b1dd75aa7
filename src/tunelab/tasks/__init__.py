"""Task definitions: how rows become tensors, how loss and predictions are computed."""

# dataset task (`data prepare --task`) -> the training task that uses it
DATASET_TASKS = {"classification": "classification", "ner": "token_classification", "text": "causal_lm",
                 "sft": "sft"}
