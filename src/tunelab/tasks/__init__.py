"""Task definitions: how rows become tensors, how loss and predictions are computed."""
