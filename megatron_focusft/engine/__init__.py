"""The engine every training method runs on: model and optimizer setup, the split forward
(embedding, layer ranges with recomputation, LM head), the loss, the schedule-driven train step,
pipeline-stage helpers and distributed checkpoints."""
