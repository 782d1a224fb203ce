"""Training plumbing the method families share, one layer below them: learning-rate schedules,
accuracy, cache keys, device helpers, the supervised FP/teacher LightningModule and coreset
selection on features. Families import this layer, never each other."""
