"""The conversion's stages: calibration inputs, distillation (stage 1 and 2, training
checkpoints), per-layer selection, drift validation, multi-process training. Imports
hla_convert.recipe, hla_convert.model, hla_convert.ops and the bottom utilities only
(docs/architecture.md)."""
